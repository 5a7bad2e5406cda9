"""image.*: tasks (filled by the image stage)."""

from __future__ import annotations

from invoke.collection import Collection

ns = Collection("image")
