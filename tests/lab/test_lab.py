"""The lab itself: both hosts reachable the way production code reaches real hypervisors."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import ssl
import subprocess
import uuid
from pathlib import Path

import pytest

from image_factory.errors import RemoteError
from image_factory.lab import controller
from image_factory.lab.pytest_plugin import LabHandle, start_lab, stop_lab
from image_factory.pve.client import ApiError, PveClient
from image_factory.pve.sshlink import HostKeyMismatch, connect
from image_factory.site.inventory import Hypervisor, SshEndpoint

pytestmark = pytest.mark.lab


def import_blank_disk(hv: Hypervisor, tmp_path: Path, name: str) -> str:
    """A 16 MiB empty qcow2 uploaded into the host's import storage; returns its import-from volume."""
    disk = tmp_path / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    with connect(hv.name, hv.ssh) as link, link.sftp() as sftp:
        sftp.put(str(disk), f"{hv.storage.import_dir}/{name}")
    return f"local:import/{name}"


def test_proxmoxer_with_token_and_tls_reaches_both_nodes_mid_upgrade(lab: LabHandle) -> None:
    """The default lab is a site in the middle of its upgrade: mgmt on 8.4.1, tenant on 9.x."""
    hvs = lab.hypervisors
    assert {hv.tls_ca_file is not None for hv in hvs.values()} == {True, False}, "one CA file, one fingerprint"
    seen = {}
    for hv in hvs.values():
        client = PveClient(hv)
        seen[hv.name] = (client.version()["version"], [n["node"] for n in client.get("/nodes")])
    assert seen == {"pve-mgmt": ("8.4.1", ["pve-mgmt"]), "pve-tenant": ("9.2.5", ["pve-tenant"])}


def test_wrong_token_secret_is_refused(lab: LabHandle) -> None:
    hv = lab.hv("pve-mgmt")
    with pytest.raises(ApiError) as exc:
        PveClient(hv, secret=str(uuid.uuid4())).version()
    assert exc.value.status == 401


def test_token_secret_lives_outside_the_repo_with_mode_0600(lab: LabHandle) -> None:
    """pve-mgmt reads its secret from a 0600 file, pve-tenant from a vaulted inventory value whose vault password
    is a 0600 file: both outside the repository. The vaulted one authenticates (the lab fixture's environment
    names the lab's vault identity, as a site's ansible.cfg or ANSIBLE_VAULT_PASSWORD_FILE would)."""
    mgmt, tenant = lab.hv("pve-mgmt"), lab.hv("pve-tenant")
    assert tenant.token_secret is not None and tenant.token_secret_file is None
    assert mgmt.token_secret_file is not None
    for path in (mgmt.token_secret_file, lab.paths.vault_password):
        assert not str(path.resolve()).startswith(str(lab.settings.root.resolve()) + "/")
        assert path.stat().st_mode & 0o777 == 0o600
    assert PveClient(tenant).version()["version"] == "9.2.5"


def test_lab_ca_is_pve_like_without_key_usage_so_only_non_strict_verification_accepts_it(lab: LabHandle) -> None:
    from cryptography import x509

    ca = x509.load_pem_x509_certificate(lab.paths.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(x509.ExtensionNotFound):
        ca.extensions.get_extension_for_class(x509.KeyUsage)
    hv = lab.hv("pve-mgmt")
    assert hv.tls_ca_file is not None
    relaxed = ssl.create_default_context(cafile=str(hv.tls_ca_file))
    relaxed.verify_flags &= ~ssl.VERIFY_X509_STRICT
    strict = ssl.create_default_context(cafile=str(hv.tls_ca_file))
    strict.verify_flags |= ssl.VERIFY_X509_STRICT
    host = hv.api_url.split("//")[1].split(":")[0]
    with socket.create_connection((host, 8006), timeout=5) as raw, relaxed.wrap_socket(raw, server_hostname=host):
        pass
    with socket.create_connection((host, 8006), timeout=5) as raw, pytest.raises(ssl.SSLCertVerificationError):
        strict.wrap_socket(raw, server_hostname=host)


def test_fingerprint_pin_is_checked(lab: LabHandle) -> None:
    hv = lab.hv("pve-tenant")
    assert hv.tls_fingerprint is not None
    wrong = hv.model_copy(update={"tls_fingerprint": ":".join(["AB"] * 32)})
    with pytest.raises(RemoteError):
        PveClient(wrong).version()


def test_token_is_privilege_separated_and_limited_to_the_listed_privileges(lab: LabHandle) -> None:
    client = PveClient(lab.hv("pve-mgmt"))
    perms = client.get("/access/permissions")
    assert "Sys.Modify" not in perms.get("/", {})
    assert perms["/vms"].keys() >= {"VM.Allocate", "VM.Clone", "VM.PowerMgmt", "VM.Config.Cloudinit"}
    with pytest.raises(ApiError) as exc:  # download-url needs Sys.Modify, which the token lacks
        client.post(f"/nodes/{client.node}/storage/local/download-url", url="https://example.invalid/x.iso",
                    content="iso", filename="x.iso")
    assert exc.value.status == 403


def test_paramiko_with_pinned_host_keys_reaches_both_sshds(lab: LabHandle) -> None:
    keys = set()
    for hv in lab.hypervisors.values():
        with connect(hv.name, hv.ssh) as link:
            assert link.run(["id", "-u"]).stdout.strip() == "0"
        keys.add(hv.ssh.host_key)
    assert len(keys) == 2, "each sshd has its own host key"


def test_sshd_with_another_host_key_is_refused(lab: LabHandle) -> None:
    mgmt, tenant = lab.hv("pve-mgmt"), lab.hv("pve-tenant")
    swapped = SshEndpoint(**{**mgmt.ssh.model_dump(), "host_key": tenant.ssh.host_key})
    with pytest.raises(HostKeyMismatch):
        connect("pve-mgmt", swapped)


def test_file_put_over_sftp_into_import_is_listed_through_the_api(fresh_lab: LabHandle) -> None:
    for hv in fresh_lab.hypervisors.values():
        with connect(hv.name, hv.ssh) as link, link.sftp() as sftp:
            sftp.putfo(io.BytesIO(b"\0" * 4096), f"{hv.storage.import_dir}/probe-{hv.name}.raw")
        content = PveClient(hv).get(f"/nodes/{hv.node}/storage/{hv.storage.import_}/content", content="import")
        assert [(c["volid"], c["size"]) for c in content] == [(f"local:import/probe-{hv.name}.raw", 4096)]


def test_storage_local_has_import_content(lab: LabHandle) -> None:
    client = PveClient(lab.hv("pve-tenant"))
    store = {s["storage"]: s for s in client.get(f"/nodes/{client.node}/storage")}
    assert "import" in store["local"]["content"].split(",")


def test_up_twice_is_harmless_and_down_leaves_no_process(tmp_path: Path) -> None:
    handle, slot_lock = start_lab(tmp_path / "lab", real_boot="all")
    try:
        before = controller.status(handle.base_settings)
        again = controller.up(handle.base_settings)
        after = controller.status(handle.base_settings)
        assert again.config.slot == handle.config.slot
        assert before["hosts"] == after["hosts"]
        assert all(h["sshd_pid"] and h["pve_pid"] for h in after["hosts"].values())
        # a running VM's qemu is one of the lab's processes too
        hv = handle.hv("pve-mgmt")
        volume = import_blank_disk(hv, tmp_path, "empty.qcow2")
        c = PveClient(hv)
        c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=1101, memory=256, scsi0=f"local:0,import-from={volume}",
                   net0="virtio,bridge=vmbr0", timeout=60)
        c.run_task("POST", f"/nodes/{c.node}/qemu/1101/status/start", timeout=60)
        qemu = handle.qemu("pve-mgmt", 1101)
        assert qemu is not None and Path(f"/proc/{qemu['pid']}").exists()
        shown = controller.status(handle.base_settings)["hosts"]["pve-mgmt"]["vms"]
        assert [(v["vmid"], v["status"], v["qemu"]["pid"]) for v in shown] == [(1101, "running", qemu["pid"])]
        ours = controller.leftovers(handle.base_settings)
        assert qemu["pid"] in ours and len(ours) == 5  # 2 sshd, 2 API servers, 1 qemu
        # an API server that dies leaves its qemu behind: lab.down still stops it (tracked by its record)
        pve_pid = after["hosts"]["pve-mgmt"]["pve_pid"]
        os.kill(pve_pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pve_pid, 0)
        assert Path(f"/proc/{qemu['pid']}").exists()
    finally:
        stop_lab(handle, slot_lock)
    assert controller.leftovers(handle.base_settings) == []
    assert not Path(f"/proc/{qemu['pid']}/cmdline").exists() or b"qemu" not in Path(
        f"/proc/{qemu['pid']}/cmdline").read_bytes()
    assert controller.status(handle.base_settings)["up"] is False


def test_vms_and_disks_survive_down_and_up_like_a_rebooted_node(tmp_path: Path) -> None:
    handle, slot_lock = start_lab(tmp_path / "lab", real_boot="none")
    try:
        hv = handle.hv("pve-tenant")
        volume = import_blank_disk(hv, tmp_path, "d.qcow2")
        c = PveClient(hv)
        c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=9000, name="tpl", memory=256,
                   scsi0=f"local:0,import-from={volume}", timeout=60)
        c.run_task("POST", f"/nodes/{c.node}/qemu/9000/template", timeout=60)
        c.run_task("POST", f"/nodes/{c.node}/qemu/9000/clone", newid=2201, name="sandbox01", timeout=60)
        c.run_task("POST", f"/nodes/{c.node}/qemu/2201/status/start", timeout=60)
        before = {vm["vmid"] for vm in c.list_vms()}
        controller.down(handle.base_settings)
        controller.up(handle.base_settings)
        c = PveClient(hv)
        after = {vm["vmid"]: (vm.get("template", 0), vm["status"]) for vm in c.list_vms()}
        assert after == {9000: (1, "stopped"), 2201: (0, "stopped")} and set(before) == set(after)
        volid = c.vm_config(2201)["scsi0"].split(",")[0]
        listed = [v["volid"] for v in c.get(f"/nodes/{c.node}/storage/local/content", content="images")]
        assert volid in listed
        assert (handle.paths.storage_dir("pve-tenant") / "images" / "2201").is_dir()
    finally:
        stop_lab(handle, slot_lock)


def test_nodes_are_independent_and_show_their_own_certificate(lab: LabHandle) -> None:
    from image_factory.lab.pki import cert_fingerprint

    for name, hv in lab.hypervisors.items():
        client = PveClient(hv)
        (node,) = client.get("/nodes")
        assert node["ssl_fingerprint"] == cert_fingerprint(lab.paths.host_dir(name) / "pve-ssl.pem")
        assert [e["type"] for e in client.get("/cluster/status")] == ["node"], "not clustered"
    tenant = lab.hv("pve-tenant")
    assert tenant.tls_fingerprint == cert_fingerprint(lab.paths.host_dir("pve-tenant") / "pve-ssl.pem")


def test_power_actions_drive_the_real_qemu(fresh_lab: LabHandle, tmp_path: Path) -> None:
    if fresh_lab.config.real_boot == "none":
        pytest.skip("lab started with --lab-real-boot=none")
    hv = fresh_lab.hv("pve-tenant")
    volume = import_blank_disk(hv, tmp_path, "blank.qcow2")
    c = PveClient(hv)
    path = f"/nodes/{c.node}/qemu/2990"
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=2990, name="blank", memory=256, start=1,
               scsi0=f"local:0,import-from={volume}", net0="virtio,bridge=vmbr0", timeout=60)
    qemu = fresh_lab.qemu("pve-tenant", 2990)
    assert qemu is not None, "create with start=1 boots the VM"
    qmp = fresh_lab.paths.vms_dir("pve-tenant") / "2990.qmp"
    c.run_task("POST", path + "/status/suspend", timeout=30)
    assert c.get(path + "/status/current")["qmpstatus"] == "paused"
    assert _qmp_status(qmp) == "paused", "the real qemu is stopped"
    c.run_task("POST", path + "/status/resume", timeout=30)
    assert _qmp_status(qmp) == "running"
    c.run_task("POST", path + "/status/reset", timeout=30)
    assert c.get(path + "/status/current")["qmpstatus"] == "running"
    assert fresh_lab.qemu("pve-tenant", 2990)["pid"] == qemu["pid"]  # type: ignore[index]
    c.run_task("POST", path + "/status/stop", timeout=30)
    assert fresh_lab.qemu("pve-tenant", 2990) is None


def _qmp_status(sock_path: Path) -> str:
    import json

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        f = s.makefile("rwb")
        f.readline()
        for cmd in ("qmp_capabilities", "query-status"):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            answer = json.loads(f.readline())
        return str(answer["return"]["status"])
