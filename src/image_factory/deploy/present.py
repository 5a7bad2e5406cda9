"""Presentation: live progress per VM, the plan and report tables."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from image_factory.console import console, log_line
from image_factory.deploy.model import DeployPlan, DeployReport
from image_factory.site.inventory import Vm


def progress_reporter(enabled: bool, vms: list[Vm]) -> AbstractContextManager[Callable[[str, str], None]]:
    if not enabled:
        return nullcontext(lambda vm, text: None)
    if not console.is_terminal:
        return nullcontext(log_line)  # one timestamped line per VM step: spinners are for terminals

    @contextmanager
    def cm() -> Any:
        with Progress(SpinnerColumn(), TextColumn("{task.fields[vm]:<14}", markup=False),
                      TextColumn("{task.description}", markup=False),
                      TimeElapsedColumn(), console=console, transient=False) as prog:
            ids = {v.name: prog.add_task("planning", vm=v.name, total=None) for v in vms}
            lock = threading.Lock()

            def say(vm: str, text: str) -> None:
                with lock:
                    if vm in ids:
                        prog.update(ids[vm], description=text)
            yield say

    return cm()


def plan_table(plan: DeployPlan) -> Any:
    table = Table(title="deploy plan")
    for col in ("VM", "host", "VMID", "MACs", "template", "action", "details"):
        table.add_column(col, min_width=17 if col == "MACs" else None, overflow="fold")
    for p in plan.vms:
        details = p.reason or "; ".join(str(d) for d in p.diffs)
        if p.notes:
            details = "; ".join(filter(None, [details, *p.notes]))
        if p.placement and p.placement != p.reason:
            details = "; ".join(filter(None, [f"placement: {p.placement}", details]))
        table.add_row(p.vm, p.host or "-", str(p.vmid), "\n".join(p.macs), p.template or "-", p.action, details)
    return table


def report_table(report: DeployReport) -> Any:
    table = Table(title="deploy" + (" (dry run)" if report.dry_run else "") + f": {report.wall_s:.1f}s")
    for col in ("VM", "host", "VMID", "MACs", "template", "state", "details"):
        table.add_column(col, min_width=17 if col == "MACs" else None, overflow="fold")
    for r in report.results:
        p = r.plan
        details = "; ".join(filter(None, [
            r.error, p.reason, "; ".join(str(d) for d in p.diffs) if r.state not in ("created", "recreated") else "",
            f"cleanup: {r.cleanup}" if r.cleanup else "", f"ip {r.address}" if r.address else "", *p.notes, *r.notes,
        ]))
        table.add_row(p.vm, p.host or "-", str(p.vmid), "\n".join(r.macs or p.macs), p.template or "-", r.state,
                      details)
    return table
