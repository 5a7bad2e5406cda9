"""How a publish shows its progress: a bar per host on a terminal, a line per quarter in a log."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from image_factory.console import Milestones, console
from image_factory.publish.model import ProgressHook
from image_factory.site.inventory import Hypervisor


@contextmanager
def progress_bars(enabled: bool, hosts: list[Hypervisor], total: int) -> Iterator[ProgressHook | None]:
    if not enabled:
        yield None
        return
    if not console.is_terminal:
        yield Milestones()  # a log gets a line per quarter, not bars redrawn nobody sees
        return
    bars = Progress(
        TextColumn("{task.description:<14}", markup=False), BarColumn(), DownloadColumn(binary_units=True),
        TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False,
    )
    ids = {h.name: bars.add_task(h.name, total=total, start=True) for h in hosts}
    lock = threading.Lock()

    def hook(host: str, done: int, size: int) -> None:
        with lock:
            bars.update(ids[host], completed=done, total=size)

    with bars:
        yield hook
