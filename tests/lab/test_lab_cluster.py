"""The lab's modelled three-node cluster (lab/cluster.py, lab/pve/members.py), asked over HTTPS and SSH as the
factory asks a real one: every node's endpoint answers for the whole cluster, VMIDs are cluster-wide, the shared
storage and /etc/pve are one for all nodes, clone's `target` follows qemu-server's rules, and a node that goes
down is reported as PVE reports it. No VM boots."""

from __future__ import annotations

import hashlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from image_factory.lab import controller
from image_factory.lab.cluster import SHARED_STORAGE, apply_option, ensure_nodes
from image_factory.lab.config import LabConfig, LabError, LabHost
from image_factory.lab.pki import cert_fingerprint
from image_factory.lab.pytest_plugin import LabHandle
from image_factory.pve import apiupload, hostlock
from image_factory.pve.client import ApiError, PveClient, TaskFailed
from image_factory.pve.hostlock import CLUSTER_LOCK_NAME, ClusterLock, LockBusy
from image_factory.pve.sshlink import RemoteError, SshLink

pytestmark = pytest.mark.lab
NODES = ("pve-c1", "pve-c2", "pve-c3")


@pytest.fixture
def clab(fresh_cluster_lab: LabHandle) -> Iterator[LabHandle]:
    yield fresh_cluster_lab


def api(lab: LabHandle, host: str) -> PveClient:
    """A client of that node's endpoint alone (the inventory's api_urls would fall through to its peers)."""
    hv = lab.hv(host)
    return PveClient(hv.model_copy(update={"api_urls": []}), timeout=10)


def refused(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_the_cluster_nodes_are_in_the_lab_beside_the_independent_hosts(clab: LabHandle) -> None:
    assert list(clab.hypervisors) == ["pve-mgmt", "pve-tenant", "pve-tenant2", *NODES]
    assert clab.cluster_nodes() == list(NODES)
    for host in NODES:
        hv = clab.hv(host)
        assert hv.role == "tenant" and hv.tls_ca_file is not None
        assert hv.api_urls == [clab.hv(peer).api_url for peer in NODES if peer != host]
        assert api(clab, host).version()["version"] == "9.2.5"
    assert [(clab.hv(n).template_vmids.first, clab.hv(n).template_vmids.last) for n in NODES] == [
        (9100, 9199), (9200, 9299), (9300, 9399)]


def test_every_node_lists_the_whole_cluster_with_its_own_view(clab: LabHandle) -> None:
    for host in NODES:
        client = api(clab, host)
        status = client.get("/cluster/status")
        assert status[0] == {"type": "cluster", "id": "cluster", "name": "labc", "nodes": 3, "quorate": 1,
                             "version": 3}
        assert {(n["name"], n["ip"], n["online"], n["local"]) for n in status[1:]} == {
            (n, urlsplit(clab.hv(n).api_url).hostname, 1, int(n == host)) for n in NODES}
        nodes = {n["node"]: n for n in client.get("/nodes")}
        assert {n: v["status"] for n, v in nodes.items()} == dict.fromkeys(NODES, "online")
        for name, item in nodes.items():
            assert item["ssl_fingerprint"] == cert_fingerprint(clab.paths.host_dir(name) / "pve-ssl.pem")
        storages = {(s["node"], s["storage"]): s for s in client.get("/cluster/resources", type="storage")}
        for node in NODES:
            assert storages[(node, SHARED_STORAGE)]["shared"] == 1
            assert storages[(node, "local")]["shared"] == 0
            assert storages[(node, SHARED_STORAGE)]["status"] == "available"
        assert client.cluster_nodes() == dict.fromkeys(NODES, True)


def test_a_vmid_is_cluster_wide_and_any_endpoint_reaches_any_node(clab: LabHandle) -> None:
    c1, c3 = api(clab, "pve-c1"), api(clab, "pve-c3")
    c1.run_task("POST", "/nodes/pve-c1/qemu", vmid=2500, name="first", memory=512)
    with pytest.raises(ApiError) as refused_create:
        c3.post("/nodes/pve-c2/qemu", vmid=2500, name="second", memory=512)
    assert refused_create.value.status == 500
    assert "unable to create VM 2500 - VM 2500 already exists on node 'pve-c1'" in str(refused_create.value)
    seen = [(int(v["vmid"]), v["node"], v["name"]) for v in c3.get("/cluster/resources", type="vm")]
    assert seen == [(2500, "pve-c1", "first")]
    # pve-c2's endpoint forwards a call for pve-c1 (pveproxy), and a node's own list holds its own VMs only
    assert api(clab, "pve-c2").get("/nodes/pve-c1/qemu/2500/config")["name"] == "first"
    assert api(clab, "pve-c2").list_vms() == []
    with pytest.raises(ApiError, match="does not exist"):
        c1.get("/nodes/pve-c2/qemu/2500/config")
    # /cluster/nextid counts every node's guests
    c1.run_task("POST", "/nodes/pve-c1/qemu", vmid=100, name="lowest", memory=512)
    assert api(clab, "pve-c2").get("/cluster/nextid") == "101"
    with pytest.raises(ApiError, match="VM 2500 already exists"):
        c3.get("/cluster/nextid", vmid=2500)


def test_the_shared_storage_is_one_directory_for_every_node(clab: LabHandle) -> None:
    shared = clab.paths.shared_storage_dir("labc")
    with SshLink("pve-c1", clab.hv("pve-c1").ssh) as link:
        link.run(["qemu-img", "create", "-q", "-f", "qcow2", str(shared / "import" / "up.qcow2"), "16M"])
        link.run(["qemu-img", "create", "-q", "-f", "qcow2", str(clab.hv("pve-c1").storage.import_dir) + "/own.qcow2",
                  "16M"])
    own = api(clab, "pve-c1").get("/nodes/pve-c1/storage/local/content")
    assert [c["volid"] for c in own] == ["local:import/own.qcow2"]
    for host in ("pve-c2", "pve-c3"):
        content = api(clab, host).get(f"/nodes/{host}/storage/{SHARED_STORAGE}/content")
        assert [(c["volid"], c["content"]) for c in content] == [(f"{SHARED_STORAGE}:import/up.qcow2", "import")]
        assert api(clab, host).get(f"/nodes/{host}/storage/local/content") == []  # each node's local is its own
        with SshLink(host, clab.hv(host).ssh) as link:
            assert link.run(["ls", str(shared / "import")]).stdout.split() == ["up.qcow2"]


def _template(client: PveClient, node: str, vmid: int, storage: str) -> None:
    client.run_task("POST", f"/nodes/{node}/qemu", vmid=vmid, name=f"tpl-{vmid}", memory=512,
                    scsi0=f"{storage}:1")
    client.run_task("POST", f"/nodes/{node}/qemu/{vmid}/template")


def test_clone_to_another_node_needs_shared_storage_and_lands_there(clab: LabHandle) -> None:
    c1 = api(clab, "pve-c1")
    _template(c1, "pve-c1", 9100, SHARED_STORAGE)
    c1.run_task("POST", "/nodes/pve-c1/qemu/9100/clone", newid=2601, name="linked", target="pve-c2")
    c1.run_task("POST", "/nodes/pve-c1/qemu/9100/clone", newid=2602, name="full", target="pve-c3", full=1,
                storage=SHARED_STORAGE)
    where = {int(v["vmid"]): v["node"] for v in c1.get("/cluster/resources", type="vm")}
    assert where == {9100: "pve-c1", 2601: "pve-c2", 2602: "pve-c3"}
    linked = api(clab, "pve-c3").get("/nodes/pve-c2/qemu/2601/config")["scsi0"]
    assert linked.startswith(f"{SHARED_STORAGE}:9100/base-9100-disk-0.raw/2601/vm-2601-disk-0.qcow2,")
    assert (clab.paths.shared_storage_dir("labc") / "images" / "2601").is_dir()

    with pytest.raises(ApiError, match="can't clone to non-shared storage 'local'"):
        c1.post("/nodes/pve-c1/qemu/9100/clone", newid=2603, target="pve-c2", full=1, storage="local")
    _template(c1, "pve-c1", 9101, "local")
    with pytest.raises(ApiError, match=r"can't clone VM to node 'pve-c2' \(VM uses local storage\)"):
        c1.post("/nodes/pve-c1/qemu/9101/clone", newid=2604, target="pve-c2")
    with pytest.raises(ApiError, match=r"can't clone VM to node 'pve-c2' \(VM uses local storage\)"):
        c1.post("/nodes/pve-c1/qemu/9101/clone", newid=2604, target="pve-c2", full=1, storage=SHARED_STORAGE)
    with pytest.raises(ApiError, match="no such cluster node 'pve-c9'"):
        c1.post("/nodes/pve-c1/qemu/9100/clone", newid=2605, target="pve-c9")
    c1.run_task("POST", "/nodes/pve-c1/qemu/9101/clone", newid=2606, name="local-linked")  # on its own node
    assert {int(v["vmid"]) for v in c1.list_vms()} == {9100, 9101, 2606}


def test_a_clone_started_on_its_target_node_runs_there_from_the_shared_storage(clab: LabHandle) -> None:
    if clab.config.real_boot == "none":
        pytest.skip("lab started with --lab-real-boot=none")
    c1 = api(clab, "pve-c1")
    _template(c1, "pve-c1", 9102, SHARED_STORAGE)
    c1.run_task("POST", "/nodes/pve-c1/qemu/9102/clone", newid=2950, name="runs-on-c2", target="pve-c2")
    api(clab, "pve-c3").run_task("POST", "/nodes/pve-c2/qemu/2950/status/start")  # asked through pve-c3
    qemu = clab.qemu("pve-c2", 2950)
    assert qemu is not None and clab.qemu("pve-c1", 2950) is None
    cmdline = Path(f"/proc/{qemu['pid']}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert str(clab.paths.shared_storage_dir("labc") / "images" / "2950") in cmdline
    assert api(clab, "pve-c1").get("/nodes/pve-c2/qemu/2950/status/current")["status"] == "running"
    api(clab, "pve-c1").run_task("POST", "/nodes/pve-c2/qemu/2950/status/stop")
    assert clab.qemu("pve-c2", 2950) is None


def test_a_node_going_offline_is_reported_for_it_alone_and_comes_back(clab: LabHandle) -> None:
    api(clab, "pve-c2").run_task("POST", "/nodes/pve-c2/qemu", vmid=2700, name="on-c2", memory=512)
    session = SshLink("pve-c2", clab.hv("pve-c2").ssh).connect()
    clab.node_offline("pve-c2")
    with pytest.raises((RemoteError, OSError, EOFError)):  # an open session is cut with it
        session.run(["true"], timeout=10)
    session.close()
    address = urlsplit(clab.hv("pve-c2").api_url).hostname
    assert address is not None
    assert refused(address, 8006) and refused(clab.hv("pve-c2").ssh.host, clab.hv("pve-c2").ssh.port)
    for host in ("pve-c1", "pve-c3"):
        client = api(clab, host)
        with pytest.raises(ApiError) as offline:
            client.get("/nodes/pve-c2/qemu")
        assert (offline.value.status, offline.value.pve_message) == (595, "No route to host")
        resources = client.get("/cluster/resources")
        assert {r["node"]: r["status"] for r in resources if r["type"] == "node"} == {
            "pve-c1": "online", "pve-c2": "offline", "pve-c3": "online"}
        assert [(r["vmid"], r["status"]) for r in resources if r["type"] == "qemu"] == [(2700, "unknown")]
        assert {r["status"] for r in resources if r["type"] == "storage" and r["node"] == "pve-c2"} == {"unknown"}
        assert client.cluster_nodes() == {"pve-c1": True, "pve-c2": False, "pve-c3": True}
        assert client.get("/cluster/status")[0]["quorate"] == 1  # two of three
        assert client.get(f"/nodes/{host}/qemu") == []  # its own calls are untouched
    # the VMID stays taken while its node is away
    with pytest.raises(ApiError, match="VM 2700 already exists on node 'pve-c2'"):
        api(clab, "pve-c1").post("/nodes/pve-c1/qemu", vmid=2700, name="again", memory=512)

    clab.node_online("pve-c2")
    assert [int(v["vmid"]) for v in api(clab, "pve-c2").list_vms()] == [2700]
    assert api(clab, "pve-c1").cluster_nodes() == dict.fromkeys(NODES, True)
    with SshLink("pve-c2", clab.hv("pve-c2").ssh) as link:
        assert link.run(["true"]).status == 0


def test_two_nodes_down_lose_quorum(clab: LabHandle) -> None:
    clab.node_offline("pve-c2")
    clab.node_offline("pve-c3")
    c1 = api(clab, "pve-c1")
    assert c1.get("/cluster/status")[0]["quorate"] == 0
    with pytest.raises(ApiError, match="cluster not ready - no quorum"):
        c1.post("/nodes/pve-c1/qemu", vmid=2800, name="no-quorum", memory=512)


def test_a_lock_made_in_etc_pve_on_one_node_holds_on_the_others(clab: LabHandle) -> None:
    lock = clab.etc_pve() / "priv" / "lock" / "image-factory"
    with SshLink("pve-c1", clab.hv("pve-c1").ssh) as link:
        link.run(["mkdir", str(lock)])
    with SshLink("pve-c2", clab.hv("pve-c2").ssh) as link, pytest.raises(RemoteError, match="File exists"):
        link.run(["mkdir", str(lock)])
    with SshLink("pve-c3", clab.hv("pve-c3").ssh) as link:
        link.run(["rmdir", str(lock)])
    with SshLink("pve-c2", clab.hv("pve-c2").ssh) as link:
        link.run(["mkdir", str(lock)])
    clab.reset()
    assert not lock.exists()


def test_a_dead_holders_cluster_lock_expires_as_pmxcfs_lets_it_and_a_renewed_one_does_not(
        clab: LabHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """pmxcfs drops a lock untouched for 120 s when a waiter asks (utime 0): the factory's waiter takes over a dead
    holder's lock after that, and a live holder's touches keep its lock from every waiter."""
    monkeypatch.setattr(hostlock, "CLUSTER_LOCK_RENEW", 1)  # the holder touches every second
    lock_dir = clab.etc_pve() / "priv" / "lock"
    held = lock_dir / CLUSTER_LOCK_NAME

    def through(host: str, owner: str, wait: int) -> ClusterLock:
        hv = clab.hv(host)
        return ClusterLock(SshLink(hv.name, hv.ssh).connect(), str(lock_dir), owner, wait=wait, owns_link=True)

    with SshLink("pve-c1", clab.hv("pve-c1").ssh) as link:
        link.run(["mkdir", str(held)])  # its holder's node died: never touched again
    early = through("pve-c2", "ops@a pid 1 run early", wait=1)
    try:
        with pytest.raises(LockBusy, match="was not free"):
            early.acquire()  # asked within the timeout (120 s at the lab's own time scale): it stays
    finally:
        early.release()
    assert held.is_dir()
    clab.time_scale("pve-c1", 0.05)  # the cluster's pmxcfs timeout, 120 PVE seconds, now 6 s
    taker = through("pve-c3", "ops@b pid 2 run taker", wait=60)
    taker.acquire()  # at the timeout the waiter's request drops it, and its mkdir wins
    try:
        assert taker.held and (lock_dir / f"{CLUSTER_LOCK_NAME}.owner").read_text().strip() == "ops@b pid 2 run taker"
        late = through("pve-c2", "ops@c pid 3 run late", wait=12)
        try:
            with pytest.raises(LockBusy, match="in progress by ops@b pid 2 run taker"):
                late.acquire()  # twice the timeout, asking all along
        finally:
            late.release()
        assert taker.held and held.is_dir()
    finally:
        taker.release()


def test_a_shared_storage_lock_is_the_clusters_cfs_lock_in_etc_pve(clab: LabHandle) -> None:
    c2 = api(clab, "pve-c2")
    _template(c2, "pve-c2", 9200, SHARED_STORAGE)
    cfs_lock = clab.etc_pve() / "priv" / "lock" / f"storage-{SHARED_STORAGE}"
    clab.lock_storage("pve-c1", SHARED_STORAGE)  # a task on pve-c1 allocating on the shared storage
    assert cfs_lock.is_dir()
    assert clab.state("pve-c3")["storage_locks"] == {SHARED_STORAGE: "scenario"}
    clab.time_scale("pve-c2", 0.01)  # PVE's 10 s wait in 0.1 s
    with pytest.raises(TaskFailed, match=f"cfs-lock 'storage-{SHARED_STORAGE}' error: got lock request timeout"):
        c2.run_task("POST", "/nodes/pve-c2/qemu/9200/clone", newid=2801, name="waits")
    clab.clear_faults("pve-c1")
    assert not cfs_lock.exists()
    # the same directory taken over SSH (an admin's or the factory's cluster lock) holds PVE too
    with SshLink("pve-c3", clab.hv("pve-c3").ssh) as link:
        link.run(["mkdir", str(cfs_lock)])
        with pytest.raises(TaskFailed, match="got lock request timeout"):
            c2.run_task("POST", "/nodes/pve-c2/qemu/9200/clone", newid=2801, name="waits")
        link.run(["rmdir", str(cfs_lock)])
    c2.run_task("POST", "/nodes/pve-c2/qemu/9200/clone", newid=2801, name="runs")
    assert not cfs_lock.exists()
    # a local storage's lock stays the node's own
    clab.lock_storage("pve-c1", "local")
    assert clab.state("pve-c2")["storage_locks"] == {}
    assert clab.state("pve-c1")["storage_locks"] == {"local": "scenario"}


def test_an_api_upload_through_one_node_lands_on_the_node_it_names(clab: LabHandle, tmp_path: Path) -> None:
    image = tmp_path / "up.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    via_c1 = PveClient(clab.hv("pve-c2").model_copy(update={"api_url": clab.hv("pve-c1").api_url, "api_urls": []}))
    sent = apiupload.send(via_c1, SHARED_STORAGE, "via-c1.qcow2", image, digest, progress=None, timeout=60)
    assert sent >= image.stat().st_size
    content = api(clab, "pve-c3").get(f"/nodes/pve-c3/storage/{SHARED_STORAGE}/content")
    assert [c["volid"] for c in content] == [f"{SHARED_STORAGE}:import/via-c1.qcow2"]
    tasks = api(clab, "pve-c2").get("/nodes/pve-c2/tasks")
    assert [t["type"] for t in tasks] == ["imgcopy"]  # staged and imported by pve-c2, the node the call named
    assert api(clab, "pve-c1").get("/nodes/pve-c1/tasks") == []


def test_a_restart_of_the_lab_keeps_each_nodes_vms_on_their_node(clab: LabHandle) -> None:
    api(clab, "pve-c1").run_task("POST", "/nodes/pve-c1/qemu", vmid=2900, name="c1-shared", memory=512,
                                 scsi0=f"{SHARED_STORAGE}:1")
    api(clab, "pve-c3").run_task("POST", "/nodes/pve-c3/qemu", vmid=2901, name="c3-local", memory=512,
                                 scsi0="local:1")
    controller.down(clab.base_settings)
    controller.up(clab.base_settings, clab.config)
    where = {int(v["vmid"]): v["node"] for v in api(clab, "pve-c2").get("/cluster/resources", type="vm")}
    assert where == {2900: "pve-c1", 2901: "pve-c3"}
    shared = api(clab, "pve-c2").get(f"/nodes/pve-c2/storage/{SHARED_STORAGE}/content")
    assert [c["volid"] for c in shared] == [f"{SHARED_STORAGE}:2900/vm-2900-disk-0.raw"]
    assert [c["volid"] for c in api(clab, "pve-c3").get("/nodes/pve-c3/storage/local/content")] == [
        "local:2901/vm-2901-disk-0.raw"]


def test_the_cluster_knob_is_checked_before_anything_starts() -> None:
    base = [LabHost(name="pve-mgmt", node="pve-mgmt", role="mgmt", address="127.0.0.11")]
    cfg = LabConfig(hosts=list(base), cluster={"name": "labc", "nodes": 3})
    ensure_nodes(cfg)
    ensure_nodes(cfg)  # once: a lab.json written by lab.up lists them already
    assert [(h.name, h.address, h.cluster) for h in cfg.hosts[1:]] == [
        ("pve-c1", "127.0.0.12", "labc"), ("pve-c2", "127.0.0.13", "labc"), ("pve-c3", "127.0.0.14", "labc")]
    cfg.validate()
    for knob, message in (({"name": "labc", "nodes": 1}, "cluster.nodes must be"),
                          ({"name": "lab_c"}, "cluster.name 'lab_c'"),
                          ({"nodes": 3, "disks": 2}, "cluster: unknown key(s) disks"),
                          ({"role": "edge"}, "cluster.role must be mgmt or tenant")):
        with pytest.raises(LabError, match="lab config: " + message.replace("(", r"\(").replace(")", r"\)")):
            ensure_nodes(LabConfig(hosts=list(base), cluster=knob))
    with pytest.raises(LabError, match="has 3 node host"):
        LabConfig(hosts=cfg.hosts, cluster={"name": "labc", "nodes": 2}).validate()
    with pytest.raises(LabError, match="no cluster knob"):
        LabConfig(hosts=cfg.hosts).validate()
    assert cfg.placement == {"tenant": "spread"}  # the plane has several hypervisors now


def test_lab_up_cluster_option_adds_resizes_and_removes_the_nodes() -> None:
    cfg = LabConfig(hosts=[LabHost(name="pve-mgmt", node="pve-mgmt", role="mgmt", address="127.0.0.11")],
                    placement={"tenant": "fill"})
    apply_option(cfg, "labc", "lab.up --cluster")
    assert [h.name for h in cfg.hosts] == ["pve-mgmt", "pve-c1", "pve-c2", "pve-c3"]
    assert cfg.placement == {"tenant": "fill"}  # a policy lab.json names stays
    apply_option(cfg, "labc:2", "lab.up --cluster")
    assert [(h.name, h.address) for h in cfg.hosts] == [
        ("pve-mgmt", "127.0.0.11"), ("pve-c1", "127.0.0.12"), ("pve-c2", "127.0.0.13")]
    cfg.validate()
    with pytest.raises(LabError, match=r"lab.up --cluster: 'labc:x' is not NAME or NAME:NODES"):
        apply_option(cfg, "labc:x", "lab.up --cluster")
    apply_option(cfg, "none", "lab.up --cluster")
    assert ([h.name for h in cfg.hosts], cfg.cluster) == (["pve-mgmt"], None)
