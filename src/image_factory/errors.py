"""Exceptions shared by every stage.

Each carries enough context (file, entry, key, host) for the message alone to say what is wrong
and where; tasks turn them into a non-zero exit without a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class FactoryError(Exception):
    """Base class: a failure the user can act on from its message alone."""

    exit_code = 1


@dataclass(frozen=True)
class Problem:
    """One validation problem, located by file, entry (host or image) and key."""

    file: str
    entry: str
    key: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.entry:
            where += f": {self.entry}"
        if self.key:
            where += f": {self.key}"
        return f"{where}: {self.message}"

    def as_dict(self) -> dict[str, str]:
        return {"file": self.file, "entry": self.entry, "key": self.key, "message": self.message}


class ValidationFailed(FactoryError):
    """The site model (or another input) is invalid; carries every problem found, not just the first."""

    exit_code = 2

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) found:\n{lines}")


def bad_flag(flag: str, message: str) -> ValidationFailed:
    """A command-line mistake: exit 2 like every bad input, named by its flag."""
    return ValidationFailed([Problem("command line", "", flag, message)])


class SecretError(FactoryError):
    """A secret could not be read from the place the configuration names."""


class RemoteError(FactoryError):
    """A hypervisor (API or SSH) refused or failed an operation."""

    def __init__(self, host: str, message: str):
        self.host = host
        self.message = message
        super().__init__(f"{host}: {message}")


class TlsVerificationFailed(RemoteError):
    """The server's certificate did not verify against the pinned CA or fingerprint."""
