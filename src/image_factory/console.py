"""One rich console for the whole tool; progress and tables go to stderr, --json to stdout.

Two rules hold for everything printed or written as a report:
- Markup comes only from the code. The console parses no markup in strings (names, paths and server
  messages may contain ``[/x]``); styled lines are built with :func:`styled`, which escapes values.
- Secrets never appear. Every secret the tool reads is registered here (:func:`register_secret`)
  and masked in terminal output, JSON on stdout and report files alike.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.segment import Segment
from rich.text import Text

from image_factory.files import write_atomic

MASK = "********"
_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str) -> None:
    """From now on, ``value`` is printed and written as ********."""
    if value:
        with _secrets_lock:
            _secrets.add(value)


def mask(text: str) -> str:
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


class MaskingConsole(Console):
    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        return mask(super()._render_buffer(buffer))


# no emoji codes either: a fingerprint's ":ab:" printed as an emoji is not the fingerprint
console = MaskingConsole(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)
if not console.is_terminal and "COLUMNS" not in os.environ:
    # Logs of CI and `./dev demo > file` keep MACs and paths on one line instead of wrapping at 80.
    console.width = 160


def styled(template: str, *values: Any) -> Text:
    """``styled("[red]{}[/] on {}", name, host)``: markup from the template, every value escaped."""
    return Text.from_markup(template.format(*(escape(str(v)) for v in values)), emoji=False)


def to_json(data: Any) -> str:
    return mask(json.dumps(data, indent=2, sort_keys=True, default=str)) + "\n"


def emit_json(data: Any) -> None:
    sys.stdout.write(to_json(data))
    sys.stdout.flush()


def write_report(path: str | Path, data: Any) -> Path:
    """A JSON report file, 0600 from its first byte (reports name hosts, VMs and paths), secrets masked."""
    return write_atomic(Path(path), to_json(data), mode=0o600)


def log_line(subject: str, message: str) -> None:
    """One timestamped line for logs without a terminal (CI, ``./dev demo > file``): where a terminal
    shows live progress, a log gets ``2026-11-28T01:02:03Z subject: message`` lines instead."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    console.print(f"{stamp} {subject}: {message}", markup=False, highlight=False)


class Milestones:
    """Progress as log lines: a line each time a transfer passes another quarter (per subject)."""

    def __init__(self, step: float = 0.25) -> None:
        self.step = step
        self._reached: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, subject: str, done: int, total: int) -> None:
        if total <= 0:
            return
        mark = int(min(done / total, 1.0) / self.step)
        with self._lock:
            if mark <= self._reached.get(subject, 0):
                return
            self._reached[subject] = mark
        log_line(subject, f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB ({100 * done // total}%)")
