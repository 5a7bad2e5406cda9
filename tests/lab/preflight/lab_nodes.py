"""Helpers of preflight's lab tests: recording what is sent, the lab's state, and the twin node.

preflight against the two-host lab (real sshd + LabPve per hypervisor).

Faults the running lab can take are injected into it: a CA the node's certificate does not chain
to, a new SSH host key on the node (its sshd key file replaced), `import` content disabled by an
administrator through the root API. Faults that are node properties the lab
has no hook for (PVE version, the role's privileges, a nearly full disk) are injected into a twin of
the node's API: the lab's own LabPve class served in-process, with the lab host's real sshd; the
nearly full disk is a real 64 MiB tmpfs under the twin's storage, staging and import directories.
Every fault must fail with a message naming the host, the check and the fix, and change nothing.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import threading
from typing import Any

import pytest
import requests

from image_factory import preflight as pf
from image_factory.lab.pve import LabPve
from image_factory.lab.pytest_plugin import LabHandle
from image_factory.pve.client import PveClient
from image_factory.settings import Settings
from image_factory.site.inventory import Hypervisor, Site

HOSTS = ("pve-mgmt", "pve-tenant")


class RecordingClient(PveClient):
    """The real client, noting every method it sends (the proof that preflight only reads)."""

    methods: list[str]

    def call(self, method: str, path: str, /, **params: Any) -> Any:
        self.methods.append(method)
        return super().call(method, path, **params)


def recorder() -> tuple[list[str], Any]:
    sent: list[str] = []

    def factory(hv: Hypervisor) -> PveClient:
        client = RecordingClient(hv, timeout=20)
        client.methods = sent
        return client

    return sent, factory


def with_hv(site: Site, name: str, **update: Any) -> Site:
    hv = site.hypervisors[name].model_copy(update=update)
    return dataclasses.replace(site, hypervisors={**site.hypervisors, name: hv})


def storage_tree(lab: LabHandle) -> dict[str, list[str]]:
    out = {}
    for h in HOSTS:
        root = lab.paths.host_dir(h) / "root"
        out[h] = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    return out


def lab_snapshot(lab: LabHandle) -> Any:
    return {h: lab.state(h) for h in HOSTS}, storage_tree(lab)


def assert_failure(report: pf.PreflightReport, host: str, check: str, *in_detail: str, hint: str) -> str:
    """The check failed on that host, with that detail and fix, and the exception message says all three."""
    r = report.result(host, check)
    assert not r.ok and not r.skipped, r
    for text in in_detail:
        assert text in r.detail, r.detail
    assert hint in r.hint, r.hint
    with pytest.raises(pf.PreflightFailed) as info:
        report.raise_for_failures()
    message = str(info.value)
    assert f"{host}: {check}: {r.detail}" in message
    assert f"fix: {r.hint}" in message
    return message


def root_session(lab: LabHandle, host: str) -> tuple[requests.Session, str]:
    """An administrator's session on the lab node (as `pvesm set` on the node would act)."""
    hv = lab.hv(host)
    password = (lab.paths.state_dir / f"{host}.root-password").read_text().strip()
    s = requests.Session()
    s.trust_env = False  # else REQUESTS_CA_BUNDLE would replace the lab CA
    s.verify = str(hv.tls_ca_file)
    base = f"{hv.api_url}/api2/json"
    r = s.post(f"{base}/access/ticket", data={"username": "root@pam", "password": password}, timeout=20)
    r.raise_for_status()
    data = r.json()["data"]
    s.cookies.set("PVEAuthCookie", data["ticket"])
    s.headers["CSRFPreventionToken"] = data["CSRFPreventionToken"]
    return s, base


class Served:
    """A LabPve on its own event loop in a thread (as fakepve's pytest plugin serves FakePve)."""

    def __init__(self, pve: LabPve, cert: str, key: str):
        self.pve = pve
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(pve.start(cert, key))

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        try:
            self.call(self.pve.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@dataclasses.dataclass
class Twin:
    pve: LabPve
    settings: Settings
    site: Site
    host: str

    def writes(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _ in self.pve.requests if m != "GET"]

    def state(self) -> Any:
        p = self.pve
        return (copy.deepcopy({k: {kk: vv for kk, vv in v.items() if kk != "files"} for k, v in p.storages.items()}),
                copy.deepcopy(p.acl), [(vm.vmid, dict(vm.config)) for vm in p.vms], len(p.tasks), p.version)
