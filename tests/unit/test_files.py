"""image_factory.files.write_atomic: all or nothing, with the right permissions."""

from __future__ import annotations

from pathlib import Path

import pytest

from image_factory.files import write_atomic

pytestmark = pytest.mark.unit


def test_replaces_keeps_the_old_mode_or_takes_the_given_one(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.json"
    write_atomic(target, "one\n")
    assert target.read_text() == "one\n" and oct(target.stat().st_mode & 0o777) == "0o644"
    target.chmod(0o640)
    write_atomic(target, "two\n")
    assert target.read_text() == "two\n" and oct(target.stat().st_mode & 0o777) == "0o640"
    write_atomic(target, "secret\n", mode=0o600)
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "manifest.json"
    write_atomic(target, "old\n")

    def boom(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", boom)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, "new\n")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
