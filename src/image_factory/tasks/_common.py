"""Glue shared by the task modules: settings from invoke config, the shared help texts, the one error path
(FactoryError to a message and an exit code; a failed report to a non-zero exit)."""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit, ParseError
from invoke.parser import Argument, ParserContext
from invoke.program import Program
from invoke.tasks import Task
from invoke.tasks import task as invoke_task

from image_factory.console import console, styled
from image_factory.errors import FactoryError
from image_factory.preflight import CHECK_GROUPS, run_preflight
from image_factory.settings import Settings
from image_factory.site.inventory import Site, load_site

F = TypeVar("F", bound=Callable[..., Any])

# Short flags are chosen here, never derived: invoke's first-free-letter ones made -o mean --offline,
# --no-compress, --output, --domain or --no-wait depending on the task, and -h shadow --help. A letter means
# the same flag in every task that has it; every other flag is long only (so is everything that can destroy
# infrastructure), and -h is always help.
SHORT_FLAGS = {"inventory": "i", "name": "n"}

# The help of every flag that several tasks share, written once so it reads the same in each (a task with a
# different meaning for the name writes its own).
FLAG_HELP = {
    "inventory": "Ansible inventory file or directory (default: factory.inventory)",
    "catalogue": "image catalogue YAML (default: factory.images)",
    "json_file": "also write the JSON report to this file (0600, secrets masked)",
    "lab_dir": "lab directory (default: factory.lab_dir, .lab in the repository)",
}


def shared_help(*flags: str) -> dict[str, str]:
    """The shared help texts of these flags, for a task's ``help={...}``."""
    return {flag: FLAG_HELP[flag] for flag in flags}


INVENTORY_HELP = FLAG_HELP["inventory"]
SITE_HELP = shared_help("inventory", "catalogue")
JSON_FILE_HELP = FLAG_HELP["json_file"]
PLAN_EXIT_CODES = "exit 0: nothing to do, 2: changes pending, 1: blocked or an error"


def json_help(what: str) -> str:
    """--json in every task: JSON on stdout, tables and progress on stderr."""
    return f"print {what} as JSON on stdout (tables and progress go to stderr)"


def dry_run_help(what: str) -> str:
    return f"{what}; change nothing ({PLAN_EXIT_CODES})"


HELP_FLAGS = ("-h", "--help")


NUMBER_KINDS = {int: "a whole number", float: "a number"}


class NumberArgument(Argument):
    """A number-typed flag: invoke casts its value while parsing and lets the ValueError escape as a traceback.
    This makes it invoke's own parse error, as an unknown flag is (exit 1, also for a plan, where 2 would read
    as "changes pending"), naming the flag and the value, before any task runs."""

    def set_value(self, value: Any, cast: bool = True) -> None:
        try:
            super().set_value(value, cast)
        except ValueError:
            flag = f"--{(self.name or '').replace('_', '-')}"
            raise ParseError(f"error: {flag}: {value!r} is not {NUMBER_KINDS.get(self.kind, 'a number')}") from None


class FactoryTask(Task):
    """invoke's Task with the project's short flags (SHORT_FLAGS) instead of first-free-letter ones, and
    -h/--help answered even where invoke would take it for a positional argument."""

    full_name: str | None = None  # the dotted name in the whole collection (name_tasks), for help's usage line

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["auto_shortflags"] = False
        super().__init__(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # invoke hands a task's first tokens to its positional arguments before it looks for core flags, so
        # `invoke publish.template -h` arrives here as name="-h": a request for help, never an image's name.
        if any(isinstance(kwargs.get(p), str) and kwargs[p] in HELP_FLAGS for p in self.positional):
            self.print_help()
            return None
        return super().__call__(*args, **kwargs)

    def print_help(self) -> None:
        """What `invoke --help TASK` prints (invoke's own printer needs the whole program around it)."""
        name = self.full_name or self.name
        options = ParserContext(name=name, args=self.get_arguments()).help_tuples()
        binary = os.path.basename(sys.argv[0]) or "invoke"
        print(f"Usage: {binary} [--core-opts] {name} {'[--options] ' if options else ''}[other tasks here ...]")
        print("\nDocstring:")
        for line in (inspect.getdoc(self) or "none").splitlines():
            print(f"  {line}" if line.strip() else "")
        print("\nOptions:")
        if options:
            Program().print_columns(options)
        else:
            print("  none\n")

    def get_arguments(self, ignore_unknown_help: bool | None = None) -> list[Argument]:
        help_texts = dict(self.help)  # invoke pops the texts it uses: the next parse (or --help) needs them again
        try:
            args = super().get_arguments(ignore_unknown_help)
        finally:
            self.help = help_texts
        for arg in args:
            if arg.kind in (int, float):
                arg.__class__ = NumberArgument
            short = SHORT_FLAGS.get(arg.attr_name or arg.name or "")
            if short and short not in arg.names:
                arg.names = (*arg.names, short)
        return args


def task(*args: Any, **kwargs: Any) -> Any:
    """``@task`` for every factory task (see FactoryTask)."""
    kwargs.setdefault("klass", FactoryTask)
    return invoke_task(*args, **kwargs)


def name_tasks(ns: Collection) -> Collection:
    """Tell every factory task its dotted name in the whole collection (help's usage line names it)."""
    for name in ns.task_names:
        task_ = ns[name]
        if isinstance(task_, FactoryTask):
            task_.full_name = name
    return ns


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


def handle_errors(func: F | None = None, *, plan: bool | str = False) -> Any:
    """Turn FactoryError into a message and a non-zero exit, without a traceback.

    ``plan``: the task is a plan (True), or is one when the flag of that name is set ("dry_run"). A plan
    exits with Terraform's detailed codes (see :func:`exit_plan`): 2 means changes pending there, so every
    error of a plan exits 1, whatever its code elsewhere (bad input 2, preflight 3).
    """
    if func is None:
        return functools.partial(handle_errors, plan=plan)
    signature = inspect.signature(func)

    def is_plan(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if isinstance(plan, bool):
            return plan
        return bool(signature.bind_partial(*args, **kwargs).arguments.get(plan))

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FactoryError as exc:
            console.print(styled("[bold red]error:[/] {}", exc))
            raise Exit(code=1 if is_plan(args, kwargs) else exc.exit_code) from None
        except KeyboardInterrupt:
            console.print(styled("[bold red]interrupted[/]"))
            raise Exit(code=130) from None

    return wrapper


def exit_unless(ok: bool, code: int = 1) -> None:
    """End a task non-zero when its report (already shown, saying why) is not ok: the one failure that is no
    FactoryError (those end in :func:`handle_errors`)."""
    if not ok:
        raise Exit(code=code)


def exit_plan(*, blocked: bool, pending: bool) -> None:
    """End a plan with Terraform's detailed exit codes (``terraform plan -detailed-exitcode``).

    0: nothing to do; 2: changes pending (a real run would make them); 1: blocked (a real run would not
    reach the desired state without someone's decision) or an error. Blocked wins over pending.
    """
    if blocked:
        raise Exit(code=1)
    if pending:
        raise Exit(code=2)


def preflight_gate(
    s: Settings, model: Site, hypervisors: list[str] | None, group: str, images: list[str] | None = None,
    transport: str = "ssh",
) -> None:
    """Run the preflight checks a stage relies on; stop with preflight's own messages when one fails."""
    names = hypervisors or list(model.hypervisors)
    console.print(f"preflight ({group}) on {', '.join(names)} ...")
    run_preflight(s, model, names, checks=CHECK_GROUPS[group], images=images,
                  transport=transport).raise_for_failures()
