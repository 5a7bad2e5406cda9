"""A build's progress as it happens: a live status line in a terminal, timestamped lines in a CI log."""

from __future__ import annotations

import re
import threading
import time

from rich.console import Console
from rich.text import Text

from image_factory.console import console as default_console
from image_factory.console import log_line, styled
from image_factory.image.buildevents import BuildEvent

_ANSIBLE_HEADING_RE = re.compile(r"\b(PLAY|TASK|RUNNING HANDLER) \[(.+?)\]")


class LogLines:
    """on_event handler where there is no terminal: each build step, each Ansible task and every error as
    one timestamped line, so a CI log follows a build that takes minutes."""

    def __init__(self, image: str) -> None:
        self.image = image

    def __enter__(self) -> LogLines:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __call__(self, ev: BuildEvent) -> None:
        if ev.kind in ("step", "status", "error", "artifact"):
            log_line(self.image, ("error: " if ev.kind == "error" else "") + ev.message)
        elif ev.kind == "message":
            found = _ANSIBLE_HEADING_RE.search(ev.message)
            if found:
                log_line(self.image, f"ansible {found[1].lower()}: {found[2]}")


def progress_for(image: str) -> LiveProgress | LogLines:
    """Live progress in a terminal, timestamped lines in a log."""
    return LiveProgress(image) if default_console.is_terminal else LogLines(image)


class LiveProgress:
    """on_event handler: one rich status line (current step + elapsed) and every step printed."""

    def __init__(self, image: str, console: object | None = None) -> None:
        self.console: Console = console if isinstance(console, Console) else default_console
        self.image = image
        self.step = "starting"
        self.t0 = time.monotonic()
        self.status = self.console.status(self._text())
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)

    def _text(self) -> Text:
        return styled("[bold]{}[/]: {} [dim]({}s)[/]", self.image, self.step, f"{time.monotonic() - self.t0:.0f}")

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self.status.update(self._text())

    def __enter__(self) -> LiveProgress:
        self.status.__enter__()
        self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.status.__exit__(None, None, None)

    def __call__(self, ev: BuildEvent) -> None:
        if ev.kind == "step":
            self.step = ev.message
            self.console.print(styled("[dim]{}s[/] {}", f"{ev.elapsed:6.0f}", ev.message))
        elif ev.kind == "error":
            self.console.print(styled("[dim]{}s[/] [red]{}[/]", f"{ev.elapsed:6.0f}", ev.message))
        elif ev.kind == "status":
            self.console.print(styled("[cyan]{}[/]", ev.message))
        self.status.update(self._text())
