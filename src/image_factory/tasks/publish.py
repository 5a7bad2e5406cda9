"""publish.*: tasks (filled by the publish stage)."""

from __future__ import annotations

from invoke.collection import Collection

ns = Collection("publish")
