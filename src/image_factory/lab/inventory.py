"""The lab's inventory: the example site (ansible/inventory) with its hypervisors pointed at the lab, one token
secret vaulted as a real site's would be."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from image_factory.errors import Problem
from image_factory.lab import cluster
from image_factory.lab.config import (
    LAB_STORAGE,
    TOKEN_ID,
    LabConfig,
    LabError,
    LabHost,
    LabPaths,
    vm_address,
    write_private,
    write_public,
)
from image_factory.lab.pki import cert_fingerprint
from image_factory.settings import Settings
from image_factory.site import inventory_source

LAB_IMAGE = "debian-lab"
LAB_VM_MEMORY = 768


# One hypervisor of the lab takes its token secret from a vault-encrypted inventory value (the others from their
# 0600 file), so every lab test and the e2e run read a vaulted secret as a real site would.
VAULTED_SECRET_ROLE = "tenant"  # noqa: S105 - a hypervisor role
VAULT_ID = "lab"


def vault_variables(paths: LabPaths) -> dict[str, str]:
    """Ansible's setting that gives the lab inventory's vault password: its own vault identity, added to any the
    environment already names (a site's own password file stays in use)."""
    mine = f"{VAULT_ID}@{paths.vault_password}"
    have = [v for v in os.environ.get("ANSIBLE_VAULT_IDENTITY_LIST", "").split(",") if v and v != mine]
    return {"ANSIBLE_VAULT_IDENTITY_LIST": ",".join([*have, mine])}


@contextlib.contextmanager
def vault_environment(paths: LabPaths) -> Iterator[None]:
    """The lab's vault identity in the environment while the block runs (ansible-core reads it from there)."""
    saved = {k: os.environ.get(k) for k in vault_variables(paths)}
    os.environ.update(vault_variables(paths))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def example_inventory(settings: Settings) -> dict[str, Any]:
    """The example site's groups, each with its own vars and its hosts' own vars (inventory files, group_vars/
    and host_vars/ merged per group and host, as ansible-core reads them): the lab mirrors it."""
    src = settings.root / "ansible" / "inventory"
    problems: list[Problem] = []
    groups = {name: body for name, body in inventory_source.flat(src, problems).items()
              if name not in ("all", "ungrouped")}
    if problems:
        raise LabError(f"the example inventory {src} does not read: {problems[0]}")
    if not groups:
        raise LabError(f"no example inventory to mirror in {src}")
    return groups


def example_vm_names(settings: Settings) -> set[str]:
    groups = example_inventory(settings)
    return {name for body in groups.values() for name, hvars in (body.get("hosts") or {}).items()
            if isinstance((hvars or {}).get("vm"), dict)}


def write_inventory(settings: Settings, paths: LabPaths, cfg: LabConfig,
                    keys: dict[str, tuple[str, Path]], client_public: str) -> Path:
    """The lab inventory: the example site with its hypervisors pointed at the lab."""
    groups = example_inventory(settings)
    by_name = {h.name: h for h in cfg.hosts}
    out_groups: dict[str, Any] = {}
    for group, body in groups.items():
        hosts_out: dict[str, Any] = {}
        for name, hvars in (body.get("hosts") or {}).items():
            hvars = dict(hvars or {})
            if group == "hypervisors":
                host = by_name.get(name)
                if host is None:
                    continue
                hvars = _lab_hypervisor(paths, cfg, host, hvars.get("pve") or {}, keys[name])
            elif "vm" in hvars:
                vm = dict(hvars["vm"])
                vm["image"] = LAB_IMAGE
                vm["memory"] = min(int(vm.get("memory", LAB_VM_MEMORY)), LAB_VM_MEMORY)
                ci = dict(vm.get("cloudinit") or {})
                ssh_keys = list(ci.get("ssh_keys") or [])
                if client_public not in ssh_keys:
                    ssh_keys.append(client_public)
                ci["ssh_keys"] = ssh_keys
                vm["cloudinit"] = ci
                hvars["vm"] = vm
                if "vmid" in vm:
                    hvars["ansible_host"] = vm_address(cfg.slot, int(vm["vmid"]))
            hosts_out[name] = hvars
        if group == "hypervisors":
            example_pves = {(hv.get("pve") or {}).get("role"): hv.get("pve") or {}
                            for hv in reversed(list((body.get("hosts") or {}).values())) if hv}
            for host in cfg.hosts:
                if host.name not in hosts_out:
                    hosts_out[host.name] = _lab_hypervisor(paths, cfg, host, example_pves.get(host.role, {}),
                                                           keys[host.name])
        entry: dict[str, Any] = {}
        group_vars = dict(body.get("vars") or {})
        if group in cfg.placement:
            group_vars["placement"] = cfg.placement[group]
        if group_vars:
            entry["vars"] = group_vars
        entry["hosts"] = hosts_out
        out_groups[group] = entry
    header = (
        "# GENERATED by `invoke lab.up` -- the lab's inventory: the example site (ansible/inventory)\n"
        "# with its hypervisors pointed at the lab on this machine. Same VM names, ids, planes, roles\n"
        "# and MACs; images switched to the offline fixture image, small memory, the lab client key\n"
        "# added to cloud-init. Regenerated on every lab.up; do not edit.\n"
    )
    paths.inventory_dir.mkdir(parents=True, exist_ok=True)
    text = header + yaml.dump({"all": {"children": out_groups}}, Dumper=InventoryDumper, sort_keys=False, width=200)
    write_public(paths.inventory, text)
    return paths.inventory


def _lab_hypervisor(paths: LabPaths, cfg: LabConfig, host: LabHost, example: dict[str, Any],
                    keys: tuple[str, Path]) -> dict[str, Any]:
    """A host's entry; a cluster node's as docs/inventory.md's "Each node an entry" (its peers' endpoints in
    api_urls, the cluster's CA, template VMIDs of its own)."""
    host_key, cert = keys
    storage_dir = paths.storage_dir(host.name)
    pve: dict[str, Any] = {
        "role": host.role,
        "node": host.node,
        "api_url": f"https://{host.address}:{host.api_port}",
        "token_id": TOKEN_ID,
    }
    secret = paths.token_secret(cluster.secret_owner(host))
    if host.role == VAULTED_SECRET_ROLE:
        pve["token_secret"] = _vaulted(paths, secret.read_text().strip())
    else:
        pve["token_secret_file"] = str(secret)
    peers = [h for h in cluster.members(cfg) if h.cluster == host.cluster and h.name != host.name]
    if peers:
        pve["api_urls"] = [f"https://{h.address}:{h.api_port}" for h in peers]
    if host.tls == "ca":
        pve["tls_ca_file"] = str(paths.ca_cert)
    else:
        pve["tls_fingerprint"] = cert_fingerprint(cert)
    pve["ssh"] = {"host": host.address, "port": host.ssh_port, "user": "root", "host_key": host_key,
                  "key_file": str(paths.client_key)}
    pve["storage"] = {"images": host.images_storage, "import": LAB_STORAGE,
                      "import_dir": str(storage_dir / "import"), "cloudinit": host.images_storage,
                      "staging_dir": str(paths.host_dir(host.name) / "root" / "var" / "tmp"),
                      "snippets": LAB_STORAGE, "snippets_dir": str(storage_dir / "snippets")}
    pve["bridge"] = example.get("bridge", "vmbr0")
    for key in ("template_vmids", "vm_vmids"):
        if key in example:
            pve[key] = example[key]
    if host.cluster:
        pve["template_vmids"] = cluster.template_vmids(cfg, host)
    return {"ansible_host": host.address, "pve": pve}


class VaultText(str):
    """Ciphertext written as an inline ``!vault |`` value."""


class InventoryDumper(yaml.SafeDumper):
    """Writes a lab inventory, VaultText as ``!vault |``."""


class InventoryLoader(yaml.SafeLoader):
    """Reads a lab inventory back with its ``!vault`` values kept as VaultText (for a test that derives a site)."""


InventoryDumper.add_representer(VaultText,
                                lambda dumper, value: dumper.represent_scalar("!vault", str(value), style="|"))


def _vault_text(loader: yaml.SafeLoader, node: yaml.Node) -> VaultText:
    assert isinstance(node, yaml.ScalarNode)
    return VaultText(loader.construct_scalar(node))


InventoryLoader.add_constructor("!vault", _vault_text)


def _vaulted(paths: LabPaths, plaintext: str) -> VaultText:
    """``plaintext`` encrypted with the lab's vault password (made once, 0600 in the private state directory)."""
    from ansible.parsing.vault import VaultLib, VaultSecret  # ansible-core loads slowly: only for a vaulted value

    if not paths.vault_password.exists():
        write_private(paths.vault_password, secrets.token_urlsafe(24) + "\n")
    password = paths.vault_password.read_bytes().strip()
    ciphertext = VaultLib([(VAULT_ID, VaultSecret(password))]).encrypt(plaintext, vault_id=VAULT_ID)
    return VaultText(ciphertext.decode())
