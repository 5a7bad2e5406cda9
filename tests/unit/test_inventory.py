"""The site model: the example site validates; each kind of mistake fails naming file, entry and key."""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from image_factory.errors import ValidationFailed
from image_factory.settings import REPO_ROOT
from image_factory.site.inventory import Repository, load_site

from .example_site import flat_example

pytestmark = pytest.mark.unit

CATALOGUE = REPO_ROOT / "packer/images.yml"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation must never open a connection: any attempt fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network connection attempted during validation: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def site_files(
    tmp_path: Path, inv: dict[str, Any] | None = None, cat: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    inv_dir = tmp_path / "inventory"
    inv_dir.mkdir(exist_ok=True)
    inv_file = inv_dir / "hosts.yml"
    inv_file.write_text(yaml.safe_dump(inv if inv is not None else example_inventory(), sort_keys=False))
    cat_file = tmp_path / "images.yml"
    cat_file.write_text(yaml.safe_dump(cat if cat is not None else example_catalogue(), sort_keys=False))
    return inv_dir, cat_file


def example_inventory() -> dict[str, Any]:
    return flat_example()


def example_catalogue() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(CATALOGUE.read_text()))


def group(inv: dict[str, Any], name: str) -> dict[str, Any]:
    return inv["all"]["children"][name]["hosts"]


def problems_of(tmp_path: Path, inv: dict[str, Any] | None = None, cat: dict[str, Any] | None = None) -> list[Any]:
    inv_dir, cat_file = site_files(tmp_path, inv, cat)
    with pytest.raises(ValidationFailed) as err:
        load_site(inv_dir, cat_file)
    return err.value.problems


def only(problems: list[Any], entry: str, key: str) -> Any:
    hits = [p for p in problems if entry in p.entry and p.key == key]
    assert hits, f"no problem for {entry}/{key} in {[str(p) for p in problems]}"
    return hits[0]


# ------------------------------------------------------------------------------------------ valid


def test_example_site_loads_with_both_planes(no_network: None) -> None:
    site = load_site(REPO_ROOT / "ansible/inventory", CATALOGUE)
    assert set(site.hypervisors) == {"pve-mgmt", "pve-tenant"}
    assert {vm.plane for vm in site.vms.values()} == {"mgmt", "tenant"}
    assert len([v for v in site.vms.values() if v.plane == "mgmt"]) >= 3
    for vm in site.vms.values():
        assert site.hypervisor_for(vm).role == vm.plane
    assert {"fedora-44-iso", "fedora-44", "fedora-45", "debian-lab"} <= set(site.images)


def test_mgmt_vms_are_full_clones_and_tenant_default_linked() -> None:
    site = load_site(REPO_ROOT / "ansible/inventory", CATALOGUE)
    assert site.vms["metrics01"].clone_mode == "full"
    assert site.vms["sandbox01"].clone_mode == "linked"


def test_macs_are_canonical_lowercase(tmp_path: Path) -> None:
    inv = example_inventory()
    group(inv, "mgmt")["metrics01"]["vm"]["nics"][0]["mac"] = "02:DE:10:01:01:00"
    inv_dir, cat_file = site_files(tmp_path, inv)
    assert load_site(inv_dir, cat_file).vms["metrics01"].macs == ["02:de:10:01:01:00"]


def test_host_vars_replace_group_vars_like_ansible(tmp_path: Path) -> None:
    inv = example_inventory()
    inv["all"]["children"]["mgmt"]["vars"]["vm"] = {"bogus": "replaced by each host's own vm mapping"}
    inv_dir, cat_file = site_files(tmp_path, inv)
    assert "metrics01" in load_site(inv_dir, cat_file).vms


def test_ansible_inventory_reads_the_example_site() -> None:
    tool = Path(sys.executable).parent / "ansible-inventory"
    if not tool.exists():
        pytest.skip("ansible-core is not installed in this environment")
    out = subprocess.run(
        [str(tool), "-i", str(REPO_ROOT / "ansible/inventory"), "--list"],
        capture_output=True, text=True, check=True,
        env={"PATH": f"{tool.parent}:/usr/bin:/bin", "ANSIBLE_NOCOLOR": "1", "HOME": str(REPO_ROOT)},
    ).stdout
    data = json.loads(out)
    assert set(data["hypervisors"]["hosts"]) == {"pve-mgmt", "pve-tenant"}
    assert "metrics01" in data["mgmt"]["hosts"]
    assert data["_meta"]["hostvars"]["metrics01"]["vm"]["vmid"] == 1101


# ------------------------------------------------------------------------------------------ broken


def test_unknown_key_is_named(tmp_path: Path, no_network: None) -> None:
    inv = example_inventory()
    group(inv, "mgmt")["metrics01"]["vm"]["coress"] = 4
    p = only(problems_of(tmp_path, inv), "metrics01", "vm.coress")
    assert "unknown key" in p.message
    assert p.file.endswith("hosts.yml")


def test_wrong_type_is_named(tmp_path: Path, no_network: None) -> None:
    inv = example_inventory()
    group(inv, "mgmt")["logs01"]["vm"]["memory"] = "lots"
    p = only(problems_of(tmp_path, inv), "logs01", "vm.memory")
    assert "integer" in p.message


def test_missing_field_is_named(tmp_path: Path, no_network: None) -> None:
    inv = example_inventory()
    del group(inv, "hypervisors")["pve-tenant"]["pve"]["node"]
    p = only(problems_of(tmp_path, inv), "pve-tenant", "pve.node")
    assert "missing" in p.message


def test_duplicate_vmid(tmp_path: Path, no_network: None) -> None:
    inv = example_inventory()
    group(inv, "mgmt")["logs01"]["vm"]["vmid"] = 1101
    p = only(problems_of(tmp_path, inv), "logs01", "vm.vmid")
    assert "metrics01" in p.entry and "1101" in p.message


def test_duplicate_name_in_both_planes(tmp_path: Path, no_network: None) -> None:
    inv = example_inventory()
    group(inv, "tenant")["metrics01"] = copy.deepcopy(group(inv, "mgmt")["metrics01"])
    p = only(problems_of(tmp_path, inv), "metrics01", "")
    assert "one plane" in p.message


def test_duplicate_yaml_key_is_refused(tmp_path: Path, no_network: None) -> None:
    inv_dir, cat_file = site_files(tmp_path)
    text = (inv_dir / "hosts.yml").read_text()
    assert "    logs01:\n" in text
    (inv_dir / "hosts.yml").write_text(text.replace("    logs01:\n", "    metrics01:\n", 1))
    with pytest.raises(ValidationFailed) as err:
        load_site(inv_dir, cat_file)
    assert any("duplicate key 'metrics01'" in p.message for p in err.value.problems)


def test_mgmt_vm_on_tenant_hypervisor_is_refused(tmp_path: Path, no_network: None) -> None:
    inv = example_inventory()
    group(inv, "mgmt")["metrics01"]["vm"]["hypervisor"] = "pve-tenant"
    p = only(problems_of(tmp_path, inv), "metrics01", "vm.hypervisor")
    assert "mgmt VMs may only run on the mgmt hypervisor" in p.message


def test_tenant_vm_on_mgmt_hypervisor_is_refused(tmp_path: Path, no_network: None) -> None:
    inv = example_inventory()
    group(inv, "tenant")["sandbox01"]["vm"]["hypervisor"] = "pve-mgmt"
    p = only(problems_of(tmp_path, inv), "sandbox01", "vm.hypervisor")
    assert "tenant VMs may only run on the tenant hypervisor" in p.message


def test_undefined_image(tmp_path: Path, no_network: None) -> None:
    inv = example_inventory()
    group(inv, "tenant")["iot-api01"]["vm"]["image"] = "fedora-99"
    p = only(problems_of(tmp_path, inv), "iot-api01", "vm.image")
    assert "fedora-99" in p.message


def test_undefined_hypervisor(tmp_path: Path, no_network: None) -> None:
    inv = example_inventory()
    group(inv, "mgmt")["jump01"]["vm"]["hypervisor"] = "pve-3"
    p = only(problems_of(tmp_path, inv), "jump01", "vm.hypervisor")
    assert "pve-3" in p.message


def test_bad_catalogue_value_names_image_and_key(tmp_path: Path, no_network: None) -> None:
    cat = example_catalogue()
    cat["images"]["fedora-45"]["mode"] = "netboot"
    cat["images"]["fedora-44-iso"]["source"]["checksum"] = "md5:abc"
    problems = problems_of(tmp_path, cat=cat)
    assert only(problems, "fedora-45", "mode").file.endswith("images.yml")
    only(problems, "fedora-44-iso", "source.checksum")


def test_all_problems_are_reported_together(tmp_path: Path, no_network: None) -> None:
    inv = example_inventory()
    group(inv, "mgmt")["metrics01"]["vm"]["coress"] = 4
    group(inv, "mgmt")["logs01"]["vm"]["vmid"] = 1201
    group(inv, "tenant")["sandbox01"]["vm"]["image"] = "nope"
    problems = problems_of(tmp_path, inv)
    only(problems, "metrics01", "vm.coress")
    only(problems, "logs01", "vm.vmid")
    only(problems, "sandbox01", "vm.image")


def test_plaintext_token_secret_key_is_refused(tmp_path: Path, no_network: None) -> None:
    inv = example_inventory()
    group(inv, "hypervisors")["pve-mgmt"]["pve"]["token_secret"] = "0000-1111"  # noqa: S105 - the point: a plaintext secret is refused
    p = only(problems_of(tmp_path, inv), "pve-mgmt", "pve.token_secret")
    assert p.message.startswith("is plaintext") and "vault-encrypted" in p.message and "0000-1111" not in p.message


def test_tls_cannot_be_left_unverified(tmp_path: Path, no_network: None) -> None:
    inv = example_inventory()
    del group(inv, "hypervisors")["pve-mgmt"]["pve"]["tls_ca_file"]
    p = only(problems_of(tmp_path, inv), "pve-mgmt", "pve")
    assert "TLS is always verified" in p.message


def test_http_api_url_is_refused(tmp_path: Path, no_network: None) -> None:
    inv = example_inventory()
    group(inv, "hypervisors")["pve-mgmt"]["pve"]["api_url"] = "http://pve-mgmt:8006"
    only(problems_of(tmp_path, inv), "pve-mgmt", "pve.api_url")


def test_invalid_yaml_names_the_line(tmp_path: Path, no_network: None) -> None:
    inv_dir, cat_file = site_files(tmp_path)
    (inv_dir / "hosts.yml").write_text("all:\n  children: [unclosed\n")
    with pytest.raises(ValidationFailed) as err:
        load_site(inv_dir, cat_file)
    assert err.value.problems[0].key.startswith("line ")


def test_inventory_check_task_exits_non_zero_with_file_entry_key(tmp_path: Path) -> None:
    inv = example_inventory()
    group(inv, "mgmt")["metrics01"]["vm"]["hypervisor"] = "pve-tenant"
    inv_dir, cat_file = site_files(tmp_path, inv)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "invoke"), "inventory.check", "--inventory", str(inv_dir),
         "--catalogue", str(cat_file)],
        cwd=REPO_ROOT, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "COLUMNS": "400"},
    )
    assert proc.returncode == 2
    assert "hosts.yml: metrics01: vm.hypervisor" in proc.stderr


def test_inventory_check_json_summary(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "invoke"), "inventory.check", "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )
    summary = json.loads(proc.stdout)
    assert summary["hypervisors"]["pve-mgmt"]["vms"]["tenant"] == []
    assert "metrics01" in summary["hypervisors"]["pve-mgmt"]["vms"]["mgmt"]


def test_eol_gate_warns_within_30_days_and_refuses_after() -> None:
    from image_factory.site.inventory import eol_gate

    site = load_site(REPO_ROOT / "ansible/inventory", REPO_ROOT / "packer/images.yml")
    f43 = site.images["fedora-44"].model_copy(update={"name": "fedora-43", "release": 43, "eol": date(2026, 12, 2)})
    assert f43.eol is not None
    assert eol_gate([f43], "images.yml", today=date(2026, 10, 1)) == []
    [warning] = eol_gate([f43], "images.yml", today=f43.eol)
    assert "reaches its end of life" in warning and "in 0 days" in warning
    later = date.fromordinal(f43.eol.toordinal() + 1)
    with pytest.raises(ValidationFailed) as err:
        eol_gate([f43], "images.yml", today=later)
    [problem] = err.value.problems
    assert (problem.file, problem.entry, problem.key) == ("images.yml", "fedora-43", "eol")
    assert "--allow-eol" in problem.message
    [allowed] = eol_gate([f43], "images.yml", today=later, allow_eol=True)
    assert "--allow-eol given" in allowed


def test_every_downloaded_image_has_an_eol_date() -> None:
    site = load_site(REPO_ROOT / "ansible/inventory", REPO_ROOT / "packer/images.yml")
    assert all(img.eol is not None for img in site.images.values())
    assert {"fedora-44", "fedora-44-iso", "fedora-45", "fedora-45-iso"} <= set(site.images)
    assert not {"fedora-41", "fedora-42"} & set(site.images)


@pytest.mark.parametrize(("fields", "message"), [
    ({"key": "team.asc"}, "key and fingerprint go together"),
    ({"packages": ["team-agent"]}, "need the repository's own key"),
    ({"key": "team.asc", "fingerprint": "ab" * 20, "uri": "http://localhost:8080/team"},
     "loopback is reachable during the build only"),
    ({"key": "team.asc", "fingerprint": "xyz"}, "full fingerprint"),
    ({"uri": "http://deb.example.org/debian stable main"}, "http\\(s\\) URL"),
    ({"suite": "stable;reboot"}, "suite name"),
    ({"key": "team.asc", "fingerprint": "ab" * 20, "packages": ["Bad Name"]}, "String should match pattern"),
])
def test_extra_repository_is_refused_with_the_reason(fields: dict[str, object], message: str) -> None:
    base = {"kind": "debian", "uri": "http://deb.example.org/team", "suite": "stable"}
    with pytest.raises(ValidationError, match=message):
        Repository.model_validate({**base, **fields})


def test_extra_repository_on_loopback_is_build_only_and_named_for_its_host_and_suite() -> None:
    repo = Repository.model_validate({"kind": "debian", "uri": "http://127.0.0.2:8080/team/", "suite": "stable",
                                      "key": "team.asc", "fingerprint": "AB " * 20, "packages": ["team-agent"],
                                      "build_only": True})
    assert repo.on_loopback and repo.is_extra and repo.uri == "http://127.0.0.2:8080/team"
    assert repo.fingerprint == "ab" * 20
    assert repo.slug == "factory-127-0-0-2-8080-stable"
    plain = Repository.model_validate({"kind": "debian", "uri": "http://deb.debian.org/debian", "suite": "trixie"})
    assert not plain.is_extra and not plain.on_loopback and plain.components == ["main"]


@pytest.mark.parametrize(("entry", "change", "message"), [
    ("fedora-44-iso", {"secure_boot": True, "keys": "microsoft-2023"}, "secure_boot, keys need firmware: uefi"),
    ("fedora-44-iso", {"tpm": True}, "tpm needs firmware: uefi"),
    ("debian-lab-uefi", {"keys": None}, "secure_boot: true needs keys:"),
    ("debian-lab-uefi", {"secure_boot": False}, "keys: goes with secure_boot: true"),
    ("debian-lab-uefi", {"keys": "microsoft-2024"}, "microsoft-2011+2023"),
    ("debian-lab-uefi", {"machine": "pc"}, "firmware: uefi boots on machine: q35"),
    ("debian-lab-uefi", {"machine": "pc", "secure_boot": False, "keys": None, "tpm": False}, "drop machine: pc"),
    ("debian-lab-uefi", {"keys": "distribution-only"}, "shim is signed by Microsoft's UEFI CA only"),
])
def test_uefi_options_are_checked_with_entry_and_reason(tmp_path: Path, no_network: None, entry: str,
                                                        change: dict[str, Any], message: str) -> None:
    """Secure Boot, keys and TPM: inconsistent combinations are named with their entry before any build."""
    cat = example_catalogue()
    cat["images"][entry].update(change)
    [problem] = [p for p in problems_of(tmp_path, cat=cat) if entry in p.entry]
    assert problem.file.endswith("images.yml") and message in problem.message, problem


def test_uefi_machine_defaults_to_q35_bios_to_pc(tmp_path: Path, no_network: None) -> None:
    site = load_site(*site_files(tmp_path))
    assert site.images["debian-lab-uefi"].machine_type == "q35" and site.images["debian-lab"].machine_type == "pc"
    fedora = [i for i in site.images.values() if i.family == "fedora" and i.firmware == "uefi"]
    assert fedora and all(i.secure_boot and i.keys == "microsoft-2011+2023" for i in fedora)
