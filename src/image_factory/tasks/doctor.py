"""doctor: which external tools each target needs, found or missing, and what provides them (installs nothing)."""

from __future__ import annotations

from invoke.context import Context

from image_factory import doctor as doctor_stage
from image_factory import tools
from image_factory.console import console, emit_json, styled
from image_factory.tasks._common import handle_errors, json_help, task


@task(
    iterable=["target"],
    help={
        "target": f"what to check: {', '.join(tools.TARGETS)} or {tools.ALL} (repeatable or a comma list; "
                  f"default: {','.join(tools.NIGHTLY)}, what a nightly build runner needs)",
        "json": json_help("every target's tools, found or missing"),
    },
)
@handle_errors
def doctor(c: Context, target: list[str] | None = None, json: bool = False) -> None:
    """List the tools each target needs with the version found and what provides the missing ones; exit 1 if a
    required one is missing (optional ones never fail). Installs nothing and needs no root."""
    verdicts = doctor_stage.run(target)
    if json:
        emit_json(doctor_stage.report(verdicts))
    else:
        for v in verdicts:
            console.print(doctor_stage.table(v))
    problem = doctor_stage.failure(verdicts)
    if problem is not None:
        raise problem
    console.print(styled("[green]ok:[/] every required tool of {} is here", ", ".join(v.target for v in verdicts)))
