"""publish against the two-host lab: real sshd + LabPve (fakepve with the PVE 8.4 fidelity layer)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from image_factory.image import manifest as mf
from image_factory.lab import factories
from image_factory.lab.pve import NEWER_PARAMETERS, formats
from image_factory.lab.pytest_plugin import NODE_RELEASE_IDS, NODE_RELEASES, LabHandle
from image_factory.lab.spec import RELEASES, version_tuple
from image_factory.ownership import marker_block
from image_factory.publish import (
    PublishError,
    publish_image,
)
from image_factory.pve.client import PveClient
from image_factory.pve.templates import FACTORY_TAG, find_templates, newest_template, parse_description
from image_factory.pve.upload import partial_name
from image_factory.settings import Settings
from image_factory.site.inventory import Site

pytestmark = pytest.mark.lab
IMAGE = "debian-lab"


def make_build(builds: Path, *, build_id: str, mib: int = 4, tested: bool = True, seed: int = 0,
               recipe: str = "", packages_digest: str = "") -> mf.Manifest:
    """A random-content qcow2 (valid for qemu-img, incompressible) and its manifest."""
    d = builds / IMAGE
    d.mkdir(parents=True, exist_ok=True)
    art = factories.qcow2_of(os.urandom(mib * 1024 * 1024), d / "debian-lab.qcow2")
    m = factories.manifest_of(
        art, IMAGE, build_id=build_id, tested=tested or None,
        fingerprint=hashlib.sha256(f"{build_id}{seed}".encode()).hexdigest(),
        git={"commit": "abc123", "dirty": False}, started_at="2026-11-25T11:00:00Z",
        finished_at="2026-11-25T11:10:00Z", recipe=recipe,
        contents={"packages_digest": packages_digest, "packages": 3} if packages_digest else None,
    )
    m.artifact.path = art.name
    mf.save(d, m)
    return m


@pytest.fixture
def env(fresh_lab: LabHandle, tmp_path: Path) -> tuple[LabHandle, Settings, Site]:
    settings = dataclasses.replace(fresh_lab.settings, builds_dir=tmp_path / "builds")
    return fresh_lab, settings, fresh_lab.site


def clients(lab: LabHandle) -> dict[str, PveClient]:
    return {name: PveClient(hv) for name, hv in lab.hypervisors.items()}


def snapshot(lab: LabHandle) -> dict[str, Any]:
    """Everything publish may change: VM configs and import directory listings, per host."""
    out: dict[str, Any] = {}
    for name, c in clients(lab).items():
        vms = {int(v["vmid"]): c.vm_config(int(v["vmid"])) for v in c.list_vms()}
        files = sorted(p.name for p in lab.paths.import_dir(name).iterdir())
        out[name] = {"vms": vms, "files": files}
    return out


def test_publish_both_hosts_matches_pve_facts_and_rerun_changes_nothing(env: Any) -> None:
    lab, settings, site = env
    m = make_build(settings.builds_dir, build_id="20261125-1200-a1")
    report = publish_image(settings, site, IMAGE, progress=False)
    assert report.ok, report.to_dict()
    assert {h.action for h in report.hosts} == {"created"}
    assert all(h.bytes_sent >= m.artifact.disk_size for h in report.hosts)
    for name, c in clients(lab).items():
        hv = lab.hv(name)
        h = report.host(name)
        assert h.template_vmid == hv.template_vmids.first
        cfg = c.vm_config(h.template_vmid)
        assert str(cfg["template"]) == "1"
        assert cfg["name"] == "tpl-debian-lab-20261125-1200-a1"
        assert cfg["scsihw"] == "virtio-scsi-pci"
        assert cfg["scsi0"].startswith(f"{hv.storage.images}:") and f"base-{h.template_vmid}-disk-" in cfg["scsi0"]
        assert "cloudinit" in cfg["ide2"]
        assert cfg["boot"] == "order=scsi0"
        assert cfg["serial0"] == "socket" and cfg["vga"] == "serial0"
        assert cfg["agent"] in ("enabled=1", "1")
        assert cfg["ostype"] == "l26"
        assert f"bridge={hv.bridge}" in cfg["net0"]
        tags = cfg["tags"].split(";")
        assert tags == sorted(tags)
        assert {FACTORY_TAG, "debian-lab", "debian-12", "build-20261125-1200-a1", "tested"} <= set(tags)
        meta = parse_description(cfg["description"])
        assert meta and meta["digest"] == m.digest and meta["sha256"] == m.artifact.sha256
        assert meta["image_test"].startswith("passed")
        assert len(cfg["description"].encode()) <= 8192
        # The verified import file stays under its final name, nothing partial remains.
        imports = lab.paths.import_dir(name)
        assert (imports / "debian-lab-20261125-1200-a1.qcow2").is_file()
        assert not (imports / partial_name("debian-lab-20261125-1200-a1.qcow2")).exists()
        found = find_templates(c, IMAGE)
        assert [t.vmid for t in found] == [h.template_vmid] and found[0].tested
        assert newest_template(c, IMAGE) == found[0]

    before = snapshot(lab)
    again = publish_image(settings, site, IMAGE, progress=False)
    assert again.ok
    assert {h.action for h in again.hosts} == {"unchanged"}
    assert again.bytes_sent == 0
    assert snapshot(lab) == before


def test_publish_sends_the_84_node_only_what_its_schema_defines(env: Any) -> None:
    """The product never sends an 8.4 node a parameter or a property-string sub-key only 9.x's qemu-server defines
    (the lab's 8.4 node would refuse it: lab.pve.NEWER_PARAMETERS, lab.pve.formats): every parameter of every call
    a publish makes is checked, each property string parsed with 8.4's own format."""
    lab, settings, site = env
    sent: list[tuple[str, str, dict[str, Any]]] = []

    class Recording(PveClient):
        def call(self, method: str, path: str, /, **params: Any) -> Any:
            sent.append((method, path, dict(params)))
            return super().call(method, path, **params)

    make_build(settings.builds_dir, build_id="schema1")
    report = publish_image(settings, site, IMAGE, hypervisors=["pve-mgmt"], progress=False,
                           client_factory=lambda hv: Recording(hv, timeout=30))
    assert report.ok and report.host("pve-mgmt").action == "created", report.to_dict()
    newer = {name for params in NEWER_PARAMETERS.values() for name in params}
    assert any(method == "POST" and path.endswith("/qemu") for method, path, _ in sent)
    assert [(m, p, set(params) & newer) for m, p, params in sent if set(params) & newer] == []
    walked = {key for _, _, params in sent for key in params if formats.format_of(key)}
    assert walked >= {"scsi0", "ide2", "net0", "agent", "boot", "vga"}, walked
    release = RELEASES[lab.config.host("pve-mgmt").pve_version]
    assert [(m, p, refused) for m, p, params in sent
            if (refused := formats.check_property_strings(params, version_tuple(release.qemu_server),
                                                          version_tuple(release.common)))] == []


def test_dry_run_prints_plan_and_changes_nothing(env: Any) -> None:
    lab, settings, site = env
    make_build(settings.builds_dir, build_id="b1")
    before = snapshot(lab)
    report = publish_image(settings, site, IMAGE, dry_run=True, progress=False)
    assert report.ok
    for h in report.hosts:
        assert h.action == "planned"
        assert h.plan["action"] == "create" and h.plan["upload"] == "upload"
        assert h.plan["vmid"] == lab.hv(h.host).template_vmids.first
        assert h.bytes_sent == 0
    assert snapshot(lab) == before


def test_untested_artifact_refused_unless_forced(env: Any) -> None:
    lab, settings, site = env
    make_build(settings.builds_dir, build_id="u1", tested=False)
    before = snapshot(lab)
    with pytest.raises(PublishError, match="no passing image test"):
        publish_image(settings, site, IMAGE, progress=False)
    assert snapshot(lab) == before
    report = publish_image(settings, site, IMAGE, hypervisors=["pve-tenant"], force_untested=True, progress=False)
    assert report.ok and report.forced_untested and report.to_dict()["forced_untested"]
    c = PveClient(lab.hv("pve-tenant"))
    cfg = c.vm_config(report.host("pve-tenant").template_vmid)
    assert "untested" in cfg["tags"].split(";")
    assert "--force-untested" in cfg["description"]
    assert newest_template(c, IMAGE) is None  # deploy only picks tested templates
    assert newest_template(c, IMAGE, tested_only=False) is not None


def test_artifact_changed_after_build_is_refused(env: Any) -> None:
    lab, settings, site = env
    make_build(settings.builds_dir, build_id="c1")
    art = settings.builds_dir / IMAGE / "debian-lab.qcow2"
    with art.open("r+b") as fh:
        fh.seek(100000)
        fh.write(b"tampered")
    before = snapshot(lab)
    with pytest.raises(PublishError, match="does not match the manifest"):
        publish_image(settings, site, IMAGE, progress=False)
    assert snapshot(lab) == before


@pytest.mark.parametrize("seed", [7, 8])
def test_ssh_cut_mid_upload_resumes_to_matching_sha(env: Any, seed: int, watch_final_name: Any) -> None:
    import random

    lab, settings, site = env
    build_id = f"cut{seed}"
    m = make_build(settings.builds_dir, build_id=build_id, mib=64, seed=seed)
    name = "pve-mgmt"
    part = lab.paths.import_dir(name) / partial_name(f"debian-lab-{build_id}.qcow2")
    final = lab.paths.import_dir(name) / f"debian-lab-{build_id}.qcow2"
    at = int(m.artifact.disk_size * random.Random(seed).uniform(0.1, 0.9))
    # The final name must only ever hold the complete file.
    with watch_final_name(final, m.artifact.disk_size) as bad, lab.cut_ssh_when(name, part, min_bytes=at) as info:
        report = publish_image(settings, site, IMAGE, hypervisors=[name], progress=False)
    assert info["cut"] >= 1, "the hook must have cut the upload"
    h = report.host(name)
    assert report.ok, report.to_dict()
    assert h.action == "created"
    assert h.resumed_from and h.resumed_from[0] > 0
    # the cut also killed the session holding the host lock: the run re-took it and re-planned
    assert any("re-took the lock" in w for w in h.warnings), h.warnings
    assert not bad, f"the final name held an incomplete file: sizes {bad[:5]}"
    assert mf.sha256_file(final) == m.artifact.sha256
    assert not part.exists()


def test_lock_held_by_another_publish_is_reported(env: Any) -> None:
    from image_factory.pve.hostlock import HostLock
    from image_factory.pve.sshlink import SshLink

    lab, settings, site = env
    make_build(settings.builds_dir, build_id="lock1")
    hv = lab.hv("pve-mgmt")
    holder = SshLink(hv.name, hv.ssh).connect()
    lock = HostLock(holder, hv.storage.import_dir, "someone-else run 42")
    lock.acquire()
    try:
        before = snapshot(lab)
        r = publish_image(settings, site, IMAGE, hypervisors=["pve-mgmt"], lock_wait=1, progress=False)
        h = r.host("pve-mgmt")
        assert not r.ok and "in progress by" in (h.error or "") and "someone-else run 42" in (h.error or "")
        assert h.bytes_sent == 0 and snapshot(lab) == before
    finally:
        lock.release()
        holder.close()
    r = publish_image(settings, site, IMAGE, hypervisors=["pve-mgmt"], lock_wait=5, progress=False)
    assert r.ok and r.host("pve-mgmt").action == "created"


def test_faults_on_create_and_template_clean_up_and_rerun_converges(env: Any) -> None:
    lab, settings, site = env
    make_build(settings.builds_dir, build_id="f1")
    name = "pve-tenant"
    hv = lab.hv(name)
    c = PveClient(hv)
    # 1. create refused
    lab.fail(name, "POST", f"/nodes/{hv.node}/qemu", status=500, message="injected create failure", times=1)
    r1 = publish_image(settings, site, IMAGE, hypervisors=[name], progress=False)
    assert not r1.ok and "injected create failure" in (r1.host(name).error or "")
    assert c.list_vms() == []
    # 2. template conversion refused: the VM this run created is destroyed again
    vmid = hv.template_vmids.first
    lab.fail(name, "POST", f"/nodes/{hv.node}/qemu/{vmid}/template", status=500,
             message="injected template failure", times=1)
    r2 = publish_image(settings, site, IMAGE, hypervisors=[name], progress=False)
    h2 = r2.host(name)
    assert not r2.ok and "injected template failure" in (h2.error or "")
    assert any("destroyed half-made VM" in x for x in h2.cleaned_up)
    assert h2.bytes_sent == 0  # the verified import file from run 1 was kept and reused
    assert c.list_vms() == []
    # 3. no faults: converges
    r3 = publish_image(settings, site, IMAGE, hypervisors=[name], progress=False)
    assert r3.ok and r3.host(name).action == "created" and r3.host(name).bytes_sent == 0
    assert [t.vmid for t in find_templates(c, IMAGE)] == [vmid]


def test_api_transport_and_upload_fault(env: Any) -> None:
    lab, settings, site = env
    m = make_build(settings.builds_dir, build_id="api1")
    name = "pve-mgmt"
    hv = lab.hv(name)
    lab.fail(name, "POST", f"/nodes/{hv.node}/storage/{hv.storage.import_}/upload", status=500,
             message="injected upload failure", times=1)
    r1 = publish_image(settings, site, IMAGE, hypervisors=[name], transport="api", progress=False)
    assert not r1.ok and "injected upload failure" in (r1.host(name).error or "")
    assert PveClient(hv).list_vms() == []
    assert not (lab.paths.import_dir(name) / "debian-lab-api1.qcow2").exists()
    r2 = publish_image(settings, site, IMAGE, hypervisors=[name], transport="api", progress=False)
    assert r2.ok, r2.to_dict()
    assert r2.host(name).action == "created" and r2.host(name).bytes_sent >= m.artifact.disk_size
    assert mf.sha256_file(lab.paths.import_dir(name) / "debian-lab-api1.qcow2") == m.artifact.sha256


def test_concurrent_publishes_make_one_template(env: Any) -> None:
    lab, settings, site = env
    make_build(settings.builds_dir, build_id="cc1", mib=16)
    reports: list[Any] = []

    def run() -> None:
        reports.append(publish_image(settings, site, IMAGE, hypervisors=["pve-mgmt"], progress=False))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.ok for r in reports), [r.to_dict() for r in reports]
    assert sorted(r.host("pve-mgmt").action for r in reports) == ["created", "unchanged"]
    c = PveClient(lab.hv("pve-mgmt"))
    assert len(c.list_vms()) == 1


def test_a_rebuild_with_the_same_packages_and_recipe_publishes_nothing(env: Any) -> None:
    """Content-addressed: an upstream epoch moved, the rebuild installed the same packages from the same
    recipe (a new sha256 all the same: builds are not bit-reproducible), so the template stays current."""
    lab, settings, site = env
    make_build(settings.builds_dir, build_id="n1", seed=1, recipe="r" * 64, packages_digest="p" * 64)
    first = publish_image(settings, site, IMAGE, progress=False)
    assert first.ok and {h.action for h in first.hosts} == {"created"}
    make_build(settings.builds_dir, build_id="n2", seed=2, recipe="r" * 64, packages_digest="p" * 64)
    before = snapshot(lab)
    second = publish_image(settings, site, IMAGE, progress=False)
    assert second.ok and {h.action for h in second.hosts} == {"unchanged"} and second.bytes_sent == 0
    assert all(h.template_vmid == first.host(h.host).template_vmid for h in second.hosts)
    assert all("same packages from the same recipe" in " ".join(h.notes) for h in second.hosts)
    assert snapshot(lab) == before
    make_build(settings.builds_dir, build_id="n3", seed=3, recipe="r" * 64, packages_digest="q" * 64)
    third = publish_image(settings, site, IMAGE, progress=False)  # one package changed: a new template
    assert third.ok and {h.action for h in third.hosts} == {"created"}


@pytest.mark.parametrize("name", ["pve-mgmt", "pve-tenant"], ids=["dir", "lvm-thin"])
def test_retention_keeps_newest_and_templates_with_linked_clones(env: Any, name: str) -> None:
    """On dir storage a linked clone names its base volume; on LVM-thin (the tenant host) it does not, and
    the factory's marker on the clone is what keeps its template."""
    lab, settings, site = env
    hv = lab.hv(name)
    c = PveClient(hv)
    vmids = []
    for i in range(3):
        make_build(settings.builds_dir, build_id=f"r{i}", seed=i)
        r = publish_image(settings, site, IMAGE, hypervisors=[name], keep=2, progress=False)
        assert r.ok, r.to_dict()
        vmids.append(r.host(name).template_vmid)
    # third publish pruned the first (keep=2) and its import file
    assert [t.vmid for t in find_templates(c, IMAGE)] == [vmids[2], vmids[1]]
    pruned = r.host(name).pruned
    assert [p["vmid"] for p in pruned] == [vmids[0]]
    assert not (lab.paths.import_dir(name) / "debian-lab-r0.qcow2").exists()
    # a linked clone of the older template protects it from pruning
    clone_id = hv.vm_vmids.first
    upid = c.post(f"{c.node_path}/qemu/{vmids[1]}/clone", newid=clone_id, name="linked", full=0)
    c.wait_task(upid)
    thin = hv.storage.images == "local-lvm"
    assert ("base-" in c.vm_config(clone_id)["scsi0"]) is not thin
    if thin:
        c.put(f"{c.node_path}/qemu/{clone_id}/config", description=marker_block(
            vm_name="linked", vmid=clone_id, template=f"tpl-{vmids[1]}", template_vmid=vmids[1], run_id="r",
            incomplete=False))
    make_build(settings.builds_dir, build_id="r3", seed=3)
    r = publish_image(settings, site, IMAGE, hypervisors=[name], keep=1, progress=False)
    assert r.ok, r.to_dict()
    h = r.host(name)
    assert [p["vmid"] for p in h.pruned] == [vmids[2]]
    assert h.kept_for_linked_clones == {str(vmids[1]): [clone_id]}
    assert {t.vmid for t in find_templates(c, IMAGE)} == {vmids[1], h.template_vmid}


def test_unknown_host_key_and_wrong_tls_pin_refused_with_zero_bytes(env: Any) -> None:
    lab, settings, site = env
    make_build(settings.builds_dir, build_id="k1")
    mg, tn = lab.hv("pve-mgmt"), lab.hv("pve-tenant")
    other_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBIKjPbOcAwqThWzRa5Ex/b92J/o3wlQ7KdlVFOwg5BD"
    bad_ssh = mg.model_copy(update={"ssh": mg.ssh.model_copy(update={"host_key": other_key})})
    bad_tls = tn.model_copy(update={"tls_ca_file": None, "tls_fingerprint": ":".join(["AB"] * 32)})
    bad_site = dataclasses.replace(site, hypervisors={"pve-mgmt": bad_ssh, "pve-tenant": bad_tls})
    report = publish_image(settings, bad_site, IMAGE, progress=False)
    assert not report.ok
    assert "does not match the key pinned" in (report.host("pve-mgmt").error or "")
    assert "TLS" in (report.host("pve-tenant").error or "")
    assert report.bytes_sent == 0
    for name in ("pve-mgmt", "pve-tenant"):
        assert [p.name for p in lab.paths.import_dir(name).iterdir() if not p.name.startswith(".image-factory")] == []
    assert all(c.list_vms() == [] for c in clients(lab).values())


def test_wrong_ca_file_refused_with_zero_bytes(env: Any, tmp_path: Path) -> None:
    lab, settings, site = env
    make_build(settings.builds_dir, build_id="ca1")
    ca = tmp_path / "other-ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(tmp_path / "other-ca.key"), "-out", str(ca), "-subj", "/CN=not the lab CA",
                    "-days", "1"], check=True, capture_output=True)
    mg = lab.hv("pve-mgmt")
    bad = mg.model_copy(update={"tls_ca_file": ca, "tls_fingerprint": None})
    report = publish_image(settings, dataclasses.replace(site, hypervisors={"pve-mgmt": bad}), IMAGE,
                           progress=False)
    h = report.host("pve-mgmt")
    assert not report.ok and "TLS verification" in (h.error or "") and h.bytes_sent == 0
    assert list(lab.paths.import_dir("pve-mgmt").iterdir()) == []  # not even the lock file: TLS is checked first


def test_leftovers_of_a_crashed_run_are_cleaned_and_own_partial_resumed(env: Any) -> None:
    lab, settings, site = env
    m = make_build(settings.builds_dir, build_id="crash2", mib=8)
    name = "pve-tenant"
    hv = lab.hv(name)
    c = PveClient(hv)
    imports = lab.paths.import_dir(name)
    # a crashed run of an older build: a partial upload and a half-made (not template) factory VM
    (imports / partial_name("debian-lab-crash1.qcow2")).write_bytes(b"x" * 1000)
    old = make_build(settings.builds_dir / "old", build_id="crash1")
    from image_factory.publish import template_description, template_tags

    upid = c.post(f"{c.node_path}/qemu", vmid=hv.template_vmids.first, name="tpl-debian-lab-crash1",
                  tags=";".join(template_tags(old, True)),
                  description=template_description(old, import_file="debian-lab-crash1.qcow2", tested=True,
                                                   forced=False, run_id="dead", published_at="2026-01-01T00:00:00Z"))
    c.wait_task(upid)
    # and a crashed run of THIS build left the first third of its partial
    art = settings.builds_dir / IMAGE / "debian-lab.qcow2"
    third = art.stat().st_size // 3
    with art.open("rb") as src:
        (imports / partial_name("debian-lab-crash2.qcow2")).write_bytes(src.read(third))
    dry = publish_image(settings, site, IMAGE, hypervisors=[name], dry_run=True, progress=False).host(name)
    assert dry.plan["upload"] == "resume" and dry.plan["partial_bytes"] == third
    assert dry.plan["remove_stale"] == [hv.template_vmids.first]
    assert dry.plan["remove_partials"] == [partial_name("debian-lab-crash1.qcow2")]
    r = publish_image(settings, site, IMAGE, hypervisors=[name], progress=False)
    h = r.host(name)
    assert r.ok, r.to_dict()
    assert h.resumed_from == [third] and h.bytes_sent == art.stat().st_size - third
    assert len(h.cleaned_up) == 2
    assert sorted(p.name for p in imports.iterdir() if not p.name.startswith(".image-factory")) == [
        "debian-lab-crash2.qcow2"]
    assert [t.vmid for t in find_templates(c, IMAGE, include_incomplete=True)] == [h.template_vmid]
    assert mf.sha256_file(imports / "debian-lab-crash2.qcow2") == m.artifact.sha256


def test_storage_lock_timeout_is_retried(env: Any) -> None:
    lab, settings, site = env
    make_build(settings.builds_dir, build_id="lk1")
    name = "pve-mgmt"
    c = PveClient(lab.hv(name))
    lab.time_scale(name, 0.1)  # 10 PVE s lock wait = 1 s
    lab.lock_storage(name, "local", secs=None)  # another worker holds the storage lock...
    released = threading.Event()

    def release_after_first_failure() -> None:  # ...until the first create task has failed on it
        for _ in range(600):
            tasks = c.get(f"{c.node_path}/tasks", typefilter="qmcreate")
            if any(t.get("status") not in (None, "OK", "running") for t in tasks):
                lab.clear_faults(name)
                lab.time_scale(name, 0.1)
                released.set()
                return
            threading.Event().wait(0.1)

    helper = threading.Thread(target=release_after_first_failure, daemon=True)
    helper.start()
    r = publish_image(settings, site, IMAGE, hypervisors=[name], progress=False)
    helper.join(5)
    assert released.is_set()
    assert r.ok, r.to_dict()
    assert r.host(name).action == "created"
    assert any("retrying after a lock timeout" in w for w in r.host(name).warnings), r.host(name).warnings
    assert len(PveClient(lab.hv(name)).list_vms()) == 1


def test_invoke_task_dry_run_and_json(env: Any) -> None:
    import json
    import sys

    lab, settings, site = env
    make_build(settings.builds_dir, build_id="cli1")
    invoke = str(Path(sys.executable).with_name("invoke"))
    run_env = {**os.environ, "INVOKE_FACTORY_BUILDS_DIR": str(settings.builds_dir)}
    base = [invoke, "publish.template", IMAGE, "--inventory", str(lab.settings.inventory)]
    dry = subprocess.run([*base, "--dry-run", "--json"], env=run_env, capture_output=True, text=True,
                         cwd=settings.root)
    assert dry.returncode == 2, dry.stderr  # changes pending
    plan = json.loads(dry.stdout)
    assert plan["dry_run"] and {h["plan"]["action"] for h in plan["hosts"]} == {"create"}
    assert all(c.list_vms() == [] for c in clients(lab).values())
    real = subprocess.run([*base, "--hypervisor", "pve-tenant", "--json", "--keep", "2"], env=run_env,
                          capture_output=True, text=True, cwd=settings.root)
    assert real.returncode == 0, real.stderr
    rep = json.loads(real.stdout)
    assert [h["host"] for h in rep["hosts"]] == ["pve-tenant"] and rep["hosts"][0]["action"] == "created"
    assert rep["keep"] == 2
    current = subprocess.run([*base, "--hypervisor", "pve-tenant", "--dry-run"], env=run_env, capture_output=True,
                             text=True, cwd=settings.root)
    assert current.returncode == 0, current.stderr  # nothing to do
    assert subprocess.run([*base, "--dry-run"], env=run_env, capture_output=True, text=True,
                          cwd=settings.root).returncode == 2, "pve-mgmt still has no template"
    bad = subprocess.run([*base, "--transport", "ftp"], env=run_env, capture_output=True, text=True,
                         cwd=settings.root)
    assert bad.returncode != 0 and "unknown transport" in bad.stderr


@pytest.mark.parametrize(("name", "release"), NODE_RELEASES, ids=NODE_RELEASE_IDS)
def test_lock_lost_during_registration_is_noticed_and_the_host_converges_to_one_template(
        env: Any, name: str, release: str) -> None:
    """Run A's SSH link (which holds the host lock) drops while its create task imports the disk; run B takes
    the lock meanwhile. A must notice before its next write, never undo B's work, re-take the lock and
    re-plan: in the end both runs are ok and the host holds exactly one template of the build. B sees A's
    running task (tasks?source=active) and leaves its VM alone, on every release."""
    from image_factory.pve.sshlink import SshLink

    lab, settings, site = env
    lab.release(name, release)
    m = make_build(settings.builds_dir, build_id="lost1")
    hv = lab.hv(name)
    c = PveClient(hv)
    lab.durations(name, **{"import": 3.0})
    links: list[SshLink] = []

    def link_factory(h: Any) -> SshLink:
        links.append(SshLink(h.name, h.ssh).connect())
        return links[-1]

    out: dict[str, Any] = {}
    a = threading.Thread(target=lambda: out.setdefault("a", publish_image(
        settings, site, IMAGE, hypervisors=[name], progress=False, link_factory=link_factory)))
    a.start()
    deadline = time.monotonic() + 60
    while not any(int(v["vmid"]) in hv.template_vmids for v in c.list_vms()):
        assert time.monotonic() < deadline, "run A never created its VM"
        time.sleep(0.05)
    for link in list(links):
        link.close()  # the drop: A's lock channel dies with its link
    out["b"] = publish_image(settings, site, IMAGE, hypervisors=[name], progress=False, lock_wait=120)
    a.join(180)
    lab.clear_faults(name)
    ra, rb = out["a"].host(name), out["b"].host(name)
    assert out["a"].ok and out["b"].ok, (ra.to_dict(), rb.to_dict())
    vms = c.list_vms()
    templates = [v for v in vms if int(v.get("template") or 0)]
    assert len(templates) == 1 and len(vms) == 1, vms
    assert parse_description(str(c.vm_config(int(templates[0]["vmid"]))["description"]))["digest"] == m.digest
    assert sorted([ra.action, rb.action]) == ["created", "unchanged"], (ra.action, rb.action)
    assert any("lock" in w for w in ra.warnings), ra.warnings
    # B never touched the VM A's task was still importing; A removed its own half-made VM itself
    busy = rb.plan["left_to_running_tasks"]
    assert busy and any(f"destroyed half-made VM {busy[0]}" in x for x in ra.cleaned_up), (ra.cleaned_up, busy)


@pytest.mark.parametrize(("host", "release"), NODE_RELEASES, ids=NODE_RELEASE_IDS)
def test_publish_under_a_datacenter_tag_policy(env: Any, host: str, release: str) -> None:
    """A policy the factory's tags satisfy (free, other tags registered) lets publish create on every release; a
    restrictive one (a list) fails qemu-server 9.2's create task with PVE's reason, and the half-made VM is gone
    (PVE removes it; the run leaves nothing). Before qemu-server 9.2.0 create does not check tags: it lands."""
    lab, settings, site = env
    lab.release(host, release)
    lab.control(host).datacenter(set={"registered-tags": "prod;secret"})
    make_build(settings.builds_dir, build_id="policy1")
    report = publish_image(settings, site, IMAGE, hypervisors=[host], progress=False)
    assert report.ok and {h.action for h in report.hosts} == {"created"}, report.to_dict()
    c = PveClient(lab.hv(host))
    assert c.version()["version"] == release
    lab.control(host).datacenter(set={"user-tag-access": "user-allow=list,user-allow-list=image-factory"})
    make_build(settings.builds_dir, build_id="policy2", seed=1)
    second = publish_image(settings, site, IMAGE, hypervisors=[host], progress=False)
    if release != "9.2.5":  # qemu-server 8.3.12 and 9.1.15 store create's tags unchecked
        assert second.ok and second.host(host).action == "created", second.to_dict()
        return
    with pytest.raises(PublishError):
        second.raise_for_failures()
    failed = publish_image(settings, site, IMAGE, hypervisors=[host], progress=False).host(host)
    assert failed.error and "Sys.Modify for modifying tag 'build-policy2'" in failed.error, failed.to_dict()
    assert "pvesh set /cluster/options --user-tag-access user-allow=free" in failed.error
    assert [int(v["vmid"]) for v in c.list_vms()] == [report.host(host).template_vmid]
