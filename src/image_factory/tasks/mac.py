"""mac.*: tasks (filled by the mac stage)."""

from __future__ import annotations

from invoke.collection import Collection

ns = Collection("mac")
