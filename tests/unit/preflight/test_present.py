"""The preflight table."""

from __future__ import annotations

import pytest

from image_factory import preflight as pf

pytestmark = pytest.mark.unit


def test_report_table_has_one_row_per_host_and_check():
    report = pf.PreflightReport(
        hosts={"a": [pf.CheckResult("tls", True, "fine")],
               "b": [pf.CheckResult("tls", False, "bad", "do x"), pf.CheckResult("token", False, "", "", True)]},
        checks=("tls", "token"),
    )
    table = pf.render_table(report)
    assert table.row_count == 3
    assert not report.ok and [(h, r.name) for h, r in report.failures()] == [("b", "tls")]

