"""Command-line option values, checked before a task does anything: a run that turns out to have nothing to do
refuses a bad value all the same, and no host is contacted first.

Each stage names what it accepts (build.ACCELERATORS, upload.ENGINES); these helpers turn a bad value into the
ValidationFailed every other bad input gives (exit code 2), naming the flag and the value."""

from __future__ import annotations

import math
from collections.abc import Iterable

from image_factory.errors import Problem, ValidationFailed

MAX_TIMEOUT = 7 * 24 * 3600  # a week: longer than any task or boot the factory waits for


def one_of(flag: str, value: str, allowed: Iterable[str]) -> str:
    choices = tuple(allowed)
    if value not in choices:
        raise ValidationFailed([Problem(flag, "", "", f"{value!r} is not one of {', '.join(choices)}")])
    return value


def seconds(flag: str, value: float | int | str, maximum: float = MAX_TIMEOUT) -> float:
    """A duration in seconds: a finite number above 0, at most ``maximum``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and 0 < number <= maximum):
        raise ValidationFailed([Problem(flag, "", "", f"{value!r}: must be a number of seconds above 0 and at most "
                                                      f"{maximum:.0f}")])
    return number


def whole_number(flag: str, value: object, minimum: int = 1) -> int:
    """A count given as a flag or a config value: a whole number of at least ``minimum``."""
    try:
        number = int(str(value))
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise ValidationFailed([Problem(flag, "", "", f"{value!r}: must be a whole number of at least {minimum}")])
    return number
