"""Glue shared by the task modules: settings from invoke config, error to exit-code mapping."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from invoke.context import Context
from invoke.exceptions import Exit
from invoke.parser import Argument
from invoke.tasks import Task
from invoke.tasks import task as invoke_task

from ..console import console, styled
from ..errors import FactoryError, ValidationFailed
from ..inventory import Site, load_site
from ..settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

# Short flags mean the same in every task; a flag that can destroy infrastructure has none at all.
FIXED_SHORT_FLAGS = {"inventory": "i"}
LONG_ONLY_FLAGS = frozenset({"i_know_this_is_mgmt", "recreate", "force_untested"})


class FactoryTask(Task):
    """invoke's Task with the project's short-flag rules instead of first-free-letter."""

    def get_arguments(self, ignore_unknown_help: bool | None = None) -> list[Argument]:
        args = super().get_arguments(ignore_unknown_help)
        reserved = set(FIXED_SHORT_FLAGS.values())
        for arg in args:
            key = arg.attr_name or arg.name
            names = [n for n in arg.names if len(n) > 1 or (n not in reserved and key not in LONG_ONLY_FLAGS)]
            if key in FIXED_SHORT_FLAGS:
                names = [n for n in names if len(n) > 1] + [FIXED_SHORT_FLAGS[key]]
            arg.names = tuple(names)
        return args


def task(*args: Any, **kwargs: Any) -> Any:
    """``@task`` for every factory task (see FactoryTask)."""
    kwargs.setdefault("klass", FactoryTask)
    return invoke_task(*args, **kwargs)


def settings(c: Context, **overrides: Any) -> Settings:
    """invoke config section ``factory`` (invoke.yaml, INVOKE_FACTORY_*), then flags."""
    values = dict(c.config.get("factory", {}) or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings.from_mapping(values)


def site(c: Context, inventory: str | None = None, images: str | None = None) -> tuple[Settings, Site]:
    s = settings(c, inventory=inventory, images=images)
    return s, load_site(s.inventory, s.images)


DEFAULT_FEDORA_RELEASE = 45


def fedora_release(c: Context, release: int | None) -> int:
    """--release, else factory.fedora_release (invoke.yaml), else the newest supported release."""
    return int(release or (c.config.get("factory", {}) or {}).get("fedora_release") or DEFAULT_FEDORA_RELEASE)


def handle_errors(func: F) -> F:
    """Turn FactoryError into a message and a non-zero exit, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ValidationFailed as exc:
            console.print(styled("[bold red]error:[/] {}", exc))
            raise Exit(code=exc.exit_code) from None
        except FactoryError as exc:
            console.print(styled("[bold red]error:[/] {}", exc))
            raise Exit(code=exc.exit_code) from None
        except KeyboardInterrupt:
            console.print(styled("[bold red]interrupted[/]"))
            raise Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def preflight_gate(
    s: Settings, model: Site, hypervisors: list[str] | None, group: str, images: list[str] | None = None,
    transport: str = "ssh",
) -> None:
    """Run the preflight checks a stage relies on; stop with preflight's own messages when one fails."""
    from ..preflight import CHECK_GROUPS, run_preflight

    names = hypervisors or list(model.hypervisors)
    console.print(f"preflight ({group}) on {', '.join(names)} ...")
    run_preflight(s, model, names, checks=CHECK_GROUPS[group], images=images,
                  transport=transport).raise_for_failures()
