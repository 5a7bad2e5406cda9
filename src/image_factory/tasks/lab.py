"""lab.*: tasks (filled by the lab stage)."""

from __future__ import annotations

from invoke.collection import Collection

ns = Collection("lab")
