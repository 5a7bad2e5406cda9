"""The command line under attack, in-process (invoke) against two live fakepve hypervisors: bad input,
secrets, markup, live MAC checks.

Every case is one mutation of the example site. Each must end with exit code 2 and one clear error that
names the file, the entry and the key; no traceback; and not a single request to either hypervisor.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from invoke import Collection, Program

from image_factory.settings import DEFAULTS
from image_factory.tasks import build, deploy, image, inventory, lab, mac, pipeline, publish

from .test_deploy_fakepve import FakeSite, fake_site

pytestmark = pytest.mark.unit

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKfXoTQ8mJ2n8jvU4vG0p6Y1sWq3bZr5nH7cLd9eFa2M ansible@deevnet"


def program() -> Program:
    ns = Collection()
    for module in (inventory, build, image, publish, deploy, mac, lab):
        ns.add_collection(module.ns)
    ns.add_task(pipeline.pipeline_task, name="pipeline")
    ns.configure({"factory": dict(DEFAULTS)})
    return Program(namespace=ns, version="test")


def hv(name: str = "pve-mgmt") -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda d: d["all"]["children"]["hypervisors"]["hosts"][name]["pve"]


def vm(name: str = "metrics01", plane: str = "mgmt") -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda d: d["all"]["children"][plane]["hosts"][name]["vm"]


def setter(where: Callable[[dict[str, Any]], Any], key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(data: dict[str, Any]) -> None:
        node = where(data)
        *path, last = key.split(".")
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value
    return apply


def rename_host(group: str, old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def apply(data: dict[str, Any]) -> None:
        hosts = data["all"]["children"][group]["hosts"]
        hosts[new] = hosts.pop(old)
    return apply


# (case id, mutation, entry named in the error, key named in the error)
CASES: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    # property-string injection
    ("bridge-injection", setter(hv(), "bridge", "vmbr0,tag=5"), "pve-mgmt", "pve.bridge"),
    ("nic-bridge-injection", setter(vm(), "nics.0.bridge", "vmbr0,firewall=0"), "metrics01", "vm.nics.0.bridge"),
    ("bridge-too-long", setter(hv(), "bridge", "vmbr0123456789ab"), "pve-mgmt", "pve.bridge"),
    ("bridge-space", setter(hv(), "bridge", "vmbr 0"), "pve-mgmt", "pve.bridge"),
    ("storage-injection", setter(hv(), "storage", {"images": "local-lvm,size=1T"}), "pve-mgmt", "pve.storage.images"),
    ("storage-import-injection", setter(hv(), "storage", {"import": "local;rm"}), "pve-mgmt", "pve.storage.import"),
    ("cloudinit-storage-colon", setter(hv(), "storage", {"cloudinit": "local:cloudinit"}), "pve-mgmt",
     "pve.storage.cloudinit"),
    ("import-dir-traversal", setter(hv(), "storage", {"import_dir": "/var/lib/vz/../../etc"}), "pve-mgmt",
     "pve.storage.import_dir"),
    ("import-dir-shell", setter(hv(), "storage", {"import_dir": "/var/lib/vz/import;reboot"}), "pve-mgmt",
     "pve.storage.import_dir"),
    ("import-dir-subst", setter(hv(), "storage", {"import_dir": "/tmp/$(id)"}), "pve-mgmt", "pve.storage.import_dir"),
    ("staging-relative", setter(hv(), "storage", {"staging_dir": "var/tmp"}), "pve-mgmt", "pve.storage.staging_dir"),
    ("node-injection", setter(hv(), "node", "pve-mgmt/../x"), "pve-mgmt", "pve.node"),
    ("node-markup", setter(hv(), "node", "[/x]"), "pve-mgmt", "pve.node"),
    ("nameserver-not-ip", setter(vm("jump01"), "cloudinit.nameserver", "ns1.example;reboot"), "jump01",
     "vm.cloudinit.nameserver"),
    ("nameserver-injection", setter(vm("jump01"), "cloudinit.nameserver", "10.0.0.1,searchdomain=evil"), "jump01",
     "vm.cloudinit.nameserver"),
    ("searchdomain-injection", setter(vm("jump01"), "cloudinit.searchdomain", "a.lan,nameserver=1.1.1.1"), "jump01",
     "vm.cloudinit.searchdomain"),
    ("searchdomain-unicode", setter(vm("jump01"), "cloudinit.searchdomain", "dëevnet.lan"), "jump01",
     "vm.cloudinit.searchdomain"),
    ("gw-not-ip", setter(vm("jump01"), "cloudinit.ipconfig", {"ip": "192.168.10.30/24", "gw": "gw;reboot"}),
     "jump01", "vm.cloudinit.ipconfig"),
    ("ip-no-prefix", setter(vm("jump01"), "cloudinit.ipconfig", {"ip": "192.168.10.30"}), "jump01",
     "vm.cloudinit.ipconfig"),
    # cloud-init user and keys
    ("ciuser-shell", setter(vm(), "cloudinit.user", "ansible;rm -rf /"), "metrics01", "vm.cloudinit.user"),
    ("ciuser-empty", setter(vm(), "cloudinit.user", ""), "metrics01", "vm.cloudinit.user"),
    ("ciuser-unicode", setter(vm(), "cloudinit.user", "ånsible"), "metrics01", "vm.cloudinit.user"),
    ("ciuser-too-long", setter(vm(), "cloudinit.user", "a" * 40), "metrics01", "vm.cloudinit.user"),
    ("sshkey-smuggled-second", setter(vm(), "cloudinit.ssh_keys", [KEY + "\nssh-ed25519 AAAAC3Nza evil"]),
     "metrics01", "vm.cloudinit.ssh_keys"),
    ("sshkey-cr", setter(vm(), "cloudinit.ssh_keys", [KEY + "\rx"]), "metrics01", "vm.cloudinit.ssh_keys"),
    ("sshkey-bad-base64", setter(vm(), "cloudinit.ssh_keys", ["ssh-ed25519 AAAAnotakey"]), "metrics01",
     "vm.cloudinit.ssh_keys"),
    ("sshkey-private", setter(vm(), "cloudinit.ssh_keys", ["-----BEGIN OPENSSH PRIVATE KEY-----"]), "metrics01",
     "vm.cloudinit.ssh_keys"),
    ("sshkey-wrong-type", setter(vm(), "cloudinit.ssh_keys", ["ssh-dss AAAAB3NzaC1kc3MAAACBAP"]), "metrics01",
     "vm.cloudinit.ssh_keys"),
    ("sshkey-control-char", setter(vm(), "cloudinit.ssh_keys", [KEY + "\x1b[2J"]), "metrics01",
     "vm.cloudinit.ssh_keys"),
    # bounds
    ("memory-huge", setter(vm(), "memory", 10**12), "metrics01", "vm.memory"),
    ("memory-small", setter(vm(), "memory", 16), "metrics01", "vm.memory"),
    ("memory-negative", setter(vm(), "memory", -1), "metrics01", "vm.memory"),
    ("memory-string", setter(vm(), "memory", "4G"), "metrics01", "vm.memory"),
    ("cores-zero", setter(vm(), "cores", 0), "metrics01", "vm.cores"),
    ("cores-huge", setter(vm(), "cores", 100000), "metrics01", "vm.cores"),
    ("disk-huge", setter(vm(), "disk_gb", 10**9), "metrics01", "vm.disk_gb"),
    ("disk-zero", setter(vm(), "disk_gb", 0), "metrics01", "vm.disk_gb"),
    ("vmid-low", setter(vm(), "vmid", 99), "metrics01", "vm.vmid"),
    ("vlan-out-of-range", setter(vm("jump01"), "nics.1.vlan", 4095), "jump01", "vm.nics.1.vlan"),
    ("too-many-nics", setter(vm(), "nics", [{"mac": f"02:de:10:01:01:{i:02x}"} for i in range(9)]), "metrics01",
     "vm.nics"),
    # names, tags, markers
    # Ansible reads "[...]" in a host name as a host range (web[01:09]) and refuses these itself, at parsing
    ("vm-name-markup", rename_host("mgmt", "metrics01", "[/x]"), "host range must be", ""),
    ("vm-name-traversal", rename_host("mgmt", "metrics01", "../../etc"), "../../etc", "name"),
    ("vm-name-unicode", rename_host("mgmt", "metrics01", "métrics01"), "métrics01", "name"),
    ("vm-name-shell", rename_host("mgmt", "metrics01", "m;reboot"), "m;reboot", "name"),
    ("hypervisor-name-markup", rename_host("hypervisors", "pve-tenant", "[bold]x[/x]"), "host range must be", ""),
    ("hypervisor-name-space", rename_host("hypervisors", "pve-tenant", "pve tenant"), "pve tenant", "name"),
    ("image-traversal", setter(vm(), "image", "../../etc/passwd"), "metrics01", "vm.image"),
    ("image-markup", setter(vm(), "image", "[/x]"), "metrics01", "vm.image"),
    ("role-reserved", setter(vm(), "role", "factory-state"), "metrics01", "vm.role"),
    ("tag-reserved", setter(vm(), "tags", ["factory-incomplete"]), "metrics01", "vm.tags"),
    ("tag-injection", setter(vm(), "tags", ["a;b"]), "metrics01", "vm.tags"),
    ("tag-markup", setter(vm(), "tags", ["[/x]"]), "metrics01", "vm.tags"),
    ("description-marker", setter(vm(), "description", "notes\nfactory-state: incomplete"), "metrics01",
     "vm.description"),
    ("description-managed-by", setter(vm(), "description", "managed-by: deevnet-image-factory"), "metrics01",
     "vm.description"),
    ("description-control", setter(vm(), "description", "ok\x00not"), "metrics01", "vm.description"),
    ("description-huge", setter(vm(), "description", "x" * 5000), "metrics01", "vm.description"),
    # SSH endpoint and API
    ("ssh-host-shell", setter(hv(), "ssh", {"host": "h;reboot", "host_key": KEY}), "pve-mgmt", "pve.ssh.host"),
    ("ssh-user-shell", setter(hv(), "ssh", {"host": "h.lan", "user": "root;id", "host_key": KEY}), "pve-mgmt",
     "pve.ssh.user"),
    ("ssh-port", setter(hv(), "ssh", {"host": "h.lan", "port": 70000, "host_key": KEY}), "pve-mgmt", "pve.ssh.port"),
    ("api-http", setter(hv(), "api_url", "http://pve-mgmt:8006"), "pve-mgmt", "pve.api_url"),
    ("api-path", setter(hv(), "api_url", "https://pve-mgmt:8006/api2/json"), "pve-mgmt", "pve.api_url"),
    ("token-id", setter(hv(), "token_id", "root@pam"), "pve-mgmt", "pve.token_id"),
    ("api-urls-http", setter(hv(), "api_urls", ["http://pve-mgmt2:8006"]), "pve-mgmt", "pve.api_urls"),
    ("api-urls-not-a-list", setter(hv(), "api_urls", "https://pve-mgmt2:8006"), "pve-mgmt", "pve.api_urls"),
    ("unknown-key", setter(vm(), "memroy", 4096), "metrics01", "vm.memroy"),
    ("mac-multicast", setter(vm(), "nics.0.mac", "03:de:10:01:01:00"), "metrics01", "vm.nics.0.mac"),
    ("mac-injection", setter(vm(), "nics.0.mac", "02:de:10:01:01:00,bridge=x"), "metrics01", "vm.nics.0.mac"),
    # placement over several hypervisors of a plane
    ("placement-unknown", setter(lambda d: d["all"]["children"]["tenant"]["vars"], "placement", "roundrobin"),
     "group tenant", "vars.placement"),
    ("placement-markup", setter(lambda d: d["all"]["children"]["tenant"]["vars"], "placement", "[/x]"),
     "group tenant", "vars.placement"),
    ("vmid-outside-every-host", setter(vm("sandbox01", "tenant"), "vmid", 5000), "sandbox01", "vm.vmid"),
    # per-VM options (docs/inventory.md)
    ("cpu-injection", setter(vm(), "cpu", "host,flags=+aes"), "metrics01", "vm.cpu"),
    ("disk-slot-injection", setter(vm(), "disks", [{"slot": "scsi1,media=cdrom", "size_gb": 1}]), "metrics01",
     "vm.disks.0.slot"),
    ("disk-storage-injection", setter(vm(), "disks", [{"slot": "scsi1", "size_gb": 1, "storage": "local,x=1"}]),
     "metrics01", "vm.disks.0.storage"),
    ("ip6-injection", setter(vm("jump01"), "cloudinit.ip6", {"ip": "2001:db8::5/64,gw=1.1.1.1"}), "jump01",
     "vm.cloudinit.ip6"),
    ("vendor-data-traversal", setter(vm(), "cloudinit.vendor_data", "../../etc/shadow"), "metrics01",
     "vm.cloudinit.vendor_data"),
    ("snippets-dir-shell", setter(hv(), "storage", {"snippets_dir": "/var/lib/vz/snippets;reboot"}), "pve-mgmt",
     "pve.storage.snippets_dir"),
]


@pytest.fixture(scope="module")
def fsite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeSite]:
    mp = pytest.MonkeyPatch()
    try:
        yield from fake_site(tmp_path_factory.mktemp("bad-input"), mp)
    finally:
        mp.undo()


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        program().run(["invoke", *argv])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


def assert_clear_refusal(code: int, text: str, files: list[str], entry: str, key: str, fs: FakeSite) -> None:
    assert code == 2, text
    assert "Traceback" not in text and "Error:" not in text.replace("error:", ""), text
    assert "error:" in text and any(f in text for f in files), text
    assert entry in text and key in text, text
    assert all(pve.requests == [] for pve in fs.pves.values()), "a hypervisor was contacted"


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_bad_inventory_is_refused_before_any_request(case: str, fsite: FakeSite, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _, mutate, entry, key = next(c for c in CASES if c[0] == case)
    data = yaml.safe_load((fsite.inventory / "hosts.yml").read_text())
    mutate(data)
    bad = tmp_path / "hosts.yml"
    bad.write_text(yaml.safe_dump(copy.deepcopy(data), sort_keys=False, allow_unicode=True))
    for pve in fsite.pves.values():
        pve.requests.clear()
    code, text = run_cli(["deploy.vm", "--all", "--no-wait", "--skip-preflight", "-i", str(bad)], capsys)
    assert_clear_refusal(code, text, [str(bad)], entry, key, fsite)


CATALOGUE_CASES = [
    ("checksum-none-remote", {"url": "https://example.org/x.qcow2", "checksum": "none"}, "source"),
    ("checksum-short", {"url": "https://example.org/x.qcow2", "checksum": "sha256:abc"}, "source.checksum"),
    ("url-ftp", {"url": "ftp://example.org/x.qcow2", "checksum": "sha256:" + "a" * 64}, "source.url"),
    ("url-space", {"url": "https://example.org/x y.qcow2", "checksum": "sha256:" + "a" * 64}, "source.url"),
]


@pytest.mark.parametrize("case", [c[0] for c in CATALOGUE_CASES])
def test_bad_catalogue_is_refused(case: str, fsite: FakeSite, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    _, source, key = next(c for c in CATALOGUE_CASES if c[0] == case)
    _deploy_with_fedora_44(fsite, tmp_path, capsys, "source", source, key)


def _deploy_with_fedora_44(fsite: FakeSite, tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str,
                           value: Any, key: str) -> str:
    """deploy.vm --all with one field of the catalogue's fedora-44 replaced: refused clearly, no request sent."""
    from image_factory.settings import REPO_ROOT

    data = yaml.safe_load((REPO_ROOT / "packer/images.yml").read_text())
    data["images"]["fedora-44"][field] = value
    bad = tmp_path / "images.yml"
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    for pve in fsite.pves.values():
        pve.requests.clear()
    code, text = run_cli(["deploy.vm", "--all", "--skip-preflight", "-i", str(fsite.inventory), "--catalogue",
                          str(bad)], capsys)
    assert_clear_refusal(code, text, [str(bad)], "fedora-44", key, fsite)
    return text


# (case id, catalogue field of fedora-44, hostile value, key named in the error)
IMAGE_CASES: list[tuple[str, str, Any, str]] = [
    ("template-name-attribute", "template_name", "{image.__class__.__mro__}", "template_name"),
    ("template-name-index", "template_name", "tpl-{image[0]}", "template_name"),
    ("template-name-padding", "template_name", "{image:>300000000}", "template_name"),
    ("template-name-conversion", "template_name", "tpl-{image!r}", "template_name"),
    ("template-name-positional", "template_name", "tpl-{}", "template_name"),
    ("template-name-huge", "template_name", "tpl-{image}" + "x" * 1000, "template_name"),
    ("playbook-absolute", "playbook", "/etc/passwd", "playbook"),
    ("playbook-traversal", "playbook", "ansible/../../../etc/shadow.yml", "playbook"),
    ("playbook-home", "playbook", "~/evil.yml", "playbook"),
    ("disk-size-huge", "disk_size", "99999999999G", "disk_size"),
    ("build-memory-huge", "memory", 10**9, "memory"),
    ("build-cpus-huge", "cpus", 100000, "cpus"),
    ("secure-boot-on-bios", "firmware", "bios", "firmware"),  # fedora-44 is UEFI + Secure Boot
    ("uefi-on-pc", "machine", "pc", "machine"),
    ("keys-unknown", "keys", "microsoft-2026", "keys"),
    ("machine-unknown", "machine", "q36", "machine"),
    ("factory-not-a-boolean", "factory", "yes please", "factory"),
    ("builder-suite-without-factory", "test_suites", ["common", "builder"], "test_suites"),
]


@pytest.mark.parametrize("case", [c[0] for c in IMAGE_CASES])
def test_hostile_catalogue_value_is_refused(case: str, fsite: FakeSite, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _, field, value, key = next(c for c in IMAGE_CASES if c[0] == case)
    text = _deploy_with_fedora_44(fsite, tmp_path, capsys, field, value, key)
    assert len(text) < 2000, "the refusal quotes the value at length"


# (case id, command line, what names the flag in the error, exit code): each refused before any host is contacted
# or anything is built, on a run that would have nothing to do all the same. A dry run is a plan: bad input is 1
# there (Terraform's detailed exit codes, docs/cli.md), 2 elsewhere.
FLAG_CASES: list[tuple[str, list[str], str, int]] = [
    ("accelerator-unknown", ["build.image", "debian-lab", "--dry-run", "--accelerator", "rsync;touch /tmp/x"],
     "--accelerator", 1),
    ("ansible-strategy-unknown", ["build.image", "debian-lab", "--dry-run", "--ansible-strategy", "free"],
     "--ansible-strategy", 1),
    ("engine-unknown", ["publish.template", "debian-lab", "--dry-run", "--engine", "rsync;touch /tmp/x", "-i", "INV"],
     "SSH engine", 1),
    ("transport-unknown", ["publish.template", "debian-lab", "--dry-run", "--transport", "ftp", "-i", "INV"],
     "transport", 1),
    ("deploy-timeout-negative", ["deploy.vm", "--all", "--timeout", "-5", "-i", "INV"], "--timeout", 2),
    ("deploy-timeout-zero", ["deploy.vm", "--all", "--dry-run", "--timeout", "0", "-i", "INV"], "--timeout", 1),
    ("deploy-timeout-huge", ["deploy.vm", "--all", "--timeout", str(10**12), "-i", "INV"], "--timeout", 2),
    ("destroy-timeout-negative", ["deploy.destroy", "sandbox01", "--timeout", "-1", "-i", "INV"], "--timeout", 2),
    ("image-test-timeout-negative", ["image.test", "debian-lab", "--timeout", "-1"], "--timeout", 2),
    # not a number at all: invoke's parse error, as an unknown flag is (1, also for a plan)
    ("deploy-timeout-nan", ["deploy.vm", "--all", "--timeout", "nan", "-i", "INV"], "--timeout", 1),
    ("plan-timeout-word", ["deploy.vm", "--all", "--dry-run", "--timeout", "soon", "-i", "INV"], "--timeout", 1),
    ("publish-keep-word", ["publish.template", "debian-lab", "--keep", "three", "-i", "INV"], "--keep", 2),
    ("publish-keep-zero", ["publish.template", "debian-lab", "--keep", "0", "-i", "INV"], "--keep", 2),
    ("pipeline-keep-word", ["pipeline", "--keep", "x", "-i", "INV"], "--keep", 1),
    ("preflight-check-unknown", ["inventory.preflight", "--checks", "bogus", "-i", "INV"], "--checks", 2),
]


@pytest.mark.parametrize("case", [c[0] for c in FLAG_CASES])
def test_bad_flag_is_refused_before_any_work(case: str, fsite: FakeSite, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _, argv, named, exit_code = next(c for c in FLAG_CASES if c[0] == case)
    monkeypatch.setenv("INVOKE_FACTORY_BUILDS_DIR", str(tmp_path / "builds"))
    for pve in fsite.pves.values():
        pve.requests.clear()
    flag = next(a for a in argv if a.startswith("--") and a not in ("--dry-run", "--all"))
    value = argv[argv.index(flag) + 1]
    code, text = run_cli([str(fsite.inventory) if a == "INV" else a for a in argv], capsys)
    assert code == exit_code, text
    assert_clear_refusal(2, text, [named], value, named, fsite)
    assert not (tmp_path / "builds").exists() and not Path("/tmp/x").exists()


@pytest.mark.parametrize("body", ["", "all:\n", "all:\n  children:\n    mgmt:\n      hosts: {}\n"])
def test_empty_inventory_is_an_error(body: str, fsite: FakeSite, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "hosts.yml"
    bad.write_text(body)
    code, text = run_cli(["inventory.check", "-i", str(bad)], capsys)
    assert code == 2 and "Traceback" not in text and str(bad) in text, text
    assert re.search(r"no hypervisor|starts with 'all:'", text), text


def test_markup_in_a_name_given_on_the_command_line_is_printed_not_parsed(
    fsite: FakeSite, capsys: pytest.CaptureFixture[str]
) -> None:
    code, text = run_cli(["deploy.vm", "-n", "[/x]", "--skip-preflight", "-i", str(fsite.inventory)], capsys)
    assert code == 2 and "[/x]" in text and "Traceback" not in text and "MarkupError" not in text, text


def test_corpus_is_large_enough() -> None:
    assert len(CASES) + len(CATALOGUE_CASES) + len(IMAGE_CASES) + len(FLAG_CASES) + 3 >= 80


# ------------------------------------------------------------------ secrets never reach any output


def test_a_secret_with_a_line_break_appears_in_no_output(fsite: FakeSite, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = "0b5e7c1a-first-half-of-secret", "second-half-9f3d2e"
    env = fsite.site.hypervisors["pve-mgmt"].token_secret_env
    assert env
    monkeypatch.setenv(env, f"{first}\n{second}")
    report = tmp_path / "report.json"
    texts = []
    for argv in (["inventory.preflight", "-i", str(fsite.inventory), "--json"],
                 ["deploy.vm", "--all", "--no-wait", "--skip-preflight", "-i", str(fsite.inventory), "--json"],
                 ["deploy.plan", "--all", "-i", str(fsite.inventory), "--json"],
                 ["publish.template", "debian-lab", "-i", str(fsite.inventory), "--json"],
                 ["pipeline", "--images", "debian-lab", "-i", str(fsite.inventory), "--json-file", str(report)]):
        code, text = run_cli(argv, capsys)
        assert "Traceback" not in text, text
        texts.append(text)
    written = [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()]
    for blob in texts + written:
        assert first not in blob and second not in blob, blob
    assert any("holds whitespace, a line break" in t and env in t for t in texts), texts


def test_reports_are_0600_and_masked(tmp_path: Path) -> None:
    from image_factory.console import register_secret, write_report

    register_secret("s3cr3t-value-for-report")
    path = write_report(tmp_path / "r" / "report.json", {"error": "token s3cr3t-value-for-report refused"})
    assert path.stat().st_mode & 0o777 == 0o600
    assert "s3cr3t" not in path.read_text() and "********" in path.read_text()


# ------------------------------------------------------------------ live MAC uniqueness


def test_mac_check_live_names_host_vmid_and_nic(fsite: FakeSite, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = run_cli(["mac.check", "--live", "-i", str(fsite.inventory)], capsys)
    assert code == 0 and "no inventory MAC is on another VM" in text, text
    mac = fsite.site.vms["jump01"].macs[1]
    fsite.pves["pve-tenant"].add_vm(2998, "copied-nic", node="pve-tenant",
                                    config={"net3": f"virtio={mac.upper()},bridge=vmbr1"})
    try:
        code, text = run_cli(["mac.check", "--live", "-i", str(fsite.inventory)], capsys)
    finally:
        fsite.pves["pve-tenant"].vms = [v for v in fsite.pves["pve-tenant"].vms if v.vmid != 2998]
    assert code == 1, text
    assert f"jump01 nics[1] {mac} is already used by pve-tenant VMID 2998 (copied-nic) net3" in text, text
    assert all(m == "GET" for pve in fsite.pves.values() for m, _, _ in pve.requests), "--live only reads"


# ------------------------------------------------------------------ flags mean the same everywhere


def _task_arguments() -> list[tuple[str, Any]]:
    out = []
    ns = program().namespace
    assert ns is not None
    for name in ns.task_names:
        task = ns[name]
        out.extend((name, arg) for arg in task.get_arguments())
    return out


def test_short_i_is_inventory_in_every_task_and_the_mgmt_flag_has_no_short_form() -> None:
    args = _task_arguments()
    assert any(a.attr_name == "i_know_this_is_mgmt" for _, a in args)
    for task_name, arg in args:
        key = arg.attr_name or arg.name
        if "i" in arg.names:
            assert key == "inventory", f"{task_name}: -i means --{arg.name}"
        if key == "inventory":
            assert "i" in arg.names, f"{task_name}: --inventory has no -i"
        if key in ("i_know_this_is_mgmt", "recreate", "force_untested"):
            assert all(len(n) > 1 for n in arg.names), f"{task_name}: {key} has a short form {arg.names}"


def test_pipeline_list_images_prints_the_matrix_and_refuses_unknown_names(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, text = run_cli(["pipeline", "--list-images"], capsys)
    listed = json.loads(text)
    assert code == 0 and listed and set(listed) <= {"fedora-44", "fedora-45"}  # what the example's VMs use
    code, text = run_cli(["pipeline", "--list-images", "--images", "fedora-45,fedora-44-iso"], capsys)
    assert code == 0 and json.loads(text) == ["fedora-45", "fedora-44-iso"]
    code, text = run_cli(["pipeline", "--list-images", "--images", "fedora-45,nope"], capsys)
    assert code != 0 and "unknown image(s) nope (catalogue: " in text and "Traceback" not in text
