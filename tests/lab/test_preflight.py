"""preflight against the two-host lab (real sshd + LabPve per hypervisor).

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
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from fakepve.certs import make_cert

from image_factory import preflight as pf
from image_factory.image import manifest as mf
from image_factory.lab import factories, sshd
from image_factory.lab.config import playbook_grants
from image_factory.lab.pve import LabPve, NodeSpec
from image_factory.lab.pytest_plugin import LabHandle
from image_factory.lab.spec import RELEASES
from image_factory.pve.client import ApiError, PveClient
from image_factory.pve.sshlink import fingerprint
from image_factory.settings import REPO_ROOT, Settings
from image_factory.site.inventory import Hypervisor, Site

pytestmark = pytest.mark.lab

HOSTS = ("pve-mgmt", "pve-tenant")


# ----------------------------------------------------------------------------------------- helpers


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


# ------------------------------------------------------------------------------------- real lab


def test_prepared_lab_passes_on_both_hosts_and_changes_nothing(fresh_lab: LabHandle):
    before = lab_snapshot(fresh_lab)
    sent, factory = recorder()
    report = pf.run_preflight(fresh_lab.settings, fresh_lab.site, client_factory=factory)
    assert list(report.hosts) == list(HOSTS)
    assert report.checks == pf.ALL_CHECKS
    # The example catalogue's Secure Boot entries ask for Microsoft's 2023 CAs, which PVE 8.4 cannot enrol: the
    # only failing check, on the 8.4 node alone; the 9.2 node makes them.
    failing = {(host, r.name) for host, results in report.hosts.items() for r in results if not r.ok}
    assert failing == {("pve-mgmt", "firmware")}, report.to_dict()
    firmware = report.result("pve-mgmt", "firmware")
    assert "debian-lab-uefi" in firmware.detail and "PVE 8.4.1 cannot" in firmware.detail, firmware.detail
    assert report.result("pve-tenant", "firmware").ok
    bios_only = [name for name, img in fresh_lab.site.images.items() if img.firmware == "bios"]
    report = pf.run_preflight(fresh_lab.settings, fresh_lab.site, client_factory=factory, images=bios_only)
    assert report.ok, report.to_dict()
    assert "vmbr0, vmbr1 present; VLANs 99 carried" in report.result("pve-mgmt", "bridge").detail  # jump01 nic1
    assert "PVE 8.4.1" in report.result("pve-mgmt", "version").detail
    assert "host key matches" in report.result("pve-tenant", "ssh").detail
    assert "pinned fingerprint" in report.result("pve-tenant", "tls").detail  # the lab pins pve-tenant
    assert "CA file" in report.result("pve-mgmt", "tls").detail
    assert set(sent) == {"GET"} and len(sent) >= 2 * 5  # version, permissions, storage, network, guests
    assert lab_snapshot(fresh_lab) == before
    report.raise_for_failures()


def test_a_bridge_that_cannot_carry_a_nics_vlan_is_named(fresh_lab: LabHandle):
    """jump01's second NIC is tagged 99 on vmbr1: the bridge must be VLAN-aware and list 99 in bridge-vids."""
    fresh_lab.bridge_vlans("pve-mgmt", "vmbr1", vids="2-98 100-4094")
    r = pf.run_preflight(fresh_lab.settings, fresh_lab.site, checks=["bridge"]).result("pve-mgmt", "bridge")
    assert not r.ok and r.detail == "bridge vmbr1 carries VLANs 2-98 100-4094, not vlan 99 (jump01 nic1)"
    assert "bridge-vids" in r.hint
    fresh_lab.bridge_vlans("pve-mgmt", "vmbr1", aware=False)
    r = pf.run_preflight(fresh_lab.settings, fresh_lab.site, checks=["bridge"]).result("pve-mgmt", "bridge")
    assert not r.ok and r.detail == "bridge vmbr1 is not VLAN-aware, but vlan 99 (jump01 nic1) use VLAN tags"
    fresh_lab.clear_faults("pve-mgmt")
    assert pf.run_preflight(fresh_lab.settings, fresh_lab.site, checks=["bridge"]).result("pve-mgmt", "bridge").ok


def test_wrong_ca(fresh_lab: LabHandle, tmp_path: Path):
    other_ca = make_cert(str(tmp_path), name="other-ca", hosts=(fresh_lab.config.host("pve-mgmt").address,))[0]
    site = with_hv(fresh_lab.site, "pve-mgmt", tls_ca_file=Path(other_ca))
    before = lab_snapshot(fresh_lab)
    sent, factory = recorder()
    report = pf.run_preflight(fresh_lab.settings, site, client_factory=factory)
    assert_failure(report, "pve-mgmt", "tls", "TLS verification of https://", "CERTIFICATE_VERIFY_FAILED",
                   hint="copy /etc/pve/pve-root-ca.pem from the node over a trusted channel to " + other_ca)
    assert report.result("pve-mgmt", "privileges").skipped  # nothing was asked over an unverified channel
    assert report.result("pve-tenant", "privileges").ok  # the other host is checked independently
    assert set(sent) <= {"GET"}
    assert lab_snapshot(fresh_lab) == before


def test_wrong_fingerprint(fresh_lab: LabHandle):
    site = with_hv(fresh_lab.site, "pve-tenant", tls_fingerprint=":".join(["5A"] * 32))
    report = pf.run_preflight(fresh_lab.settings, site, ["pve-tenant"])
    assert_failure(report, "pve-tenant", "tls", "Fingerprints did not match", hint="set pve.tls_fingerprint")


@pytest.fixture
def rekeyed(fresh_lab: LabHandle, tmp_path: Path) -> Iterator[str]:
    """pve-tenant got a new SSH host key (reinstalled): its sshd now offers a key the inventory does not pin."""
    key = sshd.host_key_path(fresh_lab.paths, "pve-tenant")
    saved = {p: p.read_bytes() for p in (key, key.with_suffix(".pub"))}
    fresh = tmp_path / "new_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "root@pve-tenant", "-f", str(fresh)],
                   check=True)
    key.write_bytes(fresh.read_bytes())  # sshd loads its host key for every new connection
    key.with_suffix(".pub").write_bytes(fresh.with_suffix(".pub").read_bytes())
    try:
        yield fresh.with_suffix(".pub").read_text()
    finally:
        for path, data in saved.items():
            path.write_bytes(data)


def test_changed_host_key(fresh_lab: LabHandle, rekeyed: str):
    before = lab_snapshot(fresh_lab)
    report = pf.run_preflight(fresh_lab.settings, fresh_lab.site)
    message = assert_failure(
        report, "pve-tenant", "ssh", "does not match the key pinned in the inventory", "Refusing to connect",
        fingerprint(*rekeyed.split()[:2]), hint="confirm the new key on its console",
    )
    assert "pve-tenant: ssh: SSH host key of 127.0." in message
    assert report.result("pve-tenant", "space").skipped  # no command was sent to that host
    assert report.result("pve-tenant", "privileges").ok
    assert report.result("pve-mgmt", "ssh").ok
    assert lab_snapshot(fresh_lab) == before


def test_changed_pin(fresh_lab: LabHandle):
    raw = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    ssh = fresh_lab.hv("pve-mgmt").ssh.model_copy(update={"host_key": raw})
    report = pf.run_preflight(fresh_lab.settings, with_hv(fresh_lab.site, "pve-mgmt", ssh=ssh), ["pve-mgmt"])
    assert_failure(report, "pve-mgmt", "ssh", f"pinned {fingerprint(*raw.split()[:2])}",
                   hint="put it in pve.ssh.host_key")


def _root_session(lab: LabHandle, host: str) -> tuple[requests.Session, str]:
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


@pytest.fixture
def import_disabled(fresh_lab: LabHandle) -> Iterator[str]:
    """An administrator disabled `import` content on pve-mgmt's `local` (pvesm set local --content ...)."""
    s, base = _root_session(fresh_lab, "pve-mgmt")
    original = s.get(f"{base}/storage/local", timeout=20).json()["data"]["content"]
    without = ",".join(c for c in original.split(",") if c != "import")
    s.put(f"{base}/storage/local", data={"content": without}, timeout=20).raise_for_status()
    try:
        yield without
    finally:
        s.put(f"{base}/storage/local", data={"content": original}, timeout=20).raise_for_status()


def test_import_content_disabled(fresh_lab: LabHandle, import_disabled: str):
    before = lab_snapshot(fresh_lab)
    sent, factory = recorder()
    report = pf.run_preflight(fresh_lab.settings, fresh_lab.site, client_factory=factory)
    assert_failure(report, "pve-mgmt", "storage", "storage 'local' lacks content type import",
                   hint=f"pvesm set local --content {import_disabled},import")
    assert report.result("pve-tenant", "storage").ok
    assert set(sent) == {"GET"}
    assert lab_snapshot(fresh_lab) == before


def test_invoke_preflight_json_and_exit_codes(fresh_lab: LabHandle, import_disabled: str):
    env = dict(os.environ, INVOKE_FACTORY_INVENTORY=str(fresh_lab.settings.inventory), NO_COLOR="1",
               COLUMNS="250")
    invoke = [sys.executable, "-m", "invoke", "inventory.preflight"]
    ok = subprocess.run([*invoke, "--hypervisor", "pve-tenant", "--json"], capture_output=True, text=True,
                        env=env, cwd=fresh_lab.settings.root, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    data = json.loads(ok.stdout)
    assert data["ok"] is True and list(data["hosts"]) == ["pve-tenant"]
    assert [c["name"] for c in data["hosts"]["pve-tenant"]["checks"]] == list(pf.ALL_CHECKS)

    bad = subprocess.run([*invoke, "--hypervisor", "pve-mgmt", "--checks", "deploy"], capture_output=True,
                         text=True, env=env, cwd=fresh_lab.settings.root, timeout=300)
    assert bad.returncode == 3, bad.stdout + bad.stderr
    table = bad.stderr
    assert "pve-mgmt" in table and "storage" in table and "FAIL" in table
    assert "pvesm set local --content" in table and "import" in table
    assert "preflight failed" in table
    checked = [line.split("│")[2].strip() for line in table.splitlines() if line.count("│") > 3]
    assert "ssh" in checked and "space" not in checked  # deploy takes its host lock over SSH


# ------------------------------------------------------------------------ twin node (in-process)


class _Served:
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


@pytest.fixture
def twin(lab: LabHandle, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Twin]:
    """pve-tenant's API served by an in-process LabPve built from the lab's own node spec (indirect
    parametrisation picks another pve-manager release)."""
    host = "pve-tenant"
    spec = NodeSpec.from_mapping(json.loads((lab.paths.host_dir(host) / "pve.json").read_text()))
    version = getattr(request, "param", spec.version)
    if version != spec.version:  # the grants the playbook gives on that release's major
        storages = [path.split("/")[2] for path in spec.privileges if path.startswith("/storage/")]
        spec = dataclasses.replace(spec, version=version, privileges=playbook_grants(
            REPO_ROOT, version, spec.node, storages))
    cert, key, _ = make_cert(str(tmp_path), name="twin", hosts=("127.0.0.1",))
    root_pw = tmp_path / "root-password"
    root_pw.write_text("twin-root\n")
    spec = dataclasses.replace(
        spec, address="127.0.0.1", port=0, cert=Path(cert), key=Path(key), root_password_file=root_pw,
        storage_dir=tmp_path / "storage", staging_dir=tmp_path / "var-tmp", vms_dir=tmp_path / "vms",
        log_dir=tmp_path / "log", control_socket=tmp_path / "control.sock", time_scale=0.0,
    )
    served = _Served(LabPve(spec), cert, key)
    try:
        site = with_hv(lab.site, host, api_url=f"https://127.0.0.1:{served.pve.port}", tls_ca_file=Path(cert),
                       tls_fingerprint=None)
        settings = dataclasses.replace(lab.settings, builds_dir=tmp_path / "builds")
        yield Twin(served.pve, settings, site, host)
    finally:
        served.stop()


def test_twin_passes_like_the_lab(twin: Twin):
    report = pf.run_preflight(twin.settings, twin.site, [twin.host])
    assert report.ok, report.failures()
    assert twin.writes() == []


def test_pve_version_7_4(twin: Twin):
    twin.pve.version, twin.pve.release_version = "7.4-17", "7.4"
    before = twin.state()
    report = pf.run_preflight(twin.settings, twin.site, [twin.host])
    assert_failure(report, twin.host, "version", "PVE 7.4-17 on pve-tenant is older than 8.4",
                   "`import` uploads need 8.4 or newer", hint="upgrade pve-tenant to Proxmox VE 8.4 or newer")
    assert twin.writes() == [] and twin.state() == before


def test_token_lacking_a_privilege(twin: Twin):
    """The ImageFactory role lacks VM.Config.Cloudinit: neither the user nor its token hold it."""
    acl = twin.pve.acl
    assert acl is not None
    for who in list(acl):
        acl[who] = [(path, {p for p in privs if p != "VM.Config.Cloudinit"}) for path, privs in acl[who]]
    before = twin.state()
    report = pf.run_preflight(twin.settings, twin.site, [twin.host])
    message = assert_failure(
        report, twin.host, "privileges", "token factory@pve!image-factory lacks VM.Config.Cloudinit on /vms",
        hint="pveum acl modify /vms --users factory@pve --tokens 'factory@pve!image-factory' --roles ImageFactory",
    )
    assert "pveum role modify ImageFactory --privs " in message
    assert twin.writes() == [] and twin.state() == before


def test_privilege_missing_from_the_token_acl_only(twin: Twin):
    """PVE reports a privilege-separated token's effective rights: a grant on the user alone does not count."""
    acl = twin.pve.acl
    assert acl is not None
    token = twin.site.hypervisors[twin.host].token_id
    acl[token] = [(path, {p for p in privs if p != "VM.Clone"}) for path, privs in acl[token]]
    assert not twin.pve.allowed(token, "/vms/9001", "VM.Clone")  # the lab itself would refuse the clone
    report = pf.run_preflight(twin.settings, twin.site, [twin.host], checks=["privileges"])
    assert_failure(report, twin.host, "privileges", "lacks VM.Clone on /vms", hint="pveum acl modify /vms")


@pytest.fixture
def small_fs(tmp_path: Path, small_tmpfs: Any) -> Path:
    """A 64 MiB filesystem (tmpfs), 56 MiB of it used: a nearly full disk."""
    mnt = small_tmpfs(tmp_path / "small", 64)
    (mnt / "filler").write_bytes(b"\0" * (56 << 20))
    return mnt


def test_storage_nearly_full(twin: Twin, small_fs: Path):
    """The node's `local` storage, its upload staging dir and import dir all live on a nearly full disk."""
    for sub in ("vz/import", "var-tmp"):
        (small_fs / sub).mkdir(parents=True)
    twin.pve.storages["local"]["path"] = str(small_fs / "vz")  # PVE reports the filesystem under the path
    storage = twin.site.hypervisors[twin.host].storage.model_copy(
        update={"import_dir": str(small_fs / "vz" / "import"), "staging_dir": str(small_fs / "var-tmp")})
    site = with_hv(twin.site, twin.host, storage=storage)
    mf.save(twin.settings.builds_dir / "debian-lab",
            factories.manifest(build_id="b7", virtual_size=2 << 30, disk_size=20 << 20))
    before = twin.state()
    report = pf.run_preflight(twin.settings, site, [twin.host], checks=pf.PUBLISH_CHECKS)
    assert_failure(
        report, twin.host, "space", "import storage 'local' has ",
        " free, the largest artifact needs 20.0 MiB (artifact of debian-lab (build b7))",
        f"filesystem {small_fs} on pve-tenant (holding {small_fs / 'vz' / 'import'}) has ",
        "free, ssh uploads need 20.0 MiB there",
        hint="on storage local of pve-tenant",
    )
    assert twin.writes() == [] and twin.state() == before
    # 34 MiB free: one copy fits (SSH uploads write import/ only), an API upload's two copies do not
    with (small_fs / "filler").open("r+b") as fh:
        fh.truncate(30 << 20)
    twin.pve.storages["local"]["path"] = str(small_fs / "vz")
    assert pf.run_preflight(twin.settings, site, [twin.host], checks=["space"]).result(twin.host, "space").ok
    api = pf.run_preflight(twin.settings, site, [twin.host], checks=["space"], transport="api")
    assert_failure(
        api, twin.host, "space",
        f"filesystem {small_fs} on pve-tenant (holding {small_fs / 'vz' / 'import'} and {small_fs / 'var-tmp'})",
        "api uploads need 2 x 20.0 MiB there", "the API stages the upload and then copies it, both at once",
        hint="or publish with --transport ssh (one copy fewer)",
    )
    assert twin.writes() == [] and twin.state() == before
    assert sorted(p.name for p in small_fs.rglob("*")) == ["filler", "import", "var-tmp", "vz"]  # nothing written


def test_space_counts_the_images_storage(twin: Twin, small_fs: Path):
    """The template's disk is converted from the upload: on a `dir` images storage that is the import storage it
    lands beside the upload (one more copy on that filesystem); on LVM-thin it takes the pool's data space."""
    for sub in ("vz/import", "vz/images", "var-tmp"):
        (small_fs / sub).mkdir(parents=True)
    with (small_fs / "filler").open("r+b") as fh:
        fh.truncate(30 << 20)  # 34 MiB free: one 20 MiB copy fits, two do not
    twin.pve.storages["local"]["path"] = str(small_fs / "vz")
    mf.save(twin.settings.builds_dir / "debian-lab",
            factories.manifest(build_id="b8", virtual_size=2 << 30, disk_size=20 << 20))
    hv = twin.site.hypervisors[twin.host]
    paths = {"import_dir": str(small_fs / "vz" / "import"), "staging_dir": str(small_fs / "var-tmp")}
    thin = with_hv(twin.site, twin.host, storage=hv.storage.model_copy(update=paths))
    assert pf.run_preflight(twin.settings, thin, [twin.host], checks=["space"]).result(twin.host, "space").ok
    twin.pve.storages["local-lvm"]["pool_size"] = 16 << 20  # a 16 MiB pool holding nothing yet
    assert_failure(pf.run_preflight(twin.settings, thin, [twin.host], checks=["space"]), twin.host, "space",
                   "images storage 'local-lvm' (lvmthin pool) has 16.0 MiB free, the template's disk needs 20.0 MiB",
                   hint="free at least 4.0 MiB on storage local-lvm")
    on_dir = with_hv(twin.site, twin.host, storage=hv.storage.model_copy(
        update={**paths, "images": "local", "cloudinit": "local"}))
    assert_failure(pf.run_preflight(twin.settings, on_dir, [twin.host], checks=["space"]), twin.host, "space",
                   f"(holding {small_fs / 'vz' / 'import'} and {small_fs / 'vz' / 'images'})",
                   "ssh uploads need 2 x 20.0 MiB there",
                   "the template's disk is converted into images/ beside the upload", hint="free at least")
    assert twin.writes() == []


# ------------------------------------------------------------------- publish/deploy gate on preflight


@pytest.mark.parametrize("command", [
    ["publish.template", "debian-lab", "--hypervisor", "pve-mgmt"],
    ["deploy.vm", "-n", "metrics01"],
    ["pipeline", "--images", "debian-lab", "--hypervisors", "pve-mgmt"],
])
def test_publish_deploy_and_pipeline_stop_on_preflight_with_its_message(
    fresh_lab: LabHandle, import_disabled: str, command: list[str], tmp_path: Path
):
    """They run the relevant checks first and stop with preflight's own message, before changing anything
    (publish first checks its local inputs: the build is there)."""
    build = tmp_path / "builds/debian-lab"
    build.mkdir(parents=True)
    art = build / "debian-lab.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(art), "16M"], check=True)
    m = factories.manifest_of(art, "debian-lab", build_id="pf1", tested=True)
    m.artifact.path = art.name
    mf.save(build, m)
    before = lab_snapshot(fresh_lab)
    env = dict(os.environ, INVOKE_FACTORY_INVENTORY=str(fresh_lab.settings.inventory), NO_COLOR="1",
               COLUMNS="250", INVOKE_FACTORY_BUILDS_DIR=str(tmp_path / "builds"))
    proc = subprocess.run([sys.executable, "-m", "invoke", *command], capture_output=True, text=True, env=env,
                          cwd=fresh_lab.settings.root, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "pve-mgmt: storage: storage 'local' lacks content type import" in proc.stderr
    assert f"fix: pvesm set local --content {import_disabled},import" in proc.stderr
    assert lab_snapshot(fresh_lab) == before


@pytest.mark.parametrize("twin", list(RELEASES), indirect=True)
def test_datacenter_tag_policy_is_reported(twin: Twin):
    """GET /cluster/options answers everyone, but holds the tag policy only for Sys.Audit on /: without it the
    policy is unknown (a warning, never "free"); with it a restrictive policy is refused with its fix."""
    twin.pve.cluster_options.update({"user-tag-access": "user-allow=list,user-allow-list=factory;mgmt",
                                     "registered-tags": "mgmt;tenant", "tag-style": "ordering=config"})
    first = pf.run_preflight(twin.settings, twin.site, [twin.host], checks=["version", "tags"])
    assert f"PVE {twin.pve.version}" in first.result(twin.host, "version").detail
    r = first.result(twin.host, "tags")
    assert r.ok and r.status == "WARN" and "unknown (needs Sys.Audit on /)" in r.detail  # what the playbook grants
    assert "user-allow=free" not in r.detail and "pvesh get /cluster/options" in r.hint
    token = twin.site.hypervisors[twin.host].token_id
    for who in (token, token.split("!")[0]):
        twin.pve.grant(who, "/", "Sys.Audit")
    report = pf.run_preflight(twin.settings, twin.site, [twin.host], checks=["tags"])
    assert_failure(report, twin.host, "tags", "user-tag-access user-allow=list (factory, mgmt)",
                   "per-build tags (image, build-<id>) are never on the list", "registered-tags holds tenant",
                   "needs Sys.Modify on /",
                   hint="pvesh set /cluster/options --user-tag-access user-allow=free")
    twin.pve.cluster_options.update({"user-tag-access": "user-allow=existing", "registered-tags": "prod"})
    report = pf.run_preflight(twin.settings, twin.site, [twin.host], checks=["tags"])
    assert_failure(report, twin.host, "tags", "user-tag-access user-allow=existing", hint="user-allow=free")
    twin.pve.cluster_options.clear()
    ok = pf.run_preflight(twin.settings, twin.site, [twin.host], checks=["tags"]).result(twin.host, "tags")
    assert ok.status == "ok" and "user-allow=free" in ok.detail
    assert twin.writes() == []


def test_cluster_options_answer_in_pve_managers_shapes(twin: Twin):
    """pve-manager's get_options: console, tag-style and allowed-tags for everyone; all of datacenter.cfg,
    parsed (objects, arrays), with Sys.Audit on / ."""
    from image_factory.pve.client import PveClient

    client = PveClient(twin.site.hypervisors[twin.host])
    twin.pve.cluster_options.update({"user-tag-access": "user-allow=list,user-allow-list=a;b",
                                     "registered-tags": "prod;tenant", "tag-style": "ordering=config",
                                     "keyboard": "de"})
    assert client.cluster_options() == {"tag-style": {"ordering": "config"}, "allowed-tags": ["a", "b"]}
    token = twin.site.hypervisors[twin.host].token_id
    for who in (token, token.split("!")[0]):
        twin.pve.grant(who, "/", "Sys.Audit")
    assert client.cluster_options() == {
        "user-tag-access": {"user-allow": "list", "user-allow-list": ["a", "b"]},
        "registered-tags": ["prod", "tenant"], "tag-style": {"ordering": "config"}, "keyboard": "de",
        "allowed-tags": ["a", "b"]}


def test_pve9_host_upgraded_with_the_84_role_names_what_is_missing(twin: Twin):
    """An 8 -> 9 upgrade without re-running the playbook: PVE 9 dropped VM.Monitor from the stored role and
    nothing gave the VM.GuestAgent.* privileges. Preflight names them with a fix valid on 9; nothing changes."""
    assert twin.pve.version.startswith("9.")
    token = twin.site.hypervisors[twin.host].token_id
    acl = twin.pve.acl
    assert acl is not None
    for who in (token, token.split("!")[0]):
        acl[who] = [(path, {p for p in privs if not p.startswith("VM.GuestAgent.")}) for path, privs in acl[who]]
    before = twin.state()
    report = pf.run_preflight(twin.settings, twin.site, [twin.host], checks=["version", "privileges"])
    assert report.result(twin.host, "version").ok
    message = assert_failure(
        report, twin.host, "privileges", "lacks VM.GuestAgent.Audit, VM.GuestAgent.FileRead on /vms",
        hint=f"pveum role modify ImageFactory --privs {','.join(pf.required_privileges(9))}")
    assert "VM.Monitor" not in message
    assert twin.writes() == [] and twin.state() == before


@pytest.mark.parametrize("twin", ["9.1.19"], indirect=True)
def test_a_pve_91_node_runs_qemu_server_9_1_15(twin: Twin):
    """pve-manager 9.1.19 shipped with qemu-server 9.1.15: create keeps its tags verbatim and does not check the
    tag policy; the config POST locks and checks the policy before it forks (an HTTP 403, not a task failure)."""
    from image_factory.pve.client import PveClient

    c = PveClient(twin.site.hypervisors[twin.host])
    assert c.version()["version"] == "9.1.19"
    twin.pve.cluster_options.update({"user-tag-access": "user-allow=list,user-allow-list=ok"})
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=1990, name="v", memory=512, tags="Zeta;ok", timeout=30)
    assert c.vm_config(1990)["tags"] == "Zeta;ok"
    with pytest.raises(ApiError) as refused:
        c.call("POST", f"/nodes/{c.node}/qemu/1990/config", tags="Zeta;ok;new")
    assert refused.value.status == 403 and "modifying tag 'new'" in refused.value.pve_message
