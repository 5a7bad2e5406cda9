"""Each pve-facts.md item the tool relies on is reproduced by the lab (LabPve over fakepve).

Every test drives the lab through the production client (image_factory.pve.client.PveClient with the
lab inventory's token and TLS settings) or plain HTTP where the wire format is the point.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import paramiko
import pytest
import requests
from requests_toolbelt import MultipartEncoder

from image_factory.lab.pve import NEWER_PARAMETERS
from image_factory.lab.pytest_plugin import NODE_RELEASE_IDS, NODE_RELEASES, LabHandle
from image_factory.lab.spec import release_of
from image_factory.pve.client import ApiError, ConfigChanged, PveClient, TaskFailed, Upid, retry_lock_timeouts
from image_factory.pve.codec import parse_props, parse_tags
from image_factory.pve.sshlink import connect
from image_factory.site.inventory import Hypervisor

pytestmark = pytest.mark.lab

MGMT = "pve-mgmt"
TENANT = "pve-tenant"
# the lab is a site mid-upgrade: pve-mgmt runs pve-manager 8.4.1 (qemu-server 8.3.12), pve-tenant pve-manager
# 9.2.5 (qemu-server 9.2.0)
BOTH_VERSIONS = pytest.mark.parametrize("host", [MGMT, TENANT], ids=["pve-8.4.1", "pve-9.2.5"])
# the done-when scenarios of issue 32 run on every release the lab models: 8.4.1, 9.1.19 (pve-tenant switched to
# it) and 9.2.5
EVERY_RELEASE = pytest.mark.parametrize(("host", "release"), NODE_RELEASES, ids=NODE_RELEASE_IDS)
LAB_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKfXoTQ8mJ2n8jvU4vG0p6Y1sWq3bZr5nH7cLd9eFa2M ansible@deevnet"


def client(lab: LabHandle, host: str = MGMT) -> PveClient:
    return PveClient(lab.hv(host))


def make_qcow2(path: Path, size: str = "64M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def sftp_import(lab: LabHandle, host: str, local: Path, name: str | None = None) -> str:
    hv = lab.hv(host)
    name = name or local.name
    with connect(hv.name, hv.ssh) as link, link.sftp() as sftp:
        sftp.put(str(local), f"{hv.storage.import_dir}/{name}")
    return f"{hv.storage.import_}:import/{name}"


def upload(hv: Hypervisor, c: PveClient, fields: list[tuple[str, Any]]) -> requests.Response:
    enc = MultipartEncoder(fields=fields)
    url = f"{hv.api_url}/api2/json/nodes/{hv.node}/storage/local/upload"
    headers = {"Content-Type": enc.content_type}
    return requests.Session.request(c.session, "POST", url, data=enc, headers=headers, timeout=60)


def disk_file(lab: LabHandle, host: str, volid: str) -> Path:
    sid, name = volid.split(":", 1)
    assert sid == "local"
    parts = name.split("/")
    return lab.paths.storage_dir(host) / "images" / parts[-2] / parts[-1]


def qemu_img_info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)], check=True, capture_output=True)
    info: dict[str, Any] = json.loads(out.stdout)
    return info


def create_template_source(lab: LabHandle, host: str, vmid: int, tmp_path: Path, *, size: str = "64M") -> PveClient:
    """A VM made the way publish makes one: import-from a volid, cloud-init drive, agent."""
    c = client(lab, host)
    volid = sftp_import(lab, host, make_qcow2(tmp_path / f"src-{vmid}.qcow2", size))
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=vmid, name=f"tpl-{vmid}", memory=512, cores=1,
               scsihw="virtio-scsi-pci", scsi0=f"local:0,import-from={volid}", ide2="local:cloudinit",
               boot="order=scsi0", serial0="socket", vga="serial0", agent="enabled=1",
               net0="virtio,bridge=vmbr0", timeout=60)
    return c


# ----------------------------------------------------------------------------- uploads


@BOTH_VERSIONS
def test_upload_content_import_with_checksum_lands_in_import(fresh_lab: LabHandle, tmp_path: Path, host: str) -> None:
    hv, c = fresh_lab.hv(host), client(fresh_lab, host)
    data = make_qcow2(tmp_path / "x.qcow2").read_bytes()
    resp = upload(hv, c, [("content", "import"), ("checksum-algorithm", "sha256"),
                          ("checksum", hashlib.sha256(data).hexdigest()),
                          ("filename", ("fedora-44+build=1.qcow2", io.BytesIO(data), "application/octet-stream"))])
    assert resp.status_code == 200, resp.text
    c.wait_task(resp.json()["data"], timeout=30)
    listed = c.get(f"/nodes/{c.node}/storage/local/content", content="import")
    # PVE rewrites every character outside [a-zA-Z0-9_.-] of an uploaded name, + and = included
    assert [(v["volid"], v["size"]) for v in listed] == [("local:import/fedora-44_build_1.qcow2", len(data))]
    assert (Path(hv.storage.import_dir) / "fedora-44_build_1.qcow2").read_bytes() == data
    assert not (Path(hv.storage.import_dir) / "fedora-44+build=1.qcow2").exists()


@pytest.mark.parametrize(("sent", "kept"), [("bad name.qcow2", "bad_name.qcow2"), ("a+b=c.raw", "a_b_c.raw")])
def test_upload_rewrites_names_then_keeps_them(fresh_lab: LabHandle, sent: str, kept: str) -> None:
    hv, c = fresh_lab.hv(MGMT), client(fresh_lab)
    resp = upload(hv, c, [("content", "import"), ("filename", (sent, io.BytesIO(b"x" * 10), "application/x"))])
    assert resp.status_code == 200, resp.text
    c.wait_task(resp.json()["data"], timeout=30)
    assert [v["volid"] for v in c.get(f"/nodes/{c.node}/storage/local/content", content="import")] == [
        f"local:import/{kept}"]


@pytest.mark.parametrize("name", ["image.img", "image.qcow2.part", "noextension"])
def test_upload_import_refuses_names_outside_pves_rule(fresh_lab: LabHandle, name: str) -> None:
    hv, c = fresh_lab.hv(MGMT), client(fresh_lab)
    resp = upload(hv, c, [("content", "import"), ("filename", (name, io.BytesIO(b"x" * 10), "application/x"))])
    assert resp.status_code == 400
    assert resp.json()["errors"] == {"filename": "invalid filename or wrong extension"}
    assert c.get(f"/nodes/{c.node}/storage/local/content", content="import") == []


@BOTH_VERSIONS
def test_upload_checksum_mismatch_fails_the_task_and_keeps_nothing(fresh_lab: LabHandle, host: str) -> None:
    hv, c = fresh_lab.hv(host), client(fresh_lab, host)
    resp = upload(hv, c, [("content", "import"), ("checksum-algorithm", "sha256"), ("checksum", "0" * 64),
                          ("filename", ("a.raw", io.BytesIO(b"abc"), "application/octet-stream"))])
    with pytest.raises(TaskFailed) as exc:
        c.wait_task(resp.json()["data"], timeout=30)
    assert exc.value.exitstatus.startswith("checksum mismatch: got '")
    assert c.get(f"/nodes/{c.node}/storage/local/content", content="import") == []
    assert list(Path(hv.storage.staging_dir).glob("pveupload-*")) == []


def test_upload_fields_after_the_file_part_are_not_seen(fresh_lab: LabHandle) -> None:
    hv, c = fresh_lab.hv(MGMT), client(fresh_lab)
    resp = upload(hv, c, [("filename", ("a.raw", io.BytesIO(b"abc"), "application/octet-stream")),
                          ("content", "import")])
    assert resp.status_code == 400
    assert "content" in resp.json()["errors"]


@pytest.mark.parametrize("fields", [
    [("checksum-algorithm", "sha256"), ("content", "import")],
    [("content", "import"), ("checksum", "0" * 64), ("checksum-algorithm", "sha256")],
    [("content", "import"), ("comment", "x")],
])
def test_upload_fields_out_of_pves_order_are_refused(fresh_lab: LabHandle, fields: list[tuple[str, str]]) -> None:
    """pve-http-server's multipart parser takes content, checksum-algorithm, checksum in this order before the
    file part; anything else makes a Content-Disposition span two parts, which it refuses."""
    hv, c = fresh_lab.hv(MGMT), client(fresh_lab)
    resp = upload(hv, c, [*fields, ("filename", ("a.raw", io.BytesIO(b"abc"), "application/octet-stream"))])
    assert resp.status_code == 500 and "expected 'form-data'" in resp.text
    assert c.get(f"/nodes/{c.node}/storage/local/content", content="import") == []


def test_upload_names_longer_than_255_and_a_part_after_the_file(fresh_lab: LabHandle) -> None:
    hv, c = fresh_lab.hv(MGMT), client(fresh_lab)
    long = "a" * 252 + ".raw"
    resp = upload(hv, c, [("content", "import"), ("filename", (long, io.BytesIO(b"abc"), "application/x"))])
    assert resp.status_code == 400 and resp.json()["errors"] == {"filename": "value may only be 255 characters long"}
    # a part after the file is written into it (up to the closing boundary): the checksum no longer matches
    resp = upload(hv, c, [("content", "import"), ("checksum-algorithm", "sha256"),
                          ("checksum", hashlib.sha256(b"abc").hexdigest()),
                          ("filename", ("a.raw", io.BytesIO(b"abc"), "application/x")), ("note", "late")])
    with pytest.raises(TaskFailed, match="checksum mismatch"):
        c.wait_task(resp.json()["data"], timeout=30)


def test_upload_without_content_length_is_refused(fresh_lab: LabHandle) -> None:
    hv, c = fresh_lab.hv(MGMT), client(fresh_lab)
    enc = MultipartEncoder(fields=[("content", "import"), ("filename", ("a.raw", io.BytesIO(b"abc"), "x/y"))])
    body = enc.to_string()

    def chunks() -> Any:
        yield body

    url = f"{hv.api_url}/api2/json/nodes/{hv.node}/storage/local/upload"
    headers = {"Content-Type": enc.content_type}
    resp = requests.Session.request(c.session, "POST", url, data=chunks(), headers=headers, timeout=30)
    assert resp.status_code == 400
    assert c.get(f"/nodes/{c.node}/storage/local/content", content="import") == []


# ------------------------------------------------------------------------- import-from


@BOTH_VERSIONS
def test_import_from_volid_makes_a_real_disk_sized_from_the_source(
    fresh_lab: LabHandle, tmp_path: Path, host: str,
) -> None:
    c = create_template_source(fresh_lab, host, 9001, tmp_path, size="96M")
    cfg = c.vm_config(9001)
    assert cfg["scsi0"].startswith("local:9001/vm-9001-disk-0.")
    assert "size=96M" in cfg["scsi0"]
    assert "import-from" not in cfg["scsi0"]
    disk = disk_file(fresh_lab, host, cfg["scsi0"].split(",")[0])
    assert qemu_img_info(disk)["virtual-size"] == 96 * 1024 ** 2


@BOTH_VERSIONS
def test_import_from_an_absolute_path_is_refused_for_an_api_token(
    fresh_lab: LabHandle, tmp_path: Path, host: str,
) -> None:
    c = client(fresh_lab, host)
    src = make_qcow2(tmp_path / "abs.qcow2")
    with pytest.raises(ApiError) as exc:
        c.post(f"/nodes/{c.node}/qemu", vmid=9002, scsi0=f"local:0,import-from={src}")
    assert "Only root can pass arbitrary filesystem paths." in exc.value.pve_message
    assert all(vm["vmid"] != 9002 for vm in c.list_vms())


def test_import_from_a_file_that_is_not_an_image_fails_the_task(fresh_lab: LabHandle, tmp_path: Path) -> None:
    c = client(fresh_lab)
    bogus = tmp_path / "bogus.qcow2"
    bogus.write_bytes(b"this is not a qcow2 image" * 100)
    volid = sftp_import(fresh_lab, MGMT, bogus)
    with pytest.raises(TaskFailed) as exc:
        c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=9003, scsi0=f"local:0,import-from={volid}", timeout=30)
    assert "format" in exc.value.exitstatus
    assert all(vm["vmid"] != 9003 for vm in c.list_vms())
    assert not (fresh_lab.paths.storage_dir(MGMT) / "images" / "9003").exists()


@BOTH_VERSIONS
def test_import_from_refuses_a_qcow2_data_file_and_a_multi_extent_vmdk(
        fresh_lab: LabHandle, tmp_path: Path, host: str) -> None:
    """pve-storage's untrusted-image checks (file_size_info with $untrusted, run by qemu-server on an `import`
    volume): a qcow2 whose data lives in an external file, and a vmdk of several extents, could make the node
    read any file; the create task fails naming the file, and nothing is left. A one-extent vmdk imports."""
    c = client(fresh_lab, host)
    import_dir = Path(fresh_lab.hv(host).storage.import_dir)
    data_file = tmp_path / "elsewhere.raw"  # e.g. /etc/shadow on a real attack
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data_file}",
                    str(tmp_path / "ext.qcow2"), "16M"], check=True)
    split = tmp_path / "split"
    split.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse",
                    str(split / "split.vmdk"), "3G"], check=True)
    for part in sorted(split.iterdir()):
        sftp_import(fresh_lab, host, part)
    cases = [(sftp_import(fresh_lab, host, tmp_path / "ext.qcow2"),
              "ext.qcow2: 'data-file' references are not allowed!"),
             ("local:import/split.vmdk", "split.vmdk: multiple children or extents are not allowed!")]
    for vmid, (volid, message) in enumerate(cases, start=9007):
        with pytest.raises(TaskFailed) as exc:
            c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=vmid, scsi0=f"local:0,import-from={volid}", timeout=30)
        assert exc.value.exitstatus == f"unable to create VM {vmid} - {import_dir / message}"
        assert vmid not in {int(v["vmid"]) for v in c.list_vms()}
        assert not (fresh_lab.paths.storage_dir(host) / "images" / str(vmid)).exists()
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(tmp_path / "one.vmdk"), "16M"], check=True)
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=9009,
               scsi0=f"local:0,import-from={sftp_import(fresh_lab, host, tmp_path / 'one.vmdk')}", timeout=30)
    assert "size=16M" in c.vm_config(9009)["scsi0"]


def test_import_from_a_missing_volume_fails(fresh_lab: LabHandle) -> None:
    c = client(fresh_lab)
    with pytest.raises((TaskFailed, ApiError)) as exc:
        c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=9004, scsi0="local:0,import-from=local:import/nope.qcow2",
                   timeout=30)
    assert "does not exist" in str(exc.value)


@BOTH_VERSIONS
def test_post_config_is_a_task_and_put_config_is_synchronous(fresh_lab: LabHandle, tmp_path: Path, host: str) -> None:
    c = create_template_source(fresh_lab, host, 9005, tmp_path)
    upid = c.post(f"/nodes/{c.node}/qemu/9005/config", description="async")
    parsed = Upid.parse(upid)
    assert (parsed.node, parsed.type) == (host, "qmconfig")
    assert upid.endswith(":")
    assert c.wait_task(upid, timeout=30).exitstatus == "OK"
    assert c.put(f"/nodes/{c.node}/qemu/9005/config", name="renamed") is None
    assert c.vm_config(9005)["name"] == "renamed"


def test_import_from_through_post_config_allocates_and_copies(fresh_lab: LabHandle, tmp_path: Path) -> None:
    c = client(fresh_lab, TENANT)
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=9006, name="late", memory=512, timeout=30)
    volid = sftp_import(fresh_lab, TENANT, make_qcow2(tmp_path / "late.qcow2", "32M"))
    c.run_task("POST", f"/nodes/{c.node}/qemu/9006/config", scsi0=f"local:0,import-from={volid}", timeout=30)
    cfg = c.vm_config(9006)
    assert cfg["scsi0"].startswith("local:9006/vm-9006-disk-0") and "size=32M" in cfg["scsi0"]
    assert disk_file(fresh_lab, TENANT, cfg["scsi0"].split(",")[0]).exists()


# ------------------------------------------------------------------- UPIDs and digest


def test_upid_names_the_node_and_a_failed_task_has_the_error_as_exitstatus(fresh_lab: LabHandle) -> None:
    c = client(fresh_lab, TENANT)
    upid = c.post(f"/nodes/{c.node}/qemu", vmid=2990, name="x", memory=512)
    assert Upid.parse(upid).node == TENANT
    assert c.wait_task(upid, timeout=30).exitstatus == "OK"
    upid = c.post(f"/nodes/{c.node}/qemu/2990/status/start")
    c.wait_task(upid, timeout=30)
    with pytest.raises(TaskFailed) as exc:
        c.run_task("POST", f"/nodes/{c.node}/qemu/2990/status/start", timeout=30)
    assert exc.value.exitstatus == "VM 2990 already running"


def test_config_digest_mismatch_is_refused(fresh_lab: LabHandle) -> None:
    c = client(fresh_lab)
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=1990, name="d", memory=512, timeout=30)
    digest = c.vm_config(1990)["digest"]
    c.put(f"/nodes/{c.node}/qemu/1990/config", description="changed by someone else")
    with pytest.raises(ApiError) as exc:
        c.put(f"/nodes/{c.node}/qemu/1990/config", description="mine", digest=digest)
    assert "checksum mismatch" in exc.value.pve_message
    new = c.vm_config(1990)["digest"]
    assert c.put(f"/nodes/{c.node}/qemu/1990/config", description="mine", digest=new) is None


@BOTH_VERSIONS
def test_the_digest_covers_the_pending_section(fresh_lab: LabHandle, host: str) -> None:
    """qemu-server hashes the whole config file: a change that goes pending (the VM runs) changes the digest though
    the current values stay; GET config shows the pending value, `current=1` the running one, both one digest."""
    c = client(fresh_lab, host)
    path = f"/nodes/{c.node}/qemu/1988"
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=1988, name="p", memory=512, timeout=30)
    c.run_task("POST", path + "/status/start", timeout=60)
    before = c.vm_config(1988)
    c.put(path + "/config", memory=640)  # another writer: the running VM takes it at its next start
    after, current = c.vm_config(1988), c.get(path + "/config", current=1)
    assert (str(after["memory"]), str(current["memory"])) == ("640", "512")
    assert after["digest"] != before["digest"] and current["digest"] == after["digest"]
    with pytest.raises(ConfigChanged):
        c.update_vm_config(1988, digest=before["digest"], timeout=30, cores=2)
    assert "cores" not in c.vm_config(1988)
    c.put(path + "/config", delete="memory")  # a pending delete changes it too
    assert c.vm_config(1988)["digest"] != after["digest"] and "memory" not in c.vm_config(1988)
    c.run_task("POST", path + "/status/stop", timeout=60)


# ---------------------------------------------------------------- templates and clones


@BOTH_VERSIONS
def test_template_conversion_renames_disks_to_base_and_keeps_the_file(
    fresh_lab: LabHandle, tmp_path: Path, host: str,
) -> None:
    c = create_template_source(fresh_lab, host, 9010, tmp_path)
    c.run_task("POST", f"/nodes/{c.node}/qemu/9010/template", timeout=30)
    cfg = c.vm_config(9010)
    assert cfg["template"] == 1
    assert cfg["scsi0"].startswith("local:9010/base-9010-disk-0.")
    assert cfg["ide2"].startswith("local:9010/vm-9010-cloudinit.") and "media=cdrom" in cfg["ide2"]
    assert disk_file(fresh_lab, host, cfg["scsi0"].split(",")[0]).exists()
    assert not (fresh_lab.paths.storage_dir(host) / "images/9010/vm-9010-disk-0.raw").exists()


def test_template_conversion_refusals(fresh_lab: LabHandle, tmp_path: Path) -> None:
    c = create_template_source(fresh_lab, MGMT, 9011, tmp_path)
    path = f"/nodes/{c.node}/qemu/9011"
    c.run_task("POST", path + "/status/start", timeout=60)
    with pytest.raises(ApiError, match="if VM is running"):
        c.post(path + "/template")
    c.run_task("POST", path + "/status/stop", timeout=60)
    fresh_lab.control(MGMT).call("snapshot_lock", vmid=9011)
    with pytest.raises(ApiError, match=r"VM is locked \(snapshot\)"):
        c.post(path + "/template")
    fresh_lab.control(MGMT).call("unlock", vmid=9011)
    fresh_lab.control(MGMT).call("snapshot", vmid=9011, name="before")
    with pytest.raises(ApiError, match="contains snapshots"):
        c.post(path + "/template")


def test_template_of_a_template_is_refused(fresh_lab: LabHandle, tmp_path: Path) -> None:
    c = create_template_source(fresh_lab, MGMT, 9012, tmp_path)
    c.run_task("POST", f"/nodes/{c.node}/qemu/9012/template", timeout=30)
    with pytest.raises(ApiError, match="convert a template to a template"):
        c.post(f"/nodes/{c.node}/qemu/9012/template")


def _macs(cfg: dict[str, Any]) -> list[str]:
    return [v.split(",")[0].split("=")[1] for k, v in sorted(cfg.items()) if re.fullmatch(r"net\d+", k)]


@BOTH_VERSIONS
def test_full_clone_gets_fresh_macs_its_own_cloudinit_and_a_copy(
    fresh_lab: LabHandle, tmp_path: Path, host: str,
) -> None:
    c = create_template_source(fresh_lab, host, 9020, tmp_path)
    c.put(f"/nodes/{c.node}/qemu/9020/config", net0="virtio=02:DE:10:01:01:00,bridge=vmbr0")
    c.run_task("POST", f"/nodes/{c.node}/qemu/9020/template", timeout=30)
    c.run_task("POST", f"/nodes/{c.node}/qemu/9020/clone", newid=1101, name="metrics01", full=1, timeout=60)
    src, new = c.vm_config(9020), c.vm_config(1101)
    (mac,) = _macs(new)
    assert mac != "02:DE:10:01:01:00" and mac.upper().startswith("BC:24:11:")
    assert new["ide2"].startswith("local:1101/vm-1101-cloudinit.")
    assert src["ide2"].startswith("local:9020/vm-9020-cloudinit.")
    disk = disk_file(fresh_lab, host, new["scsi0"].split(",")[0])
    assert "backing-filename" not in qemu_img_info(disk)
    # the inventory MAC goes in with a second update, after the clone task
    c.put(f"/nodes/{c.node}/qemu/1101/config", net0="virtio=02:de:10:01:01:00,bridge=vmbr0")
    assert _macs(c.vm_config(1101))[0].lower() == "02:de:10:01:01:00"


def test_linked_clone_is_a_qcow2_overlay_of_the_base_disk(fresh_lab: LabHandle, tmp_path: Path) -> None:
    c = create_template_source(fresh_lab, TENANT, 9030, tmp_path)
    c.run_task("POST", f"/nodes/{c.node}/qemu/9030/template", timeout=30)
    base = disk_file(fresh_lab, TENANT, c.vm_config(9030)["scsi0"].split(",")[0])
    c.run_task("POST", f"/nodes/{c.node}/qemu/9030/clone", newid=2201, name="sandbox01", timeout=60)
    cfg = c.vm_config(2201)
    volid = cfg["scsi0"].split(",")[0]
    assert volid.startswith("local:9030/base-9030-disk-0.") and "/2201/vm-2201-disk-0.qcow2" in volid
    info = qemu_img_info(disk_file(fresh_lab, TENANT, volid))
    assert info["format"] == "qcow2"
    assert (disk_file(fresh_lab, TENANT, volid).parent / info["backing-filename"]).resolve() == base.resolve()
    with pytest.raises(ApiError, match="not allowed for linked clones"):
        c.post(f"/nodes/{c.node}/qemu/9030/clone", newid=2202, full=0, storage="local")


def thin_file(lab: LabHandle, host: str, volid: str) -> Path:
    sid, name = volid.split(":", 1)
    assert sid == "local-lvm" and "/" not in name, volid
    return lab.paths.storage_dir(host).parents[2] / "dev" / "pve" / name


def test_lvm_thin_pool_names_volumes_like_pve_and_keeps_clones_of_a_removed_base(
        fresh_lab: LabHandle, tmp_path: Path) -> None:
    """local-lvm: raw vm-<id>-disk-<n>, base-<id>-disk-<n> after templating, linked clones with plain ids
    (the base is not in the id), and removing the base leaves a linked clone whole (LVM-thin semantics)."""
    c = client(fresh_lab, TENANT)
    storages = {s["storage"]: s for s in c.get(f"/nodes/{c.node}/storage")}
    assert storages["local-lvm"]["type"] == "lvmthin" and "images" in storages["local-lvm"]["content"]
    src = make_qcow2(tmp_path / "thin.qcow2", "16M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 1M", str(src)], check=True,
                   capture_output=True)
    volid = sftp_import(fresh_lab, TENANT, src)
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=9070, name="thin", memory=512, scsihw="virtio-scsi-pci",
               scsi0=f"local-lvm:0,import-from={volid}", ide2="local-lvm:cloudinit", timeout=60)
    cfg = c.vm_config(9070)
    assert cfg["scsi0"].split(",")[0] == "local-lvm:vm-9070-disk-0"
    assert cfg["ide2"].split(",")[0] == "local-lvm:vm-9070-cloudinit"
    assert qemu_img_info(thin_file(fresh_lab, TENANT, "local-lvm:vm-9070-disk-0"))["format"] == "raw"
    c.run_task("POST", f"/nodes/{c.node}/qemu/9070/template", timeout=30)
    assert c.vm_config(9070)["scsi0"].split(",")[0] == "local-lvm:base-9070-disk-0"
    c.run_task("POST", f"/nodes/{c.node}/qemu/9070/clone", newid=2270, name="thinclone", timeout=60)
    clone = c.vm_config(2270)["scsi0"].split(",")[0]
    assert clone == "local-lvm:vm-2270-disk-0"  # nothing in the id says it is a linked clone
    listed = [v["volid"] for v in c.get(f"/nodes/{c.node}/storage/local-lvm/content")]
    assert "local-lvm:base-9070-disk-0" in listed and "local-lvm:vm-2270-disk-0" in listed
    result = c.run_task("DELETE", f"/nodes/{c.node}/qemu/9070", timeout=30)
    assert result.exitstatus == "OK"  # PVE does not see the clone, so it neither warns nor refuses
    assert not thin_file(fresh_lab, TENANT, "local-lvm:base-9070-disk-0").exists()
    left = thin_file(fresh_lab, TENANT, clone)
    assert "backing-filename" not in qemu_img_info(left)
    read = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 1M 1M", str(left)],
                          capture_output=True, text=True)
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout


def test_parallel_clone_waits_for_the_storage_lock_then_times_out(fresh_lab: LabHandle, tmp_path: Path) -> None:
    c = create_template_source(fresh_lab, MGMT, 9040, tmp_path)
    c.run_task("POST", f"/nodes/{c.node}/qemu/9040/template", timeout=30)
    fresh_lab.time_scale(MGMT, 0.05)  # 10 PVE seconds of lock wait = 0.5 s here
    fresh_lab.lock_storage(MGMT, "local")
    with pytest.raises(TaskFailed) as exc:
        c.run_task("POST", f"/nodes/{c.node}/qemu/9040/clone", newid=1201, full=1, timeout=60)
    assert "can't lock file '/var/lock/pve-manager/pve-storage-local' - got timeout" in exc.value.exitstatus
    assert all(vm["vmid"] != 1201 for vm in c.list_vms()), "a failed clone leaves no VM behind"
    fresh_lab.clear_faults(MGMT)
    c.run_task("POST", f"/nodes/{c.node}/qemu/9040/clone", newid=1201, full=1, timeout=60)


def test_two_clones_at_once_contend_for_the_storage_lock(fresh_lab: LabHandle, tmp_path: Path) -> None:
    c = create_template_source(fresh_lab, MGMT, 9041, tmp_path)
    c.run_task("POST", f"/nodes/{c.node}/qemu/9041/template", timeout=30)
    fresh_lab.time_scale(MGMT, 0.05)
    fresh_lab.durations(MGMT, clone_full=60)  # 3 s: longer than the other's 10 PVE s (0.5 s) wait
    first = c.post(f"/nodes/{c.node}/qemu/9041/clone", newid=1301, full=1)
    time.sleep(0.2)
    second = c.post(f"/nodes/{c.node}/qemu/9041/clone", newid=1302, full=1)
    with pytest.raises(TaskFailed, match="got timeout"):
        c.wait_task(second, timeout=30)
    fresh_lab.durations(MGMT, clone_full=0)
    assert c.wait_task(first, timeout=60).exitstatus == "OK"


# ----------------------------------------------------------------- cloud-init, tags, MACs


def test_sshkeys_percent_encoded_with_20_is_accepted_and_plus_is_refused(fresh_lab: LabHandle) -> None:
    c = client(fresh_lab)
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=1991, name="k", memory=512, timeout=30)
    c.put(f"/nodes/{c.node}/qemu/1991/config", sshkeys=urllib.parse.quote(LAB_KEY, safe=""))
    assert urllib.parse.unquote(c.vm_config(1991)["sshkeys"]) == LAB_KEY
    with pytest.raises(ApiError) as exc:
        c.put(f"/nodes/{c.node}/qemu/1991/config", sshkeys=urllib.parse.quote_plus(LAB_KEY, safe=""))
    assert exc.value.status == 400 and "sshkeys" in exc.value.pve_message


@BOTH_VERSIONS
def test_tags_on_create_by_version(fresh_lab: LabHandle, host: str) -> None:
    """qemu-server 8.3 stores create's tags verbatim, 9.1.17+ normalises them; updates normalise on both."""
    c = client(fresh_lab, host)
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=1992, name="t", memory=512, tags="zeta;Alpha;mgmt",
               timeout=30)
    stored = c.vm_config(1992)["tags"]
    assert stored == ("zeta;Alpha;mgmt" if host == MGMT else "alpha;mgmt;zeta")
    assert parse_tags(stored) == ["alpha", "mgmt", "zeta"]  # what the product compares
    c.put(f"/nodes/{c.node}/qemu/1992/config", tags="zeta;Alpha;mgmt")
    assert c.vm_config(1992)["tags"] == "alpha;mgmt;zeta"
    with pytest.raises(ApiError) as exc:
        c.put(f"/nodes/{c.node}/qemu/1992/config", tags="bad tag!")
    assert exc.value.status == 400


@BOTH_VERSIONS
def test_stale_digest_and_a_lock_flag_are_http_errors_on_every_version(fresh_lab: LabHandle, host: str) -> None:
    """qemu-server 9.1.19+ forks the config POST before locking, but its early check (load_and_check_config
    before the fork) still refuses a stale digest and a `lock:` flag synchronously, as 8.4 does."""
    c = client(fresh_lab, host)
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=1994, name="d", memory=512, timeout=30)
    stale = c.vm_config(1994)["digest"]
    c.put(f"/nodes/{c.node}/qemu/1994/config", memory=1024)  # another writer
    raw = c.call  # the wire form first
    with pytest.raises(ApiError, match="checksum mismatch") as http:
        raw("POST", f"/nodes/{c.node}/qemu/1994/config", memory=2048, digest=stale)
    assert http.value.status == 500
    fresh_lab.control(host).snapshot_lock(vmid=1994, lock="backup")
    with pytest.raises(ApiError, match=r"VM is locked \(backup\)") as locked:
        raw("POST", f"/nodes/{c.node}/qemu/1994/config", memory=2048)
    assert locked.value.status == 500
    fresh_lab.control(host).unlock(vmid=1994)
    # the product's one form for both, and nothing written
    with pytest.raises(ConfigChanged, match="changed after this run read it"):
        c.update_vm_config(1994, digest=stale, timeout=30, memory=2048)
    assert str(c.vm_config(1994)["memory"]) == "1024"
    c.update_vm_config(1994, digest=c.vm_config(1994)["digest"], timeout=30, memory=2048)
    assert str(c.vm_config(1994)["memory"]) == "2048"


@BOTH_VERSIONS
def test_config_lock_timeout_form_by_version_and_the_retry_handles_both(fresh_lab: LabHandle, host: str) -> None:
    c = client(fresh_lab, host)
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=1995, name="l", memory=512, timeout=30)
    fresh_lab.time_scale(host, 0.05)  # PVE's 10 s lock wait becomes 0.5 s
    fresh_lab.lock_vm(host, 1995)
    if host == MGMT:
        with pytest.raises(ApiError, match="can't lock file") as http:
            c.call("POST", f"/nodes/{c.node}/qemu/1995/config", memory=640)
        assert http.value.status == 500 and http.value.is_lock_timeout
    else:
        upid = c.call("POST", f"/nodes/{c.node}/qemu/1995/config", memory=640)
        with pytest.raises(TaskFailed, match="can't lock file"):
            c.wait_task(upid, timeout=30)
    retried: list[str] = []

    def release_on_retry(message: str) -> None:
        retried.append(message)
        fresh_lab.clear_faults(host)

    retry_lock_timeouts(lambda: c.update_vm_config(1995, digest=None, timeout=30, memory=768),
                        attempts=3, delay=0.01, on_retry=release_on_retry)
    assert len(retried) == 1 and str(c.vm_config(1995)["memory"]) == "768"


@BOTH_VERSIONS
def test_a_restrictive_tag_policy_is_enforced_on_config_and_from_qemu_server_9_2_on_create(
        fresh_lab: LabHandle, host: str) -> None:
    """pve-guest-common's assert_tag_permissions: without Sys.Modify on /, a tag off the datacenter's list (or a
    registered one) is refused: on a config update (synchronously before qemu-server 9.1.19, in the task
    from then), and from qemu-server 9.2.0 inside the create task too."""
    c = client(fresh_lab, host)
    control = fresh_lab.control(host)
    control.datacenter(set={"user-tag-access": "user-allow=list,user-allow-list=image-factory;ok"})
    path = f"/nodes/{c.node}/qemu"
    refused = "Permission check failed (/, Sys.Modify for modifying tag 'build-1')"
    if host == MGMT:  # qemu-server 8.3: create stores the tags unchecked
        c.run_task("POST", path, vmid=1998, name="q", memory=512, tags="image-factory;build-1", timeout=30)
    else:
        with pytest.raises(TaskFailed) as task:
            c.run_task("POST", path, vmid=1998, name="q", memory=512, tags="image-factory;build-1", timeout=30)
        assert refused in task.value.exitstatus and 1998 not in {int(v["vmid"]) for v in c.list_vms()}
    c.run_task("POST", path, vmid=1996, name="p", memory=512, tags="image-factory;ok", timeout=30)
    with pytest.raises(ApiError) as put:
        c.put(f"{path}/1996/config", tags="image-factory;ok;build-2")
    assert put.value.status == 403 and "modifying tag 'build-2'" in put.value.pve_message
    if host == MGMT:
        with pytest.raises(ApiError, match="modifying tag 'build-2'"):
            c.update_vm_config(1996, digest=None, timeout=30, tags="image-factory;ok;build-2")
    else:
        with pytest.raises(TaskFailed, match="modifying tag 'build-2'"):
            c.update_vm_config(1996, digest=None, timeout=30, tags="image-factory;ok;build-2")
    c.put(f"{path}/1996/config", tags="image-factory;ok")  # listed tags pass
    control.grant(path="/", privs=["Sys.Modify"])  # the policy binds only users without Sys.Modify on /
    c.put(f"{path}/1996/config", tags="image-factory;ok;build-2")
    assert parse_tags(c.vm_config(1996)["tags"]) == ["build-2", "image-factory", "ok"]


def test_running_tasks_are_listed_by_source_in_pve_managers_shape(fresh_lab: LabHandle) -> None:
    """GET .../tasks?source=active: running tasks only, `status: "RUNNING"`, no endtime, the token's user without
    its token part plus `tokenid`; the default (archive) lists only ended ones. active_task_vmids sees them."""
    c = client(fresh_lab, TENANT)
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=1997, name="slow", memory=512, timeout=30)
    # qemu-server 9.2's config task waits for the config lock: held until the task has been seen running (a
    # timed hold could end before a loaded machine asks)
    fresh_lab.lock_vm(TENANT, 1997)
    upid = c.call("POST", f"/nodes/{c.node}/qemu/1997/config", memory=640)
    active = c.get(f"/nodes/{c.node}/tasks", source="active")
    mine = [t for t in active if t["upid"] == upid]
    user, token = c.hv.token_id.split("!")
    assert mine and mine[0]["status"] == "RUNNING" and "endtime" not in mine[0]
    assert mine[0]["user"] == user and mine[0]["tokenid"] == token
    assert upid not in {t["upid"] for t in c.get(f"/nodes/{c.node}/tasks")}
    assert 1997 in c.active_task_vmids()
    fresh_lab.control(TENANT).call("release_config_lock", vmid=1997)
    c.wait_task(upid, timeout=60)
    assert 1997 not in c.active_task_vmids()
    ended = [t for t in c.get(f"/nodes/{c.node}/tasks", source="all") if t["upid"] == upid]
    assert ended[0]["status"] == "OK" and ended[0]["endtime"] >= ended[0]["starttime"]


def test_multicast_mac_is_refused(fresh_lab: LabHandle) -> None:
    c = client(fresh_lab)
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=1993, name="m", memory=512, timeout=30)
    with pytest.raises(ApiError) as exc:
        c.put(f"/nodes/{c.node}/qemu/1993/config", net0="virtio=03:de:10:01:01:00,bridge=vmbr0")
    assert exc.value.status == 400


# ------------------------------------------------------------------------- fault hooks


def test_fail_hook_makes_the_next_call_fail_once(fresh_lab: LabHandle) -> None:
    c = client(fresh_lab, TENANT)
    fresh_lab.fail(TENANT, "GET", "/version", status=500, message="boom", times=1)
    with pytest.raises(ApiError, match="boom"):
        c.version()
    assert c.version()["version"] == "9.2.5"  # the tenant host of the mid-upgrade lab


def test_cut_ssh_mid_transfer(fresh_lab: LabHandle, tmp_path: Path) -> None:
    hv = fresh_lab.hv(MGMT)
    target = Path(hv.storage.import_dir) / "big.raw"
    payload = b"\1" * (32 * 1024 * 1024)
    with (fresh_lab.cut_ssh_when(MGMT, target, 1024 * 1024) as cut,
          pytest.raises((OSError, EOFError, paramiko.SSHException)),
          connect(hv.name, hv.ssh) as link):
        chan = link.open_session()
        chan.exec_command(f"cat > {target}")
        view = memoryview(payload)
        for off in range(0, len(payload), 65536):
            chan.sendall(view[off:off + 65536])
        chan.shutdown_write()
        if chan.recv_exit_status() != 0:
            raise OSError("remote cat failed")
    assert cut["cut"] >= 1
    assert target.stat().st_size < len(payload)
    # the sshd itself keeps serving
    with connect(hv.name, hv.ssh) as link:
        assert link.run(["true"]).status == 0


# ----------------------------------------------------------------- resize, node, network


@BOTH_VERSIONS
def test_resize_is_a_task_that_grows_the_disk_and_refuses_shrinking(
    fresh_lab: LabHandle, tmp_path: Path, host: str,
) -> None:
    c = create_template_source(fresh_lab, host, 1994, tmp_path, size="64M")
    path = f"/nodes/{c.node}/qemu/1994"
    upid = c.put(path + "/resize", disk="scsi0", size="1G")
    assert Upid.parse(upid).type == "resize"
    c.wait_task(upid, timeout=30)
    cfg = c.vm_config(1994)
    assert "size=1G" in cfg["scsi0"]
    assert qemu_img_info(disk_file(fresh_lab, host, cfg["scsi0"].split(",")[0]))["virtual-size"] == 1024 ** 3
    with pytest.raises(ApiError, match="shrinking disks is not supported"):
        c.put(path + "/resize", disk="scsi0", size="512M")
    c.wait_task(c.put(path + "/resize", disk="scsi0", size="+512M"), timeout=30)
    assert "size=1536M" in c.vm_config(1994)["scsi0"]


def test_node_lists_the_bridges_the_site_uses_and_reports_pve_841(lab: LabHandle) -> None:
    mgmt, tenant = client(lab, MGMT), client(lab, TENANT)
    bridges = {n: {i["iface"] for i in cl.get(f"/nodes/{n}/network", type="bridge")}
               for n, cl in ((MGMT, mgmt), (TENANT, tenant))}
    assert bridges == {MGMT: {"vmbr0", "vmbr1"}, TENANT: {"vmbr0"}}  # jump01's second NIC is on vmbr1
    assert mgmt.get(f"/nodes/{MGMT}/status")["pveversion"].startswith("pve-manager/8.4.1/")
    status = mgmt.get(f"/nodes/{MGMT}/storage/local/status")
    assert 0 < status["avail"] <= status["total"]


def test_setting_the_cloudinit_drive_again_is_a_no_op(fresh_lab: LabHandle, tmp_path: Path) -> None:
    c = create_template_source(fresh_lab, MGMT, 1995, tmp_path)
    before = c.vm_config(1995)["ide2"]
    c.run_task("POST", f"/nodes/{c.node}/qemu/1995/config", ide2="local:cloudinit", timeout=30)
    assert c.vm_config(1995)["ide2"] == before


@EVERY_RELEASE
def test_destroying_a_template_with_linked_clones_on_dir_is_refused(
        fresh_lab: LabHandle, tmp_path: Path, host: str, release: str) -> None:
    """qemu-server's destroy_vm: a template whose base volume still backs a linked clone is not removed (the
    task fails before touching anything); once the clone is gone it is."""
    fresh_lab.release(host, release)
    c = create_template_source(fresh_lab, host, 9060, tmp_path)
    assert c.version()["version"] == release
    c.run_task("POST", f"/nodes/{c.node}/qemu/9060/template", timeout=30)
    volid = c.vm_config(9060)["scsi0"].split(",")[0]
    base = disk_file(fresh_lab, host, volid)
    c.run_task("POST", f"/nodes/{c.node}/qemu/9060/clone", newid=2202, name="linked", timeout=60)
    with pytest.raises(TaskFailed, match=f"base volume '{re.escape(volid)}' is still in use by linked cloned"):
        c.run_task("DELETE", f"/nodes/{c.node}/qemu/9060", timeout=30)
    assert base.exists() and int(c.vm_config(9060)["template"]) == 1
    c.run_task("DELETE", f"/nodes/{c.node}/qemu/2202", timeout=30)
    assert not (fresh_lab.paths.storage_dir(host) / "images" / "2202").exists()
    c.run_task("DELETE", f"/nodes/{c.node}/qemu/9060", timeout=30)
    assert not base.exists()


@EVERY_RELEASE
def test_clone_needs_sdn_use_on_the_source_bridges_and_the_network_list_hides_unusable_bridges(
        fresh_lab: LabHandle, tmp_path: Path, host: str, release: str) -> None:
    """qemu-server's clone_vm checks SDN.Use on the source config's bridges; pve-manager's network index is open
    to every user but hides a bridge the caller holds neither SDN.Audit nor SDN.Use on."""
    fresh_lab.release(host, release)
    c = create_template_source(fresh_lab, host, 9061, tmp_path)
    assert c.version()["version"] == release
    # vmbr1 exists on pve-mgmt only (jump01's second NIC); PVE checks the permission, not the bridge's existence
    c.put(f"/nodes/{c.node}/qemu/9061/config", net1="virtio,bridge=vmbr1")
    bridges = {i["iface"] for i in c.get(f"/nodes/{c.node}/network", type="bridge")}
    assert bridges == ({"vmbr0", "vmbr1"} if host == MGMT else {"vmbr0"})
    control = fresh_lab.control(host)  # the admin narrows the token's SDN.Use to vmbr0
    control.revoke(path="/sdn/zones/localnetwork", privs=["SDN.Use"])
    control.grant(path="/sdn/zones/localnetwork/vmbr0", privs=["SDN.Use"])
    with pytest.raises(ApiError) as exc:
        c.post(f"/nodes/{c.node}/qemu/9061/clone", newid=2203, name="c")
    assert exc.value.status == 403 and "/sdn/zones/localnetwork/vmbr1, SDN.Use" in exc.value.pve_message
    assert 2203 not in {int(v["vmid"]) for v in c.list_vms()}
    assert {i["iface"] for i in c.get(f"/nodes/{c.node}/network", type="bridge")} == {"vmbr0"}
    assert "eno1" in {i["iface"] for i in c.get(f"/nodes/{c.node}/network")}


@BOTH_VERSIONS
def test_replacing_a_disk_keeps_the_old_one_as_unused(fresh_lab: LabHandle, tmp_path: Path, host: str) -> None:
    c = create_template_source(fresh_lab, host, 1996, tmp_path)
    old = c.vm_config(1996)["scsi0"].split(",")[0]
    volid = sftp_import(fresh_lab, host, make_qcow2(tmp_path / "new.qcow2", "32M"))
    c.run_task("POST", f"/nodes/{c.node}/qemu/1996/config", scsi0=f"local:0,import-from={volid}", timeout=30)
    cfg = c.vm_config(1996)
    assert cfg["unused0"] == old and cfg["scsi0"].split(",")[0] != old


def test_upload_larger_than_the_staging_space_fails_and_leaves_nothing(fresh_lab: LabHandle) -> None:
    hv, c = fresh_lab.hv(TENANT), client(fresh_lab, TENANT)
    staging = Path(hv.storage.staging_dir)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(staging)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        resp = upload(hv, c, [("content", "import"),
                              ("filename", ("big.raw", io.BytesIO(b"\0" * (3 << 20)), "application/octet-stream"))])
        assert resp.status_code == 500
        assert "No space left on device" in resp.json()["message"]
        assert list(staging.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(staging)], check=True)
    assert c.get(f"/nodes/{c.node}/storage/local/content", content="import") == []


@BOTH_VERSIONS
def test_description_holds_8_kib_and_no_more(fresh_lab: LabHandle, host: str) -> None:
    c = client(fresh_lab, host)
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=1997, name="desc", memory=512, timeout=30)
    c.put(f"/nodes/{c.node}/qemu/1997/config", description="d" * 8192)
    with pytest.raises(ApiError) as exc:
        c.put(f"/nodes/{c.node}/qemu/1997/config", description="d" * 8193)
    assert exc.value.status == 400


def test_clone_locks_the_new_vm_and_cannot_target_the_other_node(fresh_lab: LabHandle, tmp_path: Path) -> None:
    c = create_template_source(fresh_lab, MGMT, 9070, tmp_path)
    c.run_task("POST", f"/nodes/{c.node}/qemu/9070/template", timeout=30)
    with pytest.raises(ApiError, match="no such cluster node 'pve-tenant'"):
        c.post(f"/nodes/{c.node}/qemu/9070/clone", newid=1102, full=1, target=TENANT)
    fresh_lab.time_scale(MGMT, 0.05)
    fresh_lab.durations(MGMT, clone_full=40)  # 2 s
    upid = c.post(f"/nodes/{c.node}/qemu/9070/clone", newid=1102, full=1)
    assert c.vm_config(1102)["lock"] == "clone"
    c.wait_task(upid, timeout=60)
    assert "lock" not in c.vm_config(1102)


# ------------------------------------------------------------------------- verb shapes (strict rule)

# Every verb PveClient offers, with the PVE source that defines its answer (docs/pve-facts.md, "Verb shapes"):
# a new verb cannot land without an entry here, and the test below asserts the lab answers in that shape.
VERB_SOURCES = {
    "version": "pve-manager PVE/API2.pm:86",
    "vm_config": "qemu-server src/PVE/API2/Qemu.pm:1787",
    "list_vms": "qemu-server src/PVE/API2/Qemu.pm:1074",
    "list_containers": "pve-container src/PVE/API2/LXC.pm (vmlist)",
    "storages": "pve-storage src/PVE/API2/Storage/Status.pm:68",
    "node_networks": "pve-manager PVE/API2/Network.pm:264",
    "cluster_vms": "pve-manager PVE/API2/Cluster.pm:263",
    "cluster_nodes": "pve-manager PVE/API2/Cluster.pm:263 (type=node)",
    "cluster_guests": "pve-manager PVE/API2/Cluster.pm:263 (type=vm: vmid, node)",
    "nodes": "pve-manager PVE/API2/Nodes.pm:2908",
    "cluster_options": "pve-manager PVE/API2/Cluster.pm:774",
    "permissions": "pve-access-control src/PVE/API2/AccessControl.pm:510",
    "vm_pending": "qemu-server src/PVE/API2/Qemu.pm:1858",
    "vm_status": "qemu-server src/PVE/API2/Qemu.pm:3426",
    "vm_agent": "qemu-server src/PVE/API2/Qemu/Agent.pm:65,240",
    "create_vm": "qemu-server src/PVE/API2/Qemu.pm:1159",
    "clone_vm": "qemu-server src/PVE/API2/Qemu.pm:4329",
    "resize_vm_disk": "qemu-server src/PVE/API2/Qemu.pm:5939",
    "start_vm": "qemu-server src/PVE/API2/Qemu.pm:3494",
    "stop_vm": "qemu-server src/PVE/API2/Qemu.pm:3682",
    "destroy_vm": "qemu-server src/PVE/API2/Qemu.pm:2776",
    "set_vm_config": "qemu-server src/PVE/API2/Qemu.pm:2718",
    "update_vm_config": "qemu-server src/PVE/API2/Qemu.pm:2646",
    "make_template": "qemu-server src/PVE/API2/Qemu.pm:6512",
    "active_task_vmids": "pve-manager PVE/API2/Tasks.pm:40,228",
    "wait_task": "pve-manager PVE/API2/Tasks.pm:454",
    "run_task": "(any endpoint answering a UPID, then Tasks.pm:454)",
    "upload_endpoint": "pve-storage src/PVE/API2/Storage/Status.pm:519 (no call: builds the URL)",
}
GENERIC = {"call", "get", "post", "put", "delete", "vm_path", "node_path", "api", "api_url", "session", "on"}


def _is_upid(value: Any) -> bool:
    return isinstance(value, str) and Upid.parse(value).raw == value


@EVERY_RELEASE
def test_every_pve_client_verb_answers_in_the_shape_of_pves_sources(
        fresh_lab: LabHandle, tmp_path: Path, host: str, release: str) -> None:
    fresh_lab.release(host, release)
    verbs = {n for n, v in vars(PveClient).items() if not n.startswith("_") and (callable(v) or
                                                                                  isinstance(v, property))}
    assert verbs - GENERIC == set(VERB_SOURCES), "a PveClient verb needs its PVE source and shape here"
    c = create_template_source(fresh_lab, host, 9070, tmp_path)
    version = c.version()
    assert {"version", "release", "repoid"} <= set(version) and version["version"] == release
    assert isinstance(c.vm_config(9070)["digest"], str)
    assert all(isinstance(v["vmid"], int) and v["status"] in ("running", "stopped") for v in c.list_vms())
    assert c.list_containers() == []
    assert all({"storage", "type", "content", "active", "avail", "total"} <= set(s) for s in c.storages())
    assert all({"iface", "type"} <= set(i) for i in c.node_networks())
    assert all({"id", "type", "vmid", "node"} <= set(g) for g in c.cluster_vms())
    assert c.cluster_nodes() == {c.node: True}
    assert c.cluster_guests() == {9070: c.node}
    assert c.on(c.node) is c and c.on("pve-other").node_path == "/nodes/pve-other"
    assert [n["node"] for n in c.nodes() if {"node", "status"} <= set(n)] == [c.node]
    assert isinstance(c.cluster_options()["allowed-tags"], list)
    perms = c.permissions("/vms")
    assert all(isinstance(p, dict) and all(v in (0, 1) for v in p.values()) for p in perms.values())
    assert all("key" in item for item in c.vm_pending(9070))
    assert c.vm_status(9070)["status"] == "stopped"
    with pytest.raises(ApiError) as agent:
        c.vm_agent(9070, "network-get-interfaces")  # the VM is stopped: PVE's 500
    assert agent.value.status == 500
    assert c.set_vm_config(9070, description="x") is None
    c.update_vm_config(9070, digest=c.vm_config(9070)["digest"], timeout=30, memory=640)
    resized = c.resize_vm_disk(9070, "scsi0", "+1M")
    assert _is_upid(resized)
    c.wait_task(resized, timeout=30)
    assert _is_upid(upid := c.make_template(9070))
    done = c.wait_task(upid, timeout=30)
    assert done.exitstatus == "OK"
    assert _is_upid(upid := c.clone_vm(9070, newid=2301, name="shape"))
    c.wait_task(upid, timeout=60)
    assert _is_upid(upid := c.create_vm(vmid=2302, name="shape2", memory=512))
    c.wait_task(upid, timeout=30)
    assert c.active_task_vmids() == set()
    fresh_lab.durations(host, stop=2.0)
    assert _is_upid(upid := c.stop_vm(2302))
    assert c.get(f"/nodes/{c.node}/tasks/{upid}/status")["status"] == "running"
    c.wait_task(upid, timeout=30)
    assert _is_upid(upid := c.destroy_vm(2302))
    c.wait_task(upid, timeout=30)
    url, call = c.upload_endpoint("local")
    assert url.endswith(f"/api2/json/nodes/{c.node}/storage/local/upload") and call.startswith("POST ")
    assert callable(c.start_vm) and callable(c.run_task)  # start boots a real qemu: test_lab_vm covers its shape


@EVERY_RELEASE
def test_each_node_accepts_only_its_own_qemu_servers_schema(fresh_lab: LabHandle, host: str, release: str) -> None:
    """fakepve validates against the newest schema; each lab node refuses what its own qemu-server does not define
    yet (NEWER_PARAMETERS, from the schemas diffed), with PVE's 400: 8.4's file-read knows only `file`, its create
    no `ha-managed`, its start no `with-conntrack-state`. A node that has the parameter does not refuse it so."""
    fresh_lab.release(host, release)
    c = client(fresh_lab, host)
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=1989, name="f", memory=512, agent="enabled=1", timeout=30)
    values = {"ha-managed": 0, "allow-ksm": 1, "intel-tdx": "type=tdx", "with-conntrack-state": 1,
              "nets-host-mtu": "net0=1500", "count": 100, "decode": 1, "offset": 0}
    extra = {"/nodes/{node}/qemu": {"vmid": 1988}, "/nodes/{node}/qemu/{vmid}/agent/file-read": {"file": "/x"}}
    undefined = "property is not defined in schema and the schema does not allow additional properties"
    for (method, template), newer in NEWER_PARAMETERS.items():
        path = template.format(node=c.node, vmid=1989)
        for name, since in newer.items():
            params = {name: values[name], **extra.get(template, {})}
            try:
                answer = c.call(method, path, **params)
            except ApiError as exc:
                refused = exc.status == 400 and f"{name}: {undefined}" in exc.pve_message
            else:
                refused = False
                if isinstance(answer, str) and answer.startswith("UPID:"):
                    with contextlib.suppress(TaskFailed):
                        c.wait_task(answer, timeout=30)
            known = tuple(int(x) for x in release_of(release).qemu_server.split(".")) >= since
            assert refused is not known, (method, template, name, release)


@EVERY_RELEASE
def test_each_node_parses_property_strings_with_its_own_qemu_servers_formats(fresh_lab: LabHandle, host: str,
                                                                            release: str) -> None:
    """fakepve checks the newest formats; each lab node refuses a sub-key its own qemu-server does not define yet
    (lab.pve.formats), with PVE's 400 ("invalid key in comma-separated list property"), on create and config."""
    fresh_lab.release(host, release)
    c = client(fresh_lab, host)
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=1987, name="f", memory=512, timeout=30)
    newer = {"net0": ("virtio,bridge=vmbr0,host-tunnel=1", "host-tunnel", (9, 1, 18)),
             "cpu": ("level=30,host", "level", (9, 1, 14)),
             "agent": ("1,freeze-fs=0", "freeze-fs", (9, 1, 6))}
    qemu_server = tuple(int(x) for x in release_of(release).qemu_server.split("."))
    for option, (value, key, since) in newer.items():
        try:
            c.call("PUT", f"/nodes/{c.node}/qemu/1987/config", **{option: value})
        except ApiError as exc:
            refused = exc.status == 400 and (
                f"{option}: invalid format - invalid key in comma-separated list property: {key}" in exc.pve_message)
        else:
            refused = False
        assert refused is (qemu_server < since), (option, release)
    with pytest.raises(ApiError) as unknown:
        c.call("POST", f"/nodes/{c.node}/qemu", vmid=1986, net0="virtio,bridge=vmbr0,vlan=5")
    assert "net0: invalid format - invalid key in comma-separated list property: vlan" in unknown.value.pve_message
    if qemu_server >= (9, 1, 14):  # stored as written (update_vm_api), its cputype last: the codec still reads it
        stored = c.get(f"/nodes/{c.node}/qemu/1987/config")["cpu"]
        assert stored == "level=30,host" and parse_props(stored, "cputype")["cputype"] == "host"


def test_a_drive_is_stored_as_qemu_server_prints_it_and_other_options_as_written(fresh_lab: LabHandle) -> None:
    """check_drive_param re-prints every drive of a request (volume first, other keys sorted, booleans as 1/0):
    a volume written last still allocates the disk. cpu, machine and agent are stored as the caller wrote them."""
    c = client(fresh_lab)
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=1985, name="f", memory=512, scsi0="ssd=on,discard=on,local:1",
               machine="viommu=virtio,q35", agent="type=virtio,1", cpu="flags=+aes,host", timeout=30)
    cfg = c.vm_config(1985)
    assert cfg["scsi0"] == "local:1985/vm-1985-disk-0.raw,discard=on,size=1G,ssd=1"
    assert (cfg["machine"], cfg["agent"], cfg["cpu"]) == ("viommu=virtio,q35", "type=virtio,1", "flags=+aes,host")
    c.call("PUT", f"/nodes/{c.node}/qemu/1985/config", scsi1="backup=no,file=local:1")
    assert c.vm_config(1985)["scsi1"] == "local:1985/vm-1985-disk-1.raw,backup=0,size=1G"


def test_the_guest_agent_is_configured_by_agents_enabled_wherever_it_stands(fresh_lab: LabHandle) -> None:
    """qemu-server reads agent with its format (get_qga_key), and PVE stores it as written: `type=virtio,1` has
    the agent enabled, `type=virtio,enabled=0` has not."""
    c = client(fresh_lab)
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=1984, name="g", memory=512, agent="type=virtio,1", timeout=30)
    with pytest.raises(ApiError, match="VM 1984 is not running"):  # past the agent check
        c.call("POST", f"/nodes/{c.node}/qemu/1984/agent/ping")
    c.call("PUT", f"/nodes/{c.node}/qemu/1984/config", agent="type=virtio,enabled=0")
    with pytest.raises(ApiError, match="No QEMU guest agent configured"):
        c.call("POST", f"/nodes/{c.node}/qemu/1984/agent/ping")
