"""build.*: tasks (filled by the build stage)."""

from __future__ import annotations

from invoke.collection import Collection

ns = Collection("build")
