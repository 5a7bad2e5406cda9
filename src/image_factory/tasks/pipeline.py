"""pipeline and demo: the nightly job and the one-command tour of the whole tool."""

from __future__ import annotations

from invoke.context import Context
from rich.table import Table

from image_factory import options
from image_factory.console import console, emit_json, mask, styled, write_report
from image_factory.lab.demo import DemoReport, run_demo
from image_factory.pipeline import ImageRun, PipelineReport, images_to_run, markdown_summary, run_pipeline
from image_factory.tasks._common import (
    SITE_HELP,
    exit_unless,
    handle_errors,
    json_help,
    settings,
    shared_help,
    site,
    task,
)


def _names(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _json_out(data: dict[str, object], as_json: bool, path: str | None) -> None:
    """--json: the report on stdout; --json-file PATH: the report in a 0600 file."""
    if path:
        console.print(f"report: {write_report(path, data)}")
    if as_json:
        emit_json(data)


def _pipeline_table(report: PipelineReport) -> Table:
    table = Table(title=f"pipeline ({report.total_s:.0f}s)")
    for col in ("image", "status", "build", "tests", "hosts", "bytes sent", "error"):
        table.add_column(col, overflow="fold")
    for run in report.images:
        hosts = run.publish.get("hosts", []) if run.publish else []
        table.add_row(
            run.image,
            styled("[green]ok") if run.status == "ok" else styled("[red]{} ({})", run.status, run.stage),
            str(run.build.get("status", "-")),
            str(run.tests.get("status", "-")),
            ", ".join(f"{h['host']}:{h['action']}:{h.get('template_vmid') or '-'}" for h in hosts) or "-",
            str(sum(int(h.get("bytes_sent", 0)) for h in hosts)),
            run.error or "",
        )
    return table


@task(
    name="pipeline",
    help={
        "images": "comma-separated catalogue images (default: every image a VM of the inventory uses)",
        "hypervisors": "comma-separated hypervisors to publish to (default: all)",
        "force": "rebuild even when the build cache is valid",
        "keep": "templates to keep per image and host (retention)",
        "transport": "upload transport: ssh (default) or api",
        "json": json_help("the report"),
        **shared_help("json_file"),
        **SITE_HELP,
        "skip_preflight": "do not run the publish preflight checks before building",
        "allow_eol": "build images past their end of life (from the archive) instead of refusing them",
        "offline": "do not ask upstream repositories for their state; keep each image's last epochs",
        "summary": "also write a Markdown summary to this path (CI: $GITHUB_STEP_SUMMARY)",
        "list_images": "print the images the pipeline would run (with --images: those) as a JSON list, run nothing",
    },
)
@handle_errors
def pipeline_task(
    c: Context, images: str | None = None, hypervisors: str | None = None, force: bool = False, keep: int = 3,
    transport: str = "ssh", json: bool = False, json_file: str | None = None, inventory: str | None = None,
    catalogue: str | None = None, skip_preflight: bool = False, allow_eol: bool = False, offline: bool = False,
    summary: str | None = None, list_images: bool = False,
) -> None:
    """Nightly job: per image render, build (cache-aware), test, publish to every hypervisor, prune."""
    s, model = site(c, inventory, catalogue)
    if list_images:
        emit_json(images_to_run(model, _names(images)))  # a CI matrix: one job per image
        return
    report = run_pipeline(s, model, _names(images), _names(hypervisors), force=force, keep=keep,
                          transport=transport, preflight=not skip_preflight, allow_eol=allow_eol,
                          offline=offline)
    console.print(_pipeline_table(report))
    _json_out(report.to_dict(), json, json_file)
    if summary:
        with open(summary, "a", encoding="utf-8") as fh:  # appended: CI summaries collect several steps
            fh.write(mask(markdown_summary(report)))
    exit_unless(report.ok)


def _demo_summary(report: DemoReport) -> None:
    table = Table(title="deployed VMs")
    for col in ("VM", "host", "VMID", "MACs", "template", "state", "address"):
        table.add_column(col, overflow="fold")
    for vm in report.deploy.get("vms", []):
        table.add_row(vm["vm"], vm["host"], str(vm["vmid"]), ", ".join(vm["macs"]), str(vm["template"]),
                      vm["state"], str(vm.get("address") or "-"))
    console.print(table)
    console.print("times: " + ", ".join(f"{k} {v:.0f}s" for k, v in report.timings.items()))
    console.print(f"lab left up for inspection: {report.lab_dir} (invoke lab.status / lab.down)")


@task(
    help={
        "real_boot": "VMs that boot a real qemu guest: all, none, or comma-separated names (default metrics01)",
        "teardown": "stop the lab at the end instead of leaving it up for inspection",
        "force": "rebuild the fixture image even when cached",
        "json": json_help("the demo report"),
        **shared_help("json_file"),
        "timeout": "seconds to wait for each VM to become ready",
    }
)
@handle_errors
def demo(c: Context, real_boot: str = "metrics01", teardown: bool = False, force: bool = False,
         json: bool = False, json_file: str | None = None, timeout: float = 600.0) -> None:
    """Whole path on one machine: lab up, base image, build, test, publish to 2 hosts, deploy, prove."""
    options.seconds("--timeout", timeout)
    boot: str | list[str] = real_boot if real_boot in ("all", "none") else (_names(real_boot) or "none")
    report = run_demo(settings(c), real_boot=boot, teardown=teardown, force=force, timeout=timeout)
    if report.pipeline:
        data = report.pipeline
        runs = [ImageRun(**run) for run in data.get("images", [])]
        console.print(_pipeline_table(PipelineReport(data["started_at"], data["finished_at"], data["total_s"], runs)))
    _demo_summary(report)
    _json_out(report.to_dict(), json, json_file)
    exit_unless(report.ok)
