"""Where a hand-off's file lands (image_factory.handoffs.output)."""

from __future__ import annotations

from pathlib import Path

import pytest

from image_factory.errors import ValidationFailed
from image_factory.handoffs.output import write_output

pytestmark = pytest.mark.unit


def test_an_export_output_that_cannot_be_written_is_named_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where the directory would go\n")
    with pytest.raises(ValidationFailed) as caught:
        write_output("{}\n", tmp_path / "taken" / "kea.json")
    [problem] = caught.value.problems
    assert (problem.key, str(tmp_path / "taken") in problem.message) == ("--output", True), problem
