"""LabPve's access rules and upload checks, in process (no server started)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fakepve import PveError

from image_factory.lab.config import PRIVILEGES, TOKEN_ID
from image_factory.lab.pve import LabPve, NodeSpec

pytestmark = pytest.mark.unit


def make(tmp_path: Path) -> LabPve:
    secret, root = tmp_path / "secret", tmp_path / "root"
    secret.write_text("s3cret\n")
    root.write_text("pw\n")
    spec = NodeSpec(
        name="pve-x", node="pve-x", address="127.0.9.11", port=8006, cert=tmp_path / "c", key=tmp_path / "k",
        version="8.4.1", token_id=TOKEN_ID, token_secret_file=secret, root_password_file=root,
        privileges={p: list(v) for p, v in PRIVILEGES.items()}, storage_dir=tmp_path / "vz",
        staging_dir=tmp_path / "tmp", vms_dir=tmp_path / "vms", log_dir=tmp_path / "log",
        control_socket=tmp_path / "ctl.sock", slot=9,
    )
    return LabPve(spec)


def test_node_version_token_and_local_storage(tmp_path: Path) -> None:
    pve = make(tmp_path)
    assert list(pve.nodes) == ["pve-x"]
    assert pve.version == "8.4.1"
    assert pve.apitokens == {TOKEN_ID: "s3cret"}
    assert pve.storages["local"]["path"] == str(tmp_path / "vz")
    assert "import" in pve.storages["local"]["content"].split(",")
    assert (tmp_path / "vz" / "import").is_dir()


def test_every_storage_of_a_fresh_node_lists_its_volumes(tmp_path: Path) -> None:
    """Without a reset() first (as `lab.up` starts a node): local and the LVM-thin pool both answer."""
    pve = make(tmp_path)
    assert pve.storages["local-lvm"]["type"] == "lvmthin"
    assert pve.thin_dir == tmp_path / "thin" and pve.thin_dir.is_dir()
    for sid in pve.storages:
        assert isinstance(pve._volumes(sid), dict)


def test_token_rights_are_the_intersection_of_user_and_token_acls(tmp_path: Path) -> None:
    pve = make(tmp_path)
    user = TOKEN_ID.split("!")[0]
    assert pve.allowed(TOKEN_ID, "/vms/1101", "VM.Clone")
    assert not pve.allowed(TOKEN_ID, "/", "Sys.Modify")
    pve.grant(TOKEN_ID, "/", "Sys.Modify")  # the token alone is not enough
    assert not pve.allowed(TOKEN_ID, "/", "Sys.Modify")
    pve.grant(user, "/", "Sys.Modify")
    assert pve.allowed(TOKEN_ID, "/", "Sys.Modify")
    pve.grant(user, "/", "VM.Backup")  # the user alone is not enough either
    assert not pve.allowed(TOKEN_ID, "/vms/1", "VM.Backup")


def test_guest_agent_calls_need_vm_monitor_as_in_pve_84(tmp_path: Path) -> None:
    pve = make(tmp_path)
    check = ["perm", "/vms/{vmid}", ["VM.GuestAgent.Audit", "VM.GuestAgent.Unrestricted"], "any", 1]
    assert pve._check(TOKEN_ID, check, {"vmid": 1101})[0]
    pve.acl[TOKEN_ID] = [(p, s - {"VM.Monitor"}) for p, s in pve.acl[TOKEN_ID]]
    ok, why = pve._check(TOKEN_ID, check, {"vmid": 1101})
    assert not ok and "VM.Monitor" in why


@pytest.mark.parametrize(("content", "name", "ok"), [
    ("import", "fedora-44.qcow2", True), ("import", "a+b=c_d-1.2.raw", True), ("import", "x.vmdk", True),
    ("import", "x.ova", True), ("import", "x.img", False), ("import", "a b.qcow2", False),
    ("import", "x.qcow2.tmp", False), ("iso", "x.iso", True), ("iso", "x.qcow2", False),
])
def test_upload_filename_rules(tmp_path: Path, content: str, name: str, ok: bool) -> None:
    pve = make(tmp_path)
    store = pve.storages["local"]
    if ok:
        pve._check_upload_fields({"content": content}, name, store, "local")
    else:
        with pytest.raises(PveError) as exc:
            pve._check_upload_fields({"content": content}, name, store, "local")
        assert exc.value.status == 400


def test_upload_needs_content_and_paired_checksum_fields(tmp_path: Path) -> None:
    pve = make(tmp_path)
    store = pve.storages["local"]
    with pytest.raises(PveError) as exc:
        pve._check_upload_fields({}, "x.qcow2", store, "local")
    assert "content" in exc.value.errors
    with pytest.raises(PveError):
        pve._check_upload_fields({"content": "import", "checksum": "ab"}, "x.qcow2", store, "local")
    with pytest.raises(PveError):
        pve._check_upload_fields({"content": "import", "checksum-algorithm": "crc32", "checksum": "ab"},
                                 "x.qcow2", store, "local")


def test_import_files_are_listed_as_volumes(tmp_path: Path) -> None:
    pve = make(tmp_path)
    (tmp_path / "vz" / "import" / "a.qcow2").write_bytes(b"x" * 10)
    (tmp_path / "vz" / "import" / "partial.qcow2.tmp").write_bytes(b"x")
    vols = pve._volumes("local")
    assert vols["import/a.qcow2"]["size"] == 10
    assert "import/partial.qcow2.tmp" not in vols


def test_access_permissions_of_a_token_are_its_effective_rights(tmp_path: Path) -> None:
    pve = make(tmp_path)
    user = TOKEN_ID.split("!")[0]
    pve.grant(user, "/", "Sys.Modify")  # the user alone holds it: the token does not
    pve.acl[TOKEN_ID] = [(p, s - {"VM.Clone"}) for p, s in pve.acl[TOKEN_ID]]  # the token lacks it
    perms = asyncio.run(pve._permissions({}, TOKEN_ID))
    assert "Sys.Modify" not in perms["/"]
    assert "VM.Clone" not in perms["/vms"] and "VM.Allocate" in perms["/vms"]
    exact = asyncio.run(pve._permissions({"path": "/vms/1101"}, TOKEN_ID))
    assert list(exact) == ["/vms/1101"] and "VM.Clone" not in exact["/vms/1101"]
    assert "VM.PowerMgmt" in exact["/vms/1101"]


def test_nic_bridges_need_sdn_use_as_in_qemu_server(tmp_path: Path) -> None:
    pve = make(tmp_path)
    pve._check_bridge_access(TOKEN_ID, {"net0": "virtio=02:DE:10:01:01:00,bridge=vmbr0,tag=5", "memory": "1024"})
    pve.acl[TOKEN_ID] = [(p, s - {"SDN.Use"}) for p, s in pve.acl[TOKEN_ID]]
    with pytest.raises(PveError) as err:
        pve._check_bridge_access(TOKEN_ID, {"net1": "virtio,bridge=vmbr1,tag=99"})
    assert "/sdn/zones/localnetwork/vmbr1/99" in str(getattr(err.value, "message", err.value))
    pve._check_bridge_access(TOKEN_ID, {"memory": "1024"})  # no NIC written: nothing to check


def test_a_pve9_node_checks_the_guest_agent_privileges_themselves(tmp_path: Path) -> None:
    import dataclasses

    pve = make(tmp_path)
    nine = LabPve(dataclasses.replace(pve.spec, version="9.1.4", control_socket=tmp_path / "ctl9.sock",
                                      privileges={"/vms": ["VM.Audit", "VM.Monitor"]}))
    check = ["perm", "/vms/{vmid}", ["VM.GuestAgent.Audit"], "any", 1]
    ok, why = nine._check(TOKEN_ID, check, {"vmid": 1101})
    assert not ok and "VM.GuestAgent.Audit" in why  # VM.Monitor means nothing on 9


def test_the_saved_state_is_written_in_a_thread_and_only_when_it_changed(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow state write (a rename waiting on the journal) must not hold up the node's event loop."""
    import threading

    pve = make(tmp_path)
    release, writes = threading.Event(), []
    real_write = pve._write_state

    def slow_write(text: str) -> None:
        assert release.wait(5), "the event loop never ran while the state was being written"
        writes.append(text)
        real_write(text)

    monkeypatch.setattr(pve, "_write_state", slow_write)

    async def scenario() -> None:
        async def meanwhile() -> None:
            await asyncio.sleep(0)
            release.set()  # runs only if the loop is free while the write waits

        await asyncio.gather(pve.persist_state(), meanwhile())
        await pve.persist_state()  # nothing changed: no second write

    asyncio.run(scenario())
    assert len(writes) == 1
    assert json.loads(pve.state_file.read_text())["node"] == "pve-x"


def test_a_reset_node_has_an_empty_thin_pool(tmp_path: Path) -> None:
    """A thin volume left by the last test would be replaced by the next template's rename (and on ext4
    that rename first writes the new volume's data out: measured 0.14 s, with iowait, in bench/publish)."""
    pve = make(tmp_path)
    (pve.thin_dir / "base-9000-disk-0").write_bytes(b"left over")
    (pve.thin_dir / "vm-101-disk-0").write_bytes(b"left over")
    asyncio.run(pve.reset())
    assert list(pve.thin_dir.iterdir()) == []


def test_a_template_conversion_never_renames_over_an_existing_volume(tmp_path: Path) -> None:
    """lvrename refuses an existing name; the lab's rename must not silently replace a base volume either."""
    from fakepve import TaskError

    pve = make(tmp_path)
    pve.storages["local-lvm"]["volumes"] = {"vm-9000-disk-0": {"vmid": 9000, "format": "raw", "size": 1}}
    (pve.thin_dir / "vm-9000-disk-0").write_bytes(b"new")
    (pve.thin_dir / "base-9000-disk-0").write_bytes(b"old")
    with pytest.raises(TaskError, match="base-9000-disk-0' already exists"):
        pve._qm_rename_volume("local-lvm:vm-9000-disk-0")
    assert (pve.thin_dir / "base-9000-disk-0").read_bytes() == b"old"
    assert "vm-9000-disk-0" in pve.storages["local-lvm"]["volumes"]  # the model is unchanged too
    (pve.thin_dir / "base-9000-disk-0").unlink()
    assert pve._qm_rename_volume("local-lvm:vm-9000-disk-0") == "local-lvm:base-9000-disk-0"
    assert (pve.thin_dir / "base-9000-disk-0").read_bytes() == b"new"


def test_config_keys_need_the_privileges_qemu_server_names(tmp_path: Path) -> None:
    """check_vm_modify_config_perm: cloud-init options and ipconfigN need VM.Config.Cloudinit or .Network (either),
    ostype is a general option (VM.Config.Options), never VM.Config.HWType."""
    pve = make(tmp_path)
    assert pve._config_priv("ciuser") == pve._config_priv("ipconfig0") == "VM.Config.Cloudinit|VM.Config.Network"
    assert pve._config_priv("ostype") == "VM.Config.Options"
    assert pve._config_priv("scsihw") == "VM.Config.HWType"
    keep = {"VM.Config.Cloudinit", "VM.Config.Network", "VM.Config.Options"}
    pve.acl[TOKEN_ID] = [(p, s - keep) for p, s in pve.acl[TOKEN_ID]]
    for key in ("sshkeys", "ipconfig0", "ostype"):
        with pytest.raises(PveError) as err:
            pve.require(TOKEN_ID, "/vms/1101", pve._config_priv(key))
        assert err.value.status == 403
    pve.grant(TOKEN_ID, "/vms", "VM.Config.Network")  # either one of the pair is enough
    pve.require(TOKEN_ID, "/vms/1101", pve._config_priv("sshkeys"))


def test_each_release_runs_the_qemu_server_that_shipped_with_it(tmp_path: Path) -> None:
    from image_factory.lab.config import LabConfig, LabError, LabHost
    from image_factory.lab.spec import RELEASES, release_of

    assert release_of("9.1.19").qemu_server == "9.1.15"  # not 9.1.19: that qemu-server came with 9.2
    assert release_of("9.2.5").qemu_server == "9.2.0"
    assert make(tmp_path).qemu_server == (8, 3, 12)
    bad = LabConfig(hosts=[LabHost("pve-x", "pve-x", "tenant", "127.0.9.11", pve_version="9.1.17")])
    with pytest.raises(LabError, match=r"pve_version '9.1.17' is not a release the lab models \(pve-manager 8.4.1"):
        bad.validate()
    assert set(RELEASES) == {"8.4.1", "9.1.19", "9.2.5"}


def test_the_lab_address_shows_only_where_the_guest_has_an_address_of_its_own(tmp_path: Path) -> None:
    """A really booted guest's agent answer gets the VM's lab address (qemu's 1:1 forward to the guest) on net0's
    NIC only once the guest configured an IPv4 address there itself; a failed network setup stays visible."""
    from types import SimpleNamespace

    from fakepve import FakeVm

    pve, vm = make(tmp_path), FakeVm(2201, "sandbox01", node="pve-x")
    proc = SimpleNamespace(nics=[("net0", "02:DE:20:01:01:00")])
    v6 = {"ip-address": "fe80::de:20ff:fe01:100", "ip-address-type": "ipv6", "prefix": 64}
    v4 = {"ip-address": "10.0.2.15", "ip-address-type": "ipv4", "prefix": 24}

    def answer(*addresses: dict[str, object]) -> list[dict[str, object]]:
        return [{"name": "eth0", "hardware-address": "02:de:20:01:01:00", "ip-addresses": list(addresses)}]

    assert pve._with_lab_address(vm, proc, answer(v6)) == answer(v6)
    assert pve._with_lab_address(vm, proc, answer()) == answer()
    lab_ip = {"ip-address": "127.109.8.153", "ip-address-type": "ipv4", "prefix": 32}
    assert pve._with_lab_address(vm, proc, answer(v6, v4)) == answer(lab_ip, v6, v4)


def test_a_node_switches_release_only_within_its_major(tmp_path: Path) -> None:
    """The role grants per major (VM.Monitor on 8, VM.GuestAgent.* on 9): a node runs another release of its own
    major only, and a release the lab does not model is refused by name."""
    pve = make(tmp_path)
    with pytest.raises(ValueError, match=r"release '9.2.5' is of another major than the node's 8.4.1"):
        pve.switch_release("9.2.5")
    with pytest.raises(ValueError, match=r"release '8.4.7' is not one the lab models"):
        pve.switch_release("8.4.7")
    assert (pve.version, pve.packages.qemu_server) == ("8.4.1", "8.3.12")


def test_control_ops_act_through_the_registry_and_an_unknown_op_is_refused(tmp_path: Path) -> None:
    pve = make(tmp_path)
    asyncio.run(pve.control("datacenter", {"set": {"registered-tags": "a;b"}}))
    assert pve.cluster_options == {"registered-tags": "a;b"}
    asyncio.run(pve.control("time_scale", {"value": 0.5}))
    state = asyncio.run(pve.control("state", {}))
    assert (state["node"], state["time_scale"]) == ("pve-x", 0.5)
    asyncio.run(pve.control("datacenter", {"delete": ["registered-tags"]}))
    assert pve.cluster_options == {}
    with pytest.raises(ValueError, match="unknown control op 'explode'"):
        asyncio.run(pve.control("explode", {}))
