"""``invoke doctor``: which external tools each target needs, which are here, and what provides the rest.

Shaped like deploy/: gather (tools.probe_all: look, read versions, install nothing, need no root), a pure
decision per target from the registry's table (:func:`verdict`), and presentation (a table on stderr, or JSON).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from rich.table import Table

from image_factory import tools
from image_factory.console import styled
from image_factory.errors import FactoryError, Problem, ValidationFailed
from image_factory.tools import Probe, Tool, Version

OK, MISSING, TOO_OLD, UNKNOWN_VERSION = "ok", "missing", "too old", "version unreadable"


class ToolsMissing(FactoryError):
    """A requested target lacks a required tool."""


@dataclass(frozen=True)
class Row:
    tool: str
    label: str
    required: bool
    status: str
    why: str
    provides: str
    found: str | None = None
    version: Version | None = None
    version_text: str = ""
    minimum: Version | None = None
    note: str = ""

    @property
    def fails(self) -> bool:
        return self.required and self.status != OK

    def as_dict(self) -> dict[str, object]:
        return {"tool": self.tool, "label": self.label, "required": self.required, "status": self.status,
                "found": self.found, "version": ".".join(map(str, self.version)) if self.version else None,
                "version_text": self.version_text,
                "minimum": ".".join(map(str, self.minimum)) if self.minimum else None,
                "why": self.why, "provided_by": tools.get(self.tool).provider.as_dict(),
                "provides_text": self.provides, "note": self.note}


@dataclass(frozen=True)
class TargetVerdict:
    target: str
    rows: tuple[Row, ...]

    @property
    def ok(self) -> bool:
        return not any(row.fails for row in self.rows)

    def as_dict(self) -> dict[str, object]:
        return {"target": self.target, "what": tools.TARGETS[self.target], "ok": self.ok,
                "missing": [row.tool for row in self.rows if row.fails],
                "tools": [row.as_dict() for row in self.rows]}


def resolve_targets(requested: Iterable[str] | None) -> list[str]:
    """The targets asked for, in the registry's order; none asked: the nightly runner's; ``all``: every one."""
    asked = [t.strip() for item in (requested or []) for t in item.split(",") if t.strip()]
    unknown = [t for t in asked if t != tools.ALL and t not in tools.TARGETS]
    if unknown:
        raise ValidationFailed([Problem("command line", "", "--target",
                                        f"unknown target {t!r} (have: {', '.join([*tools.TARGETS, tools.ALL])})")
                                for t in unknown])
    if not asked:
        return list(tools.NIGHTLY)
    if tools.ALL in asked:
        return list(tools.TARGETS)
    return [t for t in tools.TARGETS if t in asked]


def needed(targets: Iterable[str], registry: Iterable[Tool] = tools.REGISTRY) -> list[str]:
    wanted = set(targets)
    return [tool.name for tool in registry if wanted & set(tool.needs)]


def version_note(tool: Tool, version: Version | None) -> str:
    applies = [text for since, text in tool.notes if version is not None and version >= since]
    return applies[-1] if applies else ""


def status_of(tool: Tool, probe: Probe) -> str:
    if probe.found is None:
        return MISSING
    if tool.minimum is None:
        return OK
    if probe.version is None:
        return UNKNOWN_VERSION
    return TOO_OLD if probe.version < tool.minimum else OK


def verdict(target: str, probes: Mapping[str, Probe], registry: Iterable[Tool] = tools.REGISTRY) -> TargetVerdict:
    """Pure: one row per tool the target needs, its status from what was found (a missing probe is missing)."""
    rows = []
    for tool in registry:
        need = tool.needs.get(target)
        if need is None:
            continue
        probe = probes.get(tool.name, Probe(tool.name, None))
        status = status_of(tool, probe)
        rows.append(Row(tool.name, tool.label, need.required, status, need.why, tool.provider.text(), probe.found,
                        probe.version, probe.version_text, tool.minimum, version_note(tool, probe.version)))
    return TargetVerdict(target, tuple(rows))


def decide(targets: Iterable[str], probes: Mapping[str, Probe],
           registry: Iterable[Tool] = tools.REGISTRY) -> list[TargetVerdict]:
    return [verdict(target, probes, registry) for target in targets]


def failure(verdicts: Iterable[TargetVerdict]) -> ToolsMissing | None:
    """The error that ends the run when a target misses a required tool: each named with what provides it."""
    lines = []
    for v in verdicts:
        for row in (r for r in v.rows if r.fails):
            need = f" (needs >= {'.'.join(map(str, row.minimum))})" if row.minimum and row.status != MISSING else ""
            lines.append(f"  - {v.target}: {row.tool} {row.status}{need}: it comes with {row.provides}")
    if not lines:
        return None
    return ToolsMissing("required tools missing (nothing was installed):\n" + "\n".join(lines))


def run(requested: Iterable[str] | None) -> list[TargetVerdict]:
    """Gather and decide: probe each tool the targets need once, then the verdict per target."""
    targets = resolve_targets(requested)
    return decide(targets, tools.probe_all(needed(targets)))


def report(verdicts: list[TargetVerdict]) -> dict[str, object]:
    return {"ok": all(v.ok for v in verdicts), "targets": [v.as_dict() for v in verdicts]}


STATUS_STYLE = {OK: "[green]{}[/]", MISSING: "[red]{}[/]", TOO_OLD: "[red]{}[/]", UNKNOWN_VERSION: "[yellow]{}[/]"}


def table(v: TargetVerdict) -> Table:
    """One target's tools: status (an optional tool's absence in yellow, never red), version, where, provider."""
    t = Table(title=f"{v.target}: {tools.TARGETS[v.target]}", title_justify="left")
    for col in ("tool", "status", "version", "found at", "provided by", "needed for"):
        t.add_column(col, overflow="fold")
    for row in v.rows:
        style = STATUS_STYLE[row.status] if row.required or row.status == OK else "[yellow]{}[/]"
        status = styled(style, row.status if row.required else f"{row.status} (optional)")
        version = ".".join(map(str, row.version)) if row.version else ("present" if row.found else "-")
        if row.minimum and row.status in (TOO_OLD, UNKNOWN_VERSION):
            version += f" (needs >= {'.'.join(map(str, row.minimum))})"
        t.add_row(row.tool, status, version + (f"; {row.note}" if row.note else ""), row.found or "-",
                  tools.get(row.tool).provider.short(), row.why)
    return t
