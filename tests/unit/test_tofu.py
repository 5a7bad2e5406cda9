"""The OpenTofu hand-off of a tenant (image_factory.handoffs.tofu): valid for the pinned provider, the same VMs, MACs,
VLANs and sizes as the deploy plan, and the hardware a deploy gives a VM, as the provider reads it back.

No `tofu validate` here: no registry this machine reaches has an OpenTofu (or Terraform) binary (PyPI's `tofu` is
another project, npm's wrappers download from the vendors' sites), and `tofu init` would fetch bpg/proxmox from
registry.opentofu.org. The schema derived from the provider's own source at the pinned tag stands in for it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from image_factory import deploy as dep
from image_factory.errors import ValidationFailed
from image_factory.handoffs import tofu
from image_factory.lab import factories
from image_factory.pve.codec import NetSpec, parse_props
from image_factory.settings import REPO_ROOT
from image_factory.site.inventory import Site, Vm, load_site

pytestmark = pytest.mark.unit

EXAMPLE = REPO_ROOT / "docs" / "examples" / "two-tenants.yml"
SCHEMA = json.loads((REPO_ROOT / "tests" / "data" / f"bpg-proxmox-{tofu.PROVIDER_VERSION}.schema.json").read_text())


@pytest.fixture(scope="module")
def site() -> Site:
    return load_site(EXAMPLE, REPO_ROOT / "packer" / "images.yml")


def _template(vm: Vm) -> Any:
    return factories.template(9001, f"tpl-{vm.image}-b2", image=vm.image, build_id="b2")


def _deployed(site: Site, vm: Vm, firmware: str = "bios") -> dict[str, str]:
    """The config of a VM deploy made: the clone carries the template's config as publish created it, then
    deploy's one config update (desired_config) and its resize."""
    hv = site.hypervisor_for(vm)
    config = factories.template_config(hv, site.image(vm.image), firmware=firmware)
    del config["template"]
    config.update(dep.desired_config(vm, hv, _template(vm), "r0"))
    config["scsi0"] = f"local-lvm:vm-{vm.vmid}-disk-0,size={vm.disk_gb}G"
    return config


def _plan(site: Site, existing: tuple[str, ...] = ()) -> dep.DeployPlan:
    """deploy's own decision for every VM: the newest tested template of its image on its host is 9001; the VMs
    in ``existing`` are there already, made by the factory, as the inventory says (in sync)."""
    plans = []
    for vm in site.vms.values():
        hv = site.hypervisor_for(vm)
        templates = [_template(vm), factories.template(9000, f"tpl-{vm.image}-b1", image=vm.image)]
        observed = {}
        if vm.name in existing:
            observed[vm.vmid] = dep.Observed({"vmid": vm.vmid, "status": "running"}, _deployed(site, vm))
        plans.append(dep.decide(vm, hv, dep.HostState({vm.image: templates}, observed, {}), {}))
    return dep.DeployPlan(plans)


def _bases(site: Site, plan: dep.DeployPlan, firmware: str = "bios") -> dict[str, dict[str, str]]:
    """What read_bases reads: a made VM's own config, else its template's."""
    bases = {}
    for p in plan.vms:
        vm = site.vms[p.vm]
        bases[p.vm] = (_deployed(site, vm, firmware) if p.action in tofu.EXISTING else
                       factories.template_config(site.hypervisor_for(vm), site.image(vm.image), firmware=firmware))
    return bases


def _export(site: Site, tenant: str, existing: tuple[str, ...] = (), firmware: str = "bios") -> dict[str, Any]:
    plan = _plan(site, existing)
    return tofu.tenant_config(site, plan, tenant, _bases(site, plan, firmware))


def _read_back(config: dict[str, str]) -> dict[str, Any]:
    """The attributes bpg/proxmox 0.111.1 reads from a VM's config on import (vmReadCustom and
    vmReadPrimitiveValues in proxmoxtf/resource/vm/vm.go), for the keys deploy's VMs have. Written out here, from
    the provider's source, independently of tofu.HARDWARE."""
    agent = parse_props(config["agent"], "enabled")
    vga = parse_props(config["vga"], "type")
    read: dict[str, Any] = {
        "name": config["name"],
        "keyboard_layout": config.get("keyboard", "en-us"),  # unset reads as the schema default since 0.108.0
        "on_boot": config.get("onboot") == "1",  # d.Set(on_boot, nil): false
        "bios": config.get("bios", "seabios"),
        "machine": config.get("machine", ""),
        "scsi_hardware": config["scsihw"],
        "operating_system": {"type": config["ostype"]},
        "agent": {"enabled": agent["enabled"] == "1", "trim": False, "type": agent.get("type", "virtio")},
        "cpu": {"cores": int(config["cores"]), "sockets": int(config["sockets"]),
                "type": parse_props(config.get("cpu", "qemu64"), "cputype")["cputype"]},
        "memory": {"dedicated": int(config["memory"]), "floating": int(config.get("balloon", "0"))},
        "serial_device": [{"device": config["serial0"]}],
        "vga": {"type": vga["type"], "memory": int(vga.get("memory", "16")), "clipboard": ""},
        "tags": sorted(config["tags"].split(";")),
    }
    if "efidisk0" in config:
        efi = parse_props(config["efidisk0"], "file")
        read["efi_disk"] = {"datastore_id": efi["file"].split(":")[0], "type": efi.get("efitype", "2m"),
                            "pre_enrolled_keys": efi.get("pre-enrolled-keys") == "1"}
    return read


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_the_export_has_the_hardware_deploy_gives_a_vm(site: Site, firmware: str) -> None:
    """Imported (the VM deploy made) or created (a clone of the same template): every attribute the provider
    would otherwise default equals what it reads from deploy's VM, so the plan after import changes no hardware
    and a VM Tofu creates has the template's hardware, not the provider's defaults."""
    for existing in (("acme-db01",), ()):
        config = _export(site, "acme", existing, firmware)
        jsonschema.validate(config, SCHEMA)
        resource = config["resource"][tofu.RESOURCE]["acme-db01"]
        deployed = _deployed(site, site.vms["acme-db01"], firmware)
        want = _read_back(deployed)
        assert {k: resource[k] for k in want if k in resource} == {k: want[k] for k in want if k in resource}
        assert set(want) - {"name", "tags"} <= set(resource), "every attribute the provider reads is written"
        # the facts the values above rest on: what deploy leaves unset, the provider reads as its own default
        assert not {"keyboard", "onboot", "cpu", "balloon"} & set(deployed)
        assert (resource["bios"], resource["machine"]) == (("ovmf", "q35") if firmware == "uefi" else ("seabios", ""))
        if firmware == "uefi":
            # same type as the VM's EFI disk: the provider forces a replacement only when the type changes
            assert resource["efi_disk"] == {"datastore_id": "local-lvm", "type": "4m", "pre_enrolled_keys": False}
        else:
            assert "efi_disk" not in resource and "tpm_state" not in resource
        assert resource["operating_system"] == {"type": "l26"} and resource["agent"]["type"] == "virtio"
        assert resource["reboot_after_update"] is False, "a change needing a restart fails instead of restarting"
        nets = [NetSpec.parse(deployed[f"net{i}"]) for i in range(len(resource["network_device"]))]
        assert [(n["mac_address"], n["model"], n["bridge"], str(n["vlan_id"]), n["firewall"])
                for n in resource["network_device"]] == [
            (parse_props(deployed[f"net{i}"])[s.model], s.model, s.opts["bridge"], s.opts["tag"],
             s.opts["firewall"] == "1") for i, s in enumerate(nets)]
        init = resource["initialization"]
        assert (init["upgrade"], init["user_account"]["username"], init["ip_config"][0]["ipv4"]["address"]) == (
            deployed["ciupgrade"] == "1", deployed["ciuser"], parse_props(deployed["ipconfig0"])["ip"])
        # a q35 template's cloud-init drive is on SCSI: the provider is told, or it would make one on ide2
        drive = "scsi30" if firmware == "uefi" else "ide2"
        assert init["datastore_id"] == deployed[drive].split(":")[0] and "ide2" not in set(deployed) - {drive}
        assert init.get("interface") == (drive if firmware == "uefi" else None)


def test_attributes_at_the_providers_defaults_stay_out(site: Site) -> None:
    """A block whose every value the provider reads as its default is not in an imported VM's state: writing
    it would plan an update (and a restart for cpu)."""
    vm = site.vms["acme-db01"].model_copy(update={"cores": 1, "memory": 512})
    config = {"cores": "1", "memory": "512", "sockets": "1", "vga": "std", "agent": "0", "ostype": "l26"}
    hardware = tofu.hardware(config, vm)
    assert not {"cpu", "memory", "vga", "agent", "efi_disk", "tpm_state", "serial_device"} & set(hardware)
    assert hardware["on_boot"] is False and hardware["scsi_hardware"] == "lsi"
    assert tofu.hardware({}, vm)["operating_system"] == {"type": "other"}
    tpm = tofu.hardware({**config, "tpmstate0": "ceph:vm-1-disk-2,size=4M,version=v2.0"}, vm)["tpm_state"]
    assert tpm == {"datastore_id": "ceph", "version": "v2.0"}


def test_the_export_is_valid_for_the_pinned_provider(site: Site) -> None:
    config = _export(site, "acme", existing=("acme-db01",))
    jsonschema.validate(config, SCHEMA)
    assert config["terraform"]["required_providers"]["proxmox"] == {"source": "bpg/proxmox",
                                                                    "version": "~> 0.111.1"}
    # only the host the tenant's VMs are on, with its own token: the secret from a sensitive variable
    assert config["provider"]["proxmox"] == [{
        "alias": "pve-tenant", "endpoint": f"{site.hypervisors['pve-tenant'].api_url}/", "insecure": False,
        "api_token": "factory@pve!image-factory=${var.pve_tenant_api_token_secret}"}]
    assert config["variable"] == {"pve_tenant_api_token_secret": {
        "type": "string", "sensitive": True,
        "description": "the secret of API token factory@pve!image-factory on pve-tenant "
                       "(TF_VAR_pve_tenant_api_token_secret)"}}
    assert "pve-mgmt" not in json.dumps(config), "nothing of the mgmt plane in a tenant's hand-off"


def test_the_schema_is_a_real_check(site: Site) -> None:
    config = _export(site, "acme")
    vm = config["resource"]["proxmox_virtual_environment_vm"]["acme-web01"]
    vm["network_device"][0]["model"] = "e1000e"  # refused by the old hand-written schema, valid for the provider
    jsonschema.validate(config, SCHEMA)
    for break_it in (lambda c: c["resource"]["proxmox_virtual_environment_vm"]["acme-web01"]["network_device"][0]
                     .update(vlan=110),  # misspelt attribute: the provider calls it vlan_id
                     lambda c: c["resource"]["proxmox_virtual_environment_vm"]["acme-web01"]["network_device"][0]
                     .update(model="e1000x"),  # not one of the provider's models
                     lambda c: c["resource"]["proxmox_virtual_environment_vm"]["acme-web01"]["clone"].pop("vm_id"),
                     lambda c: c["resource"]["proxmox_virtual_environment_vm"]["acme-web01"]["vga"]
                     .update(enabled=True),  # removed from the provider long ago
                     lambda c: c["resource"]["proxmox_virtual_environment_vm"]["acme-web01"]["initialization"]
                     .update(dns={"server": "10.0.0.1"}),  # removed: servers is the list
                     lambda c: c["resource"]["proxmox_virtual_environment_vm"]["acme-web01"]["efi_disk"]
                     .__setitem__("type", "8m"),
                     lambda c: c["terraform"]["required_providers"]["proxmox"].update(version="0.81.0")):
        broken: dict[str, Any] = copy.deepcopy(config)
        broken["resource"]["proxmox_virtual_environment_vm"]["acme-web01"].setdefault("efi_disk", {"type": "4m"})
        jsonschema.validate(broken, SCHEMA)
        break_it(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, SCHEMA)


def test_the_export_and_the_deploy_plan_describe_the_same_vms(site: Site) -> None:
    plan = _plan(site, existing=("acme-db01",))
    config = tofu.tenant_config(site, plan, "acme", _bases(site, plan))
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
    assert tofu.base_vmid(plans["acme-db01"]) == 2102 and tofu.base_vmid(plans["acme-web01"]) == 9001


class _Client:
    """Answers vm_config as PVE does: the config of an existing VM, a 500 "does not exist" for any other."""

    def __init__(self, configs: dict[int, dict[str, str]]):
        self.configs = configs
        self.asked: list[int] = []

    def vm_config(self, vmid: int) -> dict[str, str]:
        from image_factory.pve.client import ApiError
        self.asked.append(vmid)
        if vmid not in self.configs:
            raise ApiError("pve-tenant", f"GET qemu/{vmid}/config", 500, f"Configuration file 'qemu-server/{vmid}.conf'"
                           " does not exist")
        return self.configs[vmid]


def test_bases_are_read_from_the_vm_or_its_template(site: Site) -> None:
    plan = _plan(site, existing=("acme-db01",))
    vm = site.vms["acme-db01"]
    template = factories.template_config(site.hypervisor_for(vm), site.image(vm.image), firmware="uefi")
    client = _Client({2102: _deployed(site, vm, "uefi"), 9001: template})
    bases = tofu.read_bases(site, plan, "acme", client_factory=lambda hv: client)  # type: ignore[arg-type,return-value]
    assert bases == {"acme-db01": _deployed(site, vm, "uefi"), "acme-web01": template}
    client.configs.pop(9001)
    with pytest.raises(tofu.FactoryError, match="acme-web01: cannot read the config of VM 9001 on pve-tenant"):
        tofu.read_bases(site, plan, "acme", client_factory=lambda hv: client)  # type: ignore[arg-type,return-value]


def test_bad_requests_are_named(site: Site, tmp_path: Path) -> None:
    with pytest.raises(ValidationFailed, match="no such tenant"):
        tofu.tenant_config(site, _plan(site), "initech", {})
    no_template = dep.DeployPlan([p if p.vm != "globex-web01" else dep.VmPlan(
        p.vm, p.plane, p.host, p.node, p.vmid, "blocked", reason="no tested template of image fedora-45")
        for p in _plan(site).vms])
    with pytest.raises(ValidationFailed, match="no template to clone: no tested template"):
        tofu.write_tenant(site, no_template, "globex", tmp_path, _bases(site, _plan(site)))
    with pytest.raises(ValidationFailed, match="the config of VM 9001 was not read"):
        tofu.write_tenant(site, _plan(site), "globex", tmp_path, {})
    assert not (tmp_path / "globex").exists(), "nothing is written for a refused export"
    done = tofu.write_tenant(site, _plan(site), "globex", tmp_path, _bases(site, _plan(site)))
    assert done.path == tmp_path / "globex" / "main.tf.json"
    config = json.loads(done.path.read_text())
    jsonschema.validate(config, SCHEMA)
    assert (done.vms, done.imports) == (len(config["resource"][tofu.RESOURCE]), len(config.get("import", [])))
    assert done.vms >= 1


def test_an_output_that_cannot_be_written_is_named_not_a_traceback(site: Site, tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where the directory would go\n")
    plan = _plan(site)
    with pytest.raises(ValidationFailed) as caught:
        tofu.write_tenant(site, plan, "acme", tmp_path / "taken", _bases(site, plan))
    [problem] = caught.value.problems
    assert (problem.key, str(tmp_path / "taken") in problem.message) == ("--output", True), problem


def test_a_vm_deploy_refuses_is_not_handed_to_tofu(site: Site, tmp_path: Path) -> None:
    """A VM whose deploy plan needs someone's decision is refused, not exported: a MAC another VM carries would be
    cloned onto a second VM by Tofu, and unsafe drift (a moved VLAN tag) would be changed in place by the first
    apply after import, both of which deploy refuses."""
    from image_factory.pve.livemacs import MacUse

    vm = site.vms["acme-web01"]
    hv = site.hypervisor_for(vm)
    templates = {vm.image: [_template(vm)]}
    taken = dep.decide(vm, hv, dep.HostState(templates, {}, {}),
                       {vm.macs[0]: [MacUse(hv.name, 4242, "intruder", "net0")]})
    assert (taken.action, taken.template_vmid) == ("blocked", 9001)
    moved = _deployed(site, vm)
    moved["net0"] = moved["net0"].replace("tag=110", "tag=120")
    drifted = dep.decide(vm, hv, dep.HostState(templates, {vm.vmid: dep.Observed(
        {"vmid": vm.vmid, "status": "running"}, moved)}, {}), {})
    assert drifted.action == "drift" and drifted.unsafe
    for refused, why in ((taken, "already used by pve-tenant VMID 4242"), (drifted, "net0.tag")):
        plan = dep.DeployPlan([refused if p.vm == vm.name else p for p in _plan(site).vms])
        with pytest.raises(ValidationFailed) as caught:
            tofu.write_tenant(site, plan, "acme", tmp_path, _bases(site, _plan(site)))
        [problem] = caught.value.problems
        assert (problem.entry, why in problem.message) == ("acme-web01", True), problem
        assert "deploy.plan" in problem.message
        assert not (tmp_path / "acme").exists()


GO_SOURCE = '''package resource

const (
\tmkVGA     = "vga"
\tmkVGAType = "type"
\tdvVGAType = "std"
\tmkNodeName = "node_name"
\tmkMACs = "mac_addresses"
)

func VM() *schema.Resource {
\ts := map[string]*schema.Schema{
\t\tmkNodeName: {Type: schema.TypeString, Required: true},
\t\tmkMACs: {Type: schema.TypeList, Computed: true, Elem: &schema.Schema{Type: schema.TypeString}},
\t\tmkVGA: {
\t\t\tType: schema.TypeList, Optional: true, MaxItems: 1,
\t\t\tElem: &schema.Resource{Schema: map[string]*schema.Schema{
\t\t\t\tmkVGAType: {Type: schema.TypeString, Optional: true, Default: dvVGAType,
\t\t\t\t\tValidateDiagFunc: VGATypeValidator()},  // a named validator: its one StringInSlice
\t\t\t}},
\t\t},
\t}
\treturn &schema.Resource{Schema: s}
}

func VGATypeValidator() schema.SchemaValidateDiagFunc {
\treturn validation.ToDiagFunc(validation.StringInSlice([]string{"std", "serial0"}, true))
}
'''


def test_the_schema_derivation_reads_the_providers_schema_literals() -> None:
    """tests/data/derive_bpg_schema.py on a VM() of the provider's shape: names from the mk* constants, nested
    blocks, required and computed-only attributes, a named validator's values."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("derive_bpg_schema",
                                                  REPO_ROOT / "tests" / "data" / "derive_bpg_schema.py")
    assert spec and spec.loader
    derive = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = derive  # its dataclass resolves its annotations through its module
    try:
        spec.loader.exec_module(derive)
    finally:
        del sys.modules[spec.name]
    pkg = derive.Package({"vm.go": GO_SOURCE})
    attrs = derive.parse_map(derive.schema_literal(pkg, "VM", derive.MAP), pkg, {})
    vga = {"type": "object", "additionalProperties": False,
           "properties": {"type": {"type": "string", "enum": ["std", "serial0"], "default": "std"}}}
    assert derive.to_json_schema(attrs) == {
        "type": "object", "additionalProperties": False, "required": ["node_name"],
        "properties": {"node_name": {"type": "string"},
                       "vga": {"anyOf": [vga, {"type": "array", "items": vga, "maxItems": 1}]}}}
