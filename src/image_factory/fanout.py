"""One fan-out for every per-host operation: each host in its own thread, results keyed by host.

A host that fails with a FactoryError (unreachable, refused, a remote error) is a result too, so one bad
host never hides the others' results; anything else is a bug and propagates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from image_factory.errors import FactoryError

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class PerHost(Generic[Result]):
    """What each host returned, and why the others failed (host -> message), in the order asked."""

    results: dict[str, Result] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures


def per_host(items: Mapping[str, Item], fn: Callable[[Item], Result], *, name: str = "host") -> PerHost[Result]:
    """``fn(item)`` for every host at once; a FactoryError becomes that host's failure."""
    out: PerHost[Result] = PerHost()
    if not items:
        return out
    with ThreadPoolExecutor(max_workers=len(items), thread_name_prefix=name) as pool:
        futures = {host: pool.submit(fn, item) for host, item in items.items()}
        for host, future in futures.items():
            try:
                out.results[host] = future.result()
            except FactoryError as exc:
                out.failures[host] = str(exc)
    return out
