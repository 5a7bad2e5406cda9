"""Where a hand-off's file lands: written atomically, a path that cannot be written named as bad input."""

from __future__ import annotations

from pathlib import Path

from image_factory.errors import Problem, ValidationFailed
from image_factory.files import write_atomic


def write_output(text: str, output: str | Path) -> Path:
    """Write an export atomically (a reader never sees half a file); a path that cannot be written is bad input,
    named by the flag that gave it."""
    path = Path(output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)
    except OSError as exc:
        raise ValidationFailed([Problem("command line", "", "--output",
                                        f"cannot write {path}: {exc.strerror or exc} ({exc.filename or path})")
                                ]) from None
    return path
