"""Loading the site (site/load.py, site/crosschecks.py): the example site validates; each kind of mistake fails
naming file, entry and key."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from image_factory.errors import ValidationFailed
from image_factory.settings import REPO_ROOT
from image_factory.site.inventory import load_site

from . import site_cases
from .site_cases import (
    CATALOGUE,
    example_catalogue,
    example_inventory,
    group,
    only,
    problems_of,
    site_files,
)

pytestmark = pytest.mark.unit
no_network = site_cases.no_network  # the fixture, for this module's tests

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


@pytest.mark.parametrize(("drop", "key", "message"), [
    ("hypervisors", "hypervisors", "no hypervisor: the inventory needs hosts in group 'hypervisors'"),
    ("vms", "mgmt/tenant", "no VM: the inventory needs hosts in group 'mgmt' or 'tenant'"),
    ("images", "images", "the catalogue has no image"),
])
def test_a_site_without_hypervisors_vms_or_images_is_refused_naming_what_it_lacks(
        tmp_path: Path, no_network: None, drop: str, key: str, message: str) -> None:
    inv, cat = example_inventory(), example_catalogue()
    if drop == "hypervisors":
        inv["all"]["children"]["hypervisors"]["hosts"] = {}
    elif drop == "vms":
        for plane in ("mgmt", "tenant"):
            inv["all"]["children"][plane]["hosts"] = {}
    else:
        cat["images"] = {}
    problem = problems_of(tmp_path, inv, cat)[0]  # first: the cross-checks then name each VM it leaves unplaceable
    assert (problem.key, problem.file.endswith("images.yml")) == (key, drop == "images")
    assert message in problem.message
