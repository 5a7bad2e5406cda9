"""Shared pytest configuration: markers are declared in pyproject.toml."""
