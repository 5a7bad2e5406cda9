"""Shared pytest configuration: markers are declared in pyproject.toml."""

# The two-hypervisor lab: fixtures `lab` (session) and `fresh_lab` (function), with fault hooks.
pytest_plugins = ["image_factory.lab.pytest_plugin"]
