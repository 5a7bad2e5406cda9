"""The OpenTofu hand-off of a tenant (image_factory.tofu): valid for the pinned provider, and the same VMs,
MACs, VLANs and sizes as the deploy plan."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from image_factory import deploy as dep
from image_factory import tofu
from image_factory.errors import ValidationFailed
from image_factory.inventory import Site, load_site
from image_factory.lab import factories
from image_factory.settings import REPO_ROOT

pytestmark = pytest.mark.unit

EXAMPLE = REPO_ROOT / "docs" / "examples" / "two-tenants.yml"
SCHEMA = json.loads((REPO_ROOT / "tests" / "data" / f"bpg-proxmox-{tofu.PROVIDER_VERSION}.schema.json").read_text())


@pytest.fixture(scope="module")
def site() -> Site:
    return load_site(EXAMPLE, REPO_ROOT / "packer" / "images.yml")


def _plan(site: Site, existing: tuple[str, ...] = ()) -> dep.DeployPlan:
    """deploy's own decision for every VM: the newest tested template of its image on its host is 9001; the VMs
    in ``existing`` are there already, made by the factory, as the inventory says (in sync)."""
    plans = []
    for vm in site.vms.values():
        hv = site.hypervisor_for(vm)
        templates = [factories.template(9001, f"tpl-{vm.image}-b2", image=vm.image, build_id="b2"),
                     factories.template(9000, f"tpl-{vm.image}-b1", image=vm.image)]
        observed = {}
        if vm.name in existing:
            config = dict(dep.desired_config(vm, hv, templates[0], "r0"))
            config["scsi0"] = f"local-lvm:vm-{vm.vmid}-disk-0,size={vm.disk_gb}G"
            observed[vm.vmid] = dep.Observed({"vmid": vm.vmid, "status": "running"}, config)
        plans.append(dep.decide(vm, hv, dep.HostState({vm.image: templates}, observed, {}), {}))
    return dep.DeployPlan(plans)


def test_the_export_is_valid_for_the_pinned_provider(site: Site) -> None:
    config = tofu.tenant_config(site, _plan(site, existing=("acme-db01",)), "acme")
    jsonschema.validate(config, SCHEMA)
    assert config["terraform"]["required_providers"]["proxmox"] == {"source": "bpg/proxmox", "version": "0.81.0"}
    assert [p["alias"] for p in config["provider"]["proxmox"]] == ["pve-mgmt", "pve-tenant"]
    assert not any("api_token" in p for p in config["provider"]["proxmox"]), "the token comes from the environment"
    assert all(p["insecure"] is False for p in config["provider"]["proxmox"])


def test_the_schema_is_a_real_check(site: Site) -> None:
    config = tofu.tenant_config(site, _plan(site), "acme")
    for break_it in (lambda c: c["resource"]["proxmox_virtual_environment_vm"]["acme-web01"]["network_device"][0]
                     .update(vlan=110),  # misspelt attribute: the provider calls it vlan_id
                     lambda c: c["resource"]["proxmox_virtual_environment_vm"]["acme-web01"]["clone"].pop("vm_id"),
                     lambda c: c["terraform"]["required_providers"]["proxmox"].update(version="0.80.0")):
        broken: dict[str, Any] = copy.deepcopy(config)
        break_it(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, SCHEMA)


def test_the_export_and_the_deploy_plan_describe_the_same_vms(site: Site) -> None:
    plan = _plan(site, existing=("acme-db01",))
    config = tofu.tenant_config(site, plan, "acme")
    resources = config["resource"]["proxmox_virtual_environment_vm"]
    plans = {p.vm: p for p in plan.vms}
    assert sorted(resources) == sorted(vm.name for vm in site.vms.values() if vm.tenant == "acme")
    for name, resource in resources.items():
        vm, p = site.vms[name], plans[name]
        assert (resource["vm_id"], resource["node_name"]) == (p.vmid, p.node)
        assert [n["mac_address"].lower() for n in resource["network_device"]] == p.macs
        assert [n["vlan_id"] for n in resource["network_device"]] == [110] * len(vm.nics)
        assert (resource["cpu"]["cores"], resource["memory"]["dedicated"], resource["disk"][0]["size"]) == (
            vm.cores, vm.memory, vm.disk_gb)
        assert resource["clone"] == {"vm_id": 9001, "full": vm.clone_mode == "full"} == {
            "vm_id": p.template_vmid, "full": p.clone_mode == "full"}
        assert resource["lifecycle"] == {"ignore_changes": ["clone"]}, "a new template never replaces a running VM"
    # the one the factory already made is imported, so adopting Tofu replaces nothing; the other is created
    assert (plans["acme-db01"].action, plans["acme-web01"].action) == ("in-sync", "create")
    assert config["import"] == [{"to": "proxmox_virtual_environment_vm.acme-db01", "id": "pve-tenant/2102",
                                 "provider": "proxmox.pve-tenant"}]


def test_bad_requests_are_named(site: Site, tmp_path: Path) -> None:
    with pytest.raises(ValidationFailed, match="no such tenant"):
        tofu.tenant_config(site, _plan(site), "initech")
    no_template = dep.DeployPlan([p if p.vm != "globex-web01" else dep.VmPlan(
        p.vm, p.plane, p.host, p.node, p.vmid, "blocked", reason="no tested template of image fedora-45")
        for p in _plan(site).vms])
    with pytest.raises(ValidationFailed, match="no template to clone: no tested template"):
        tofu.write_tenant(site, no_template, "globex", tmp_path)
    assert not (tmp_path / "globex").exists(), "nothing is written for a refused export"
    done = tofu.write_tenant(site, _plan(site), "globex", tmp_path)
    assert done.path == tmp_path / "globex" / "main.tf.json"
    config = json.loads(done.path.read_text())
    jsonschema.validate(config, SCHEMA)
    assert (done.vms, done.imports) == (len(config["resource"][tofu.RESOURCE]), len(config.get("import", [])))
    assert done.vms >= 1
