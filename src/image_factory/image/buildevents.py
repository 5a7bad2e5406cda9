"""What every part of a build shares: its errors and its one event sink (live progress, the outcome's record)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from image_factory.errors import FactoryError


class BuildError(FactoryError):
    """The build itself failed (packer error, timeout, interrupted, disk full, bad source)."""

    exit_code = 4


class BuildVmPanicked(BuildError):
    """The build VM's kernel died (its console says so): under TCG a QEMU race, not the recipe."""


class BuildSettingError(BuildError):
    """A bad accelerator or Ansible strategy setting: bad input, refused before anything runs."""

    exit_code = 2


@dataclass
class BuildEvent:
    kind: str  # "step" | "message" | "error" | "artifact" | "status"
    message: str
    elapsed: float = 0.0


EventHandler = Callable[[BuildEvent], None]


@dataclass
class EventSink:
    """Where a build's events go: kept in order (the outcome carries them) and handed to ``on_event`` (live
    progress) as they happen, each with the seconds since the build started."""

    on_event: EventHandler | None = None
    started: float = field(default_factory=time.monotonic)
    events: list[BuildEvent] = field(default_factory=list)

    def emit(self, kind: str, message: str) -> None:
        event = BuildEvent(kind, message, self.elapsed())
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    def elapsed(self) -> float:
        return time.monotonic() - self.started
