"""The check registry: each check declared once, with the checks it needs and whether deploy runs it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from image_factory.preflight.model import CHECK_TLS, CHECK_TOKEN, Outcome
from image_factory.preflight.probe import HostProbe

CheckStep = Callable[[HostProbe], Outcome]


@dataclass(frozen=True)
class Check:
    """One preflight check: its name, the checks that must have passed before it runs (else it is skipped),
    the checks it runs after without needing them to pass (it reads their facts itself: the token check reports
    an unreadable secret the tls check could not test), whether deploy runs it (publish runs every check), and the
    step that runs it on one host."""

    name: str
    run: CheckStep
    needs: tuple[str, ...] = (CHECK_TLS, CHECK_TOKEN)
    deploy: bool = True
    after: tuple[str, ...] = ()


CHECKS: dict[str, Check] = {}  # in run order: the order the checks are declared in


def declare(entry: Check) -> None:
    if entry.name in CHECKS:
        raise ValueError(f"preflight check {entry.name!r} is declared twice")
    CHECKS[entry.name] = Check(entry.name, entry.run, tuple(n for n in entry.needs if n != entry.name),
                               entry.deploy, entry.after)


def check(name: str, *, needs: tuple[str, ...] = (CHECK_TLS, CHECK_TOKEN), deploy: bool = True
          ) -> Callable[[CheckStep], CheckStep]:
    """Declare a check by decorating its step (a plain function of the host's probe); it runs after the checks
    declared before it."""
    def register(step: CheckStep) -> CheckStep:
        declare(Check(name, step, needs, deploy))
        return step
    return register


def expand_checks(checks: Iterable[str] | None) -> tuple[str, ...]:
    """Validate check names, add their prerequisites, return them in canonical order."""
    wanted = set(CHECKS if checks is None else checks)
    unknown = sorted(wanted - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown preflight check(s) {unknown} (have: {', '.join(CHECKS)})")
    pending = list(wanted)
    while pending:
        entry = CHECKS[pending.pop()]
        added = {n for n in (*entry.needs, *entry.after) if n not in wanted}
        wanted |= added
        pending += added
    return tuple(c for c in CHECKS if c in wanted)
