"""Reports serialised from their dataclasses: every field, plus the read-only properties a report names.

A stage's report is a dataclass that inherits :class:`Report`; ``to_dict`` walks its fields (nested
reports, dataclasses, lists and dicts included) and adds ``json_properties`` (``ok``, totals), so the
JSON a task prints cannot drift from the type. Durations are rounded to milliseconds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


def as_json(value: Any) -> Any:
    if isinstance(value, Report):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [as_json(v) for v in value]
    if isinstance(value, float):
        return round(value, 3)
    return value


class Report:
    """Mixin for dataclass reports (see the module docstring)."""

    json_properties: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        assert dataclasses.is_dataclass(self), f"{type(self).__name__} must be a dataclass"
        data = {f.name: as_json(getattr(self, f.name)) for f in dataclasses.fields(self)}
        data.update((name, as_json(getattr(self, name))) for name in self.json_properties)
        return data
