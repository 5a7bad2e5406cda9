"""Every command the README and docs/ tell a reader to type exists: each `invoke ...` (or `image-factory ...`) line
names tasks and flags of the collection `invoke --help TASK` describes, each `./dev X` a subcommand of ./dev.
A renamed task or flag fails here, not in the reader's terminal."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from invoke import Program
from invoke.parser import ParserContext

from image_factory.settings import REPO_ROOT

from .test_cli import collection

pytestmark = pytest.mark.unit

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
PROGRAMS = ("invoke", ".venv/bin/invoke", "image-factory")
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "2>&1", "#"}
FILE_SUFFIXES = (".json", ".md", ".yml", ".yaml", ".txt", ".pem", ".qcow2", ".tf", ".xml", ".log")
TASK_LIKE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z][a-z0-9-]*$")


def commands(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, command) for each command in a fenced block line or an inline code span."""
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        candidates = [line.strip().removeprefix("$ ")] if fenced else re.findall(r"`([^`]+)`", line)
        for text in candidates:
            text = text.replace("\\|", "|")
            if text.split(" ", 1)[0] in (*PROGRAMS, "./dev"):
                yield number, text


def words(command: str) -> list[str]:
    """The command's words up to the first shell operator, brackets of optional parts removed."""
    out = []
    for word in command.split():
        if word in SHELL_OPERATORS or word.startswith("#"):
            break
        stop = word.endswith(";")
        word = word.rstrip(";").strip("[]")
        if word:
            out.append(word)
        if stop:
            break
    return out


CONTEXTS: dict[str, ParserContext] = {c.name: c for c in collection().to_contexts()}
CORE = ParserContext(args=Program().core_args())


def problems_of(command: str) -> list[str]:
    program, *rest = words(command)
    if program == "./dev":  # alone, it names the script
        return [] if not rest or rest[0] in dev_subcommands() else [f"./dev has no subcommand {rest[0]!r}"]
    found: list[str] = []
    task: ParserContext | None = None
    wants_value = False
    positional_left = 0
    for word in rest:
        if word.startswith("-") and len(word) > 1:
            flag = word.split("=", 1)[0]
            for where in ((task,) if task else ()) + (CORE,):
                if flag in where.flags or flag in where.inverse_flags:
                    # flags is a Lexicon: short names are aliases, seen by `in` and [] but not by .get()
                    arg = where.flags[flag] if flag in where.flags else None  # noqa: SIM401
                    wants_value = bool(arg and arg.takes_value and "=" not in word)
                    break
            else:
                found.append(f"{flag}: no such flag" + (f" of {task.name}" if task else " of invoke"))
                wants_value = False
            continue
        if word in CONTEXTS:
            task, wants_value = CONTEXTS[word], False
            positional_left = len(task.positional_args)
        elif wants_value:
            wants_value = False
        elif task is None and word == "TASK":  # `invoke TASK -h`: any task, core flags only
            continue
        elif task is None or (TASK_LIKE.match(word) and not word.endswith(FILE_SUFFIXES)):
            found.append(f"{word!r}: no such task")
        elif positional_left:
            positional_left -= 1
        else:
            found.append(f"{word!r}: {task.name} takes no value here")
    return found


def dev_subcommands() -> set[str]:
    text = (REPO_ROOT / "dev").read_text()
    cases = text[text.index('case "$cmd" in'):]
    return {name for label in re.findall(r"^\s+([a-z|]+)\)", cases, re.MULTILINE) for name in label.split("|")}


ALL = [(path, number, command) for path in DOCS for number, command in commands(path)]


def test_the_docs_name_many_commands() -> None:
    """The extraction finds the commands (a parser that finds none would pass everything)."""
    invoked = [c for _, _, c in ALL if c.split(" ", 1)[0] in PROGRAMS]
    assert len(invoked) >= 60, len(invoked)
    assert any(c.startswith("./dev ") for _, _, c in ALL)
    assert problems_of("invoke preflight") == ["'preflight': no such task"]
    assert problems_of("invoke pipeline --json report.json") == ["'report.json': pipeline takes no value here"]
    assert problems_of("invoke pipeline --hypervisor x") == ["--hypervisor: no such flag of pipeline", "'x': pipeline "
                                                             "takes no value here"]
    assert problems_of("invoke publish.template NAME [--hypervisor H] [--dry-run]") == []
    assert problems_of("invoke deploy.vm -n metrics01 --dry-run; echo $?") == []
    assert problems_of("./dev nope") != []


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_every_command_in_the_docs_exists(path: Path) -> None:
    bad = [f"{path.name}:{number}: `{command}`: {'; '.join(problems)}"
           for p, number, command in ALL if p == path and (problems := problems_of(command))]
    assert not bad, "\n".join(bad)


def test_the_readme_is_short_and_leads_to_the_site_path() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    assert "](docs/site.md)" in readme and "](docs/architecture.md)" in readme
