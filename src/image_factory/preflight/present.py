"""The preflight report as a table: one row per host and check, with the fix beside each failure."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from image_factory.preflight.model import PreflightReport

STATUS_STYLE = {"ok": "green", "WARN": "yellow", "FAIL": "bold red", "skip": "yellow"}


def render_table(report: PreflightReport) -> Table:
    table = Table(title="preflight: " + ("all checks passed" if report.ok else "FAILED"), show_lines=False)
    for col in ("host", "check", "status", "detail", "fix"):
        table.add_column(col, overflow="fold")
    for host, results in report.hosts.items():
        for r in results:
            table.add_row(host, r.name, Text(r.status, style=STATUS_STYLE[r.status]), r.detail, r.hint)
    return table
