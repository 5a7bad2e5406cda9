"""deploy.*: tasks (filled by the deploy stage)."""

from __future__ import annotations

from invoke.collection import Collection

ns = Collection("deploy")
