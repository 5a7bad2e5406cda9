"""Running preflight: one probe per selected hypervisor, in parallel, each running the checks in order."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import image_factory.preflight.catalogue  # noqa: F401 - declares the built-in checks in the registry
from image_factory.errors import RemoteError
from image_factory.fanout import per_host
from image_factory.preflight import registry
from image_factory.preflight.model import (
    CHECK_SPACE,
    CheckResult,
    Outcome,
    PreflightReport,
    SpaceNeed,
    failed,
    generic_hint,
    not_run,
)
from image_factory.preflight.probe import HostProbe
from image_factory.preflight.storage import largest_artifact
from image_factory.pve.client import PveClient
from image_factory.pve.upload import transport_kind
from image_factory.settings import Settings
from image_factory.site.inventory import Hypervisor, Site

DEFAULT_TIMEOUT = 20.0


def run_host(probe: HostProbe, names: Sequence[str]) -> list[CheckResult]:
    """Every named check on one host, in order: a check whose needs did not pass is skipped; a check that raises
    fails alone (one odd answer must not hide the other checks' results)."""
    results: dict[str, CheckResult] = {}
    try:
        for name in names:
            blockers = [p for p in registry.CHECKS[name].needs if p not in results or not results[p].ok]
            outcome = not_run(blockers) if blockers else _run_one(probe, name)
            results[name] = CheckResult(name, outcome.ok, outcome.detail, outcome.hint, outcome.skipped,
                                        outcome.warning)
    finally:
        probe.close()
    return [results[n] for n in names]


def _run_one(probe: HostProbe, name: str) -> Outcome:
    try:
        return registry.CHECKS[name].run(probe)
    except RemoteError as exc:
        return failed(exc.message, generic_hint(probe.hv, exc, name))
    except Exception as exc:  # noqa: BLE001 - one odd answer must not hide the other hosts' results
        return failed(f"unexpected {type(exc).__name__}: {exc}",
                      f"re-run with the same inventory; if it persists, this is a bug in the {name} check")


def run_preflight(
    settings: Settings,
    site: Site,
    hypervisors: Sequence[str | Hypervisor] | None = None,
    *,
    checks: Iterable[str] | None = None,
    images: Sequence[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    client_factory: Callable[[Hypervisor], PveClient] | None = None,
    transport: str = "ssh",
) -> PreflightReport:
    """Run the (read-only) checks on each selected hypervisor in parallel.

    ``hypervisors``: names or Hypervisor objects (default: all; unknown names raise ValidationFailed
    before anything runs).
    ``checks``: names or a group (:data:`PUBLISH_CHECKS`, :data:`DEPLOY_CHECKS`); prerequisites are
    added. ``images``: restrict the space check's "largest artifact" to these images. ``transport``: how
    publish will upload (the space an API upload needs differs, see check_space).
    """
    transport_kind(transport)  # an unknown one is the caller's mistake, not a host's failure
    names_wanted = [h if isinstance(h, str) else h.name for h in hypervisors or ()]
    selected = site.select_hypervisors(names_wanted or None)
    names = registry.expand_checks(checks)
    need = largest_artifact(settings, site, images) if CHECK_SPACE in names else SpaceNeed(0, "")
    probes = {hv.name: HostProbe(site, hv, timeout=timeout, client_factory=client_factory, need=need,
                                 transport=transport, images=tuple(images or ())) for hv in selected}
    report = PreflightReport(checks=names)
    if not probes:
        return report
    # each host's run turns its own failures into check results: every host has one
    done = per_host(probes, lambda probe: run_host(probe, names), name="preflight")
    report.hosts.update(done.results)
    return report
