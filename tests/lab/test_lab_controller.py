"""The lab inventory mirrors the example site and validates with the site model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from image_factory.errors import ValidationFailed
from image_factory.lab import cluster, controller
from image_factory.lab.config import LabConfig, LabError, LabPaths, private_dir, write_private
from image_factory.lab.controller import default_config, lab_settings, vault_environment, write_inventory
from image_factory.lab.pki import cert_fingerprint, ensure_ca, ensure_node_cert, ensure_ssh_key
from image_factory.settings import Settings
from image_factory.site.inventory import load_site

pytestmark = pytest.mark.unit


def _lab(tmp_path: Path) -> tuple[Settings, LabPaths, LabConfig, str]:
    settings = Settings.from_mapping({"lab_dir": str(tmp_path / "lab")})
    paths = LabPaths(settings.lab_dir)
    cfg = default_config(settings, slot=3)
    ensure_ca(paths.ca_cert, paths.ca_key)
    private_dir(paths.state_dir)
    keys = {}
    for h in cfg.hosts:
        write_private(paths.token_secret(h.name), f"secret-of-{h.name}-0123456789\n")
        cert = paths.host_dir(h.name) / "pve-ssl.pem"
        ensure_node_cert(paths.ca_cert, paths.ca_key, cert, cert.with_suffix(".key"), h.node, h.address)
        hk = ensure_ssh_key(paths.host_dir(h.name) / "hostkey", "root@x")
        keys[h.name] = (" ".join(hk.split()[:2]), cert)
    pub = ensure_ssh_key(paths.client_key, "lab-client")
    write_inventory(settings, paths, cfg, keys, pub)
    return settings, paths, cfg, pub


def test_default_config_mirrors_the_example_hypervisors_on_slot_addresses() -> None:
    cfg = default_config(Settings.from_mapping({}), slot=5)
    assert [(h.name, h.node, h.role, h.address, h.tls) for h in cfg.hosts] == [
        ("pve-mgmt", "pve-mgmt", "mgmt", "127.0.5.11", "ca"),
        ("pve-tenant", "pve-tenant", "tenant", "127.0.5.12", "fingerprint"),
    ]


@pytest.fixture(autouse=True)
def _private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


def test_lab_inventory_validates_and_keeps_names_ids_planes_roles_macs(tmp_path: Path) -> None:
    settings, paths, cfg, pub = _lab(tmp_path)
    example = load_site(settings.inventory, settings.images)
    with vault_environment(paths):
        site = load_site(lab_settings(settings, paths).inventory, settings.images)
    assert site.vms.keys() == example.vms.keys()
    for name, vm in site.vms.items():
        ex = example.vms[name]
        assert (vm.vmid, vm.plane, vm.role, vm.macs) == (ex.vmid, ex.plane, ex.role, ex.macs)
        assert vm.image == "debian-lab"
        assert vm.memory <= 1024
        assert pub in vm.cloudinit.ssh_keys
    mgmt, tenant = site.hypervisors["pve-mgmt"], site.hypervisors["pve-tenant"]
    assert mgmt.api_url == "https://127.0.3.11:8006" and mgmt.tls_ca_file == paths.ca_cert
    assert tenant.tls_fingerprint == cert_fingerprint(paths.host_dir("pve-tenant") / "pve-ssl.pem")
    assert mgmt.token_secret_file == paths.token_secret("pve-mgmt")
    assert mgmt.storage.import_dir == str(paths.import_dir("pve-mgmt"))
    assert (mgmt.storage.images, mgmt.storage.import_, mgmt.storage.cloudinit) == ("local", "local", "local")
    assert mgmt.ssh.host == "127.0.3.11" and mgmt.ssh.key_file == paths.client_key
    assert mgmt.ssh.host_key != tenant.ssh.host_key


def test_one_lab_token_secret_is_a_vaulted_inventory_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, paths, _, _ = _lab(tmp_path)
    text = paths.inventory.read_text()
    assert "token_secret: !vault |" in text and "$ANSIBLE_VAULT;1.2;AES256;lab" in text
    assert "secret-of-pve-tenant" not in text
    assert paths.vault_password.stat().st_mode & 0o777 == 0o600
    assert not str(paths.vault_password).startswith(str(settings.root))
    with vault_environment(paths):
        tenant = load_site(paths.inventory_dir, settings.images).hypervisors["pve-tenant"]
    assert tenant.token_secret is not None and tenant.token_secret_file is None
    assert tenant.token_secret.get_secret_value() == "secret-of-pve-tenant-0123456789"
    assert "secret-of" not in repr(tenant) and "secret-of" not in str(tenant.model_dump())
    monkeypatch.delenv("ANSIBLE_VAULT_IDENTITY_LIST", raising=False)
    monkeypatch.delenv("ANSIBLE_VAULT_PASSWORD_FILE", raising=False)
    with pytest.raises(ValidationFailed) as err:
        load_site(paths.inventory_dir, settings.images)
    [problem] = err.value.problems
    assert (problem.file, problem.entry, problem.key) == (str(paths.inventory), "pve-tenant", "pve.token_secret")
    assert "vault-encrypted and no vault password is configured" in problem.message


def test_token_secrets_live_outside_the_repository(tmp_path: Path) -> None:
    paths = LabPaths(Settings.from_mapping({}).lab_dir)
    assert not str(paths.state_dir).startswith(str(Settings.from_mapping({}).root))
    assert LabPaths(tmp_path / "a").state_dir != LabPaths(tmp_path / "b").state_dir


def test_lab_ca_has_no_key_usage_and_node_cert_is_signed_by_it(tmp_path: Path) -> None:
    from cryptography import x509

    ca_path, key_path = tmp_path / "ca.pem", tmp_path / "ca.key"
    ensure_ca(ca_path, key_path)
    assert key_path.stat().st_mode & 0o777 == 0o600
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    with pytest.raises(x509.ExtensionNotFound):
        ca.extensions.get_extension_for_class(x509.KeyUsage)
    cert_path = tmp_path / "node.pem"
    ensure_node_cert(ca_path, key_path, cert_path, tmp_path / "node.key", "pve-x", "127.0.9.11")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cert.verify_directly_issued_by(ca)
    fp = cert_fingerprint(cert_path)
    assert len(fp.split(":")) == 32 and fp == fp.upper()


@pytest.mark.parametrize(("change", "message"), [
    ({"real_boot": ["jump01", "nope"]}, r"unknown VM\(s\) nope"),
    ({"real_boot": "some"}, "real_boot must be"),
    ({"time_scale": -1}, "time_scale must be >= 0"),
    ({"time_scale": "fast"}, "must be numbers"),
    ({"slot": 300}, "slot must be"),
])
def test_bad_lab_config_is_refused_naming_the_knob(change: dict[str, object], message: str) -> None:
    from image_factory.lab.config import LabError
    from image_factory.lab.controller import example_vm_names

    settings = Settings.from_mapping({})
    cfg = default_config(settings)
    for key, value in change.items():
        setattr(cfg, key, value)
    with pytest.raises(LabError, match=message):
        cfg.validate(example_vm_names(settings), "lab.json")


def test_a_child_gone_at_start_is_reported_with_how_it_ended() -> None:
    # A signal leaves nothing in the child's log: the start error must say which one, or the exit status.
    killed = subprocess.Popen(["sleep", "30"])
    killed.kill()
    killed.wait()
    failed = subprocess.Popen(["sh", "-c", "exit 3"])
    failed.wait()
    running = subprocess.Popen(["sleep", "30"])
    try:
        assert controller._exit_status(killed) == " (killed by SIGKILL)"
        assert controller._exit_status(failed) == " (status 3)"
        assert controller._exit_status(running) == ""
        assert controller._exit_status(None) == ""
    finally:
        running.kill()
        running.wait()


def test_a_cluster_api_left_serving_other_nodes_than_the_first_is_replaced(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An API process a former lab.json started for some of the cluster's nodes, but not its first (the one whose
    marker the old code looked for), is stopped before the new one takes the nodes' ports."""
    settings = Settings.from_mapping({"lab_dir": str(tmp_path / "lab")})
    paths = LabPaths(settings.lab_dir)
    paths.run.mkdir(parents=True)
    cfg = default_config(settings, slot=3)
    cfg.cluster = {"name": "labc", "nodes": 3}
    cluster.ensure_nodes(cfg)
    c1, c2, c3 = cluster.members(cfg)
    markers = [a for h in (c2, c3) for a in ("--config", controller._pve_marker(paths, h.name))]
    old = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *markers], start_new_session=True)
    new = subprocess.Popen(["sleep", "120"])
    try:
        for h in (c2, c3):
            paths.pidfile(h.name, "pve").write_text(f"{old.pid}\n")
        monkeypatch.setattr(cluster, "start_api", lambda _paths, _nodes: new)
        started: list[tuple[int, str]] = []
        controller._start_cluster_api(paths, cfg, started, {})
        assert old.wait(timeout=30) is not None
        assert [paths.pidfile(h.name, "pve").read_text() for h in (c1, c2, c3)] == [f"{new.pid}\n"] * 3
    finally:
        for proc in (old, new):
            proc.kill()
            proc.wait()


def test_servers_still_starting_are_waited_for_whatever_their_command_line_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Right after Popen a child may still be inside execve, where /proc/<pid>/cmdline reads empty (one read in four
    right after Popen here; `ip netns exec`, a wired lab's sshd, execs twice): the lab took such a server for one
    that had exited at start (the CI flakes 'pve exited at start' and 'sshd exited at start', each with an empty
    log). A server this start made is judged by its own status: here each child's command line never names its
    marker, and the lab waits until the servers answer."""
    settings = Settings.from_mapping({"lab_dir": str(tmp_path / "lab")})
    paths = LabPaths(settings.lab_dir)
    paths.run.mkdir(parents=True)
    cfg = default_config(settings, slot=3)
    answers = iter([False] * 2)  # the first look finds nothing answering yet

    def up(_address: str, _port: int) -> bool:
        return next(answers, True)

    monkeypatch.setattr(controller, "_ssh_up", up)
    monkeypatch.setattr(controller, "_api_up", up)
    children = {(h.name, kind): subprocess.Popen(["sleep", "30"]) for h in cfg.hosts for kind in ("sshd", "pve")}
    try:
        for (name, kind), child in children.items():
            paths.pidfile(name, kind).write_text(f"{child.pid}\n")
            paths.control_socket(name).touch()
        controller._wait_ready(paths, cfg, children)  # returns: nothing exited
        children[(cfg.hosts[0].name, "sshd")].kill()
        children[(cfg.hosts[0].name, "sshd")].wait()
        answers = iter([False] * 8)
        with pytest.raises(LabError, match=rf"{cfg.hosts[0].name}: sshd exited at start \(killed by SIGKILL\)"):
            controller._wait_ready(paths, cfg, children)
    finally:
        for child in children.values():
            child.kill()
            child.wait()


def test_a_server_this_start_made_is_gone_only_when_it_has_exited(tmp_path: Path) -> None:
    marker = str(tmp_path / "pve.json")
    pidfile = tmp_path / "x.pid"
    child = subprocess.Popen(["sleep", "30"])  # its command line never names the marker: its status decides
    try:
        pidfile.write_text(f"{child.pid}\n")
        assert not controller._gone_at_start(child, pidfile, marker)
    finally:
        child.kill()
        child.wait()
    assert controller._gone_at_start(child, pidfile, marker)
    before = subprocess.Popen(["sh", "-c", "sleep 30", marker])  # one a former start left running
    try:
        pidfile.write_text(f"{before.pid}\n")
        assert not controller._gone_at_start(None, pidfile, marker)
    finally:
        before.kill()
        before.wait()
    assert controller._gone_at_start(None, pidfile, marker)
    pidfile.unlink()
    assert controller._gone_at_start(None, pidfile, marker)


def test_a_command_line_that_stays_empty_is_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a process that may be in an exec is read again: a kernel thread (kthreadd, pid 2) and a zombie read
    empty for good, and lab.leftovers looks at every process."""
    naps: list[float] = []
    monkeypatch.setattr(controller.time, "sleep", naps.append)
    assert controller._cmdline(2) == "" and naps == []
    zombie = subprocess.Popen(["true"])
    while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        naps.clear()  # (the wait for it to exit is not the code under test)
    try:
        assert controller._cmdline(zombie.pid) == "" and naps == []
    finally:
        zombie.wait()
