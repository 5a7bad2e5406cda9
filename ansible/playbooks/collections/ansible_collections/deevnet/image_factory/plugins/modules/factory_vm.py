#!/usr/bin/python
# Copyright: deevnet-image-factory contributors
# MIT License (see the project's pyproject.toml)
"""Ansible module: converge one VM of the inventory with deevnet-image-factory's own deploy code."""

from __future__ import annotations

DOCUMENTATION = r"""
module: factory_vm
short_description: Converge one inventory VM with the image factory's deploy (clone, fixed MACs, drift)
version_added: 0.1.0
description:
  - Runs the image factory's deploy for one VM of the deevnet inventory, the same plan (C(create), C(in-sync),
    C(drift), C(recreate), C(blocked)) and the same actions as C(invoke deploy.vm), under the same host lock.
  - A VM this tool did not make is never touched. Safe drift (memory, cores, MACs, cloud-init, tags, a grown disk, a
    stopped VM) is corrected by one config update. Unsafe drift (a NIC moved to another VLAN tag or bridge, a disk
    larger than the inventory's, another template) is only ever fixed by re-creating the VM, with O(recreate=true)
    (and O(allow_mgmt=true) for a running mgmt VM); without them the task fails naming each such field with its
    current and wanted value.
  - Runs on the controller (a local connection on localhost) with a Python that has the C(image_factory) package
    installed, for example the project's venv that runs C(ansible-playbook) (C(ansible_python_interpreter) set to
    C(ansible_playbook_python)). The PVE API token comes from the environment or the 0600 file the inventory names,
    as for C(invoke deploy.vm).
requirements:
  - Python 3.11 or newer.
  - The C(deevnet-image-factory) Python package (import name C(image_factory)) installed for the Python that runs
    the module. The module is a thin wrapper over its deploy code and reads the site model with it.
options:
  name:
    description: The VM's host name in the inventory.
    required: true
    type: str
  inventory:
    description: The Ansible inventory file or directory the site model (hypervisors, VMs, tenants) is read from.
    required: true
    type: path
  catalogue:
    description:
      - The image catalogue the VM's image is looked up in.
      - When not given, the catalogue C(invoke) would use in the same environment, C(INVOKE_FACTORY_IMAGES)
        (relative to C(INVOKE_FACTORY_SITE_DIR) when set), else C(packer/images.yml) of the image factory
        checkout that C(image_factory) belongs to.
    type: path
  recreate:
    description:
      - Destroy and re-create the VM when it has unsafe drift (as C(invoke deploy.vm --recreate)).
      - The re-created VM gets its inventory MACs again; data on its disks is lost.
    type: bool
    default: false
  allow_mgmt:
    description:
      - Also needed, with O(recreate=true), to re-create a running VM of the mgmt plane
        (as C(--i-know-this-is-mgmt)).
    type: bool
    default: false
  wait:
    description: Wait until the guest agent reports an address on the VM's inventory MAC.
    type: bool
    default: true
  timeout:
    description: Seconds allowed for each PVE task and for the readiness wait.
    type: int
    default: 600
  lock_wait:
    description: Seconds to wait for another run's host lock before failing with changing nothing.
    type: int
    default: 900
attributes:
  check_mode:
    description: Check mode is the deploy plan; nothing is written and no host lock is taken.
    support: full
  diff_mode:
    description: Every drifted field, safe or not, is returned as one C(before)/C(after) line.
    support: full
  platform:
    description: Runs on the controller; it talks to the Proxmox VE API and SSH endpoints the inventory names.
    support: full
    platforms: posix
notes:
  - In check mode the task fails when the plan is C(blocked) or has unsafe drift, as the real run would, and its
    message names every drifted field with its current and wanted value (Ansible shows a failed task's C(diff)
    only in its result, so the message carries it too).
  - A real run that corrected safe fields and then found unsafe drift reports C(changed=true), lists the fields
    left in RV(unresolved), and fails.
author:
  - Deevnet image factory maintainers (@deevnet)
"""

EXAMPLES = r"""
- name: Converge one mgmt VM from the inventory
  deevnet.image_factory.factory_vm:
    name: jump01
    inventory: "{{ inventory_dir }}"
  delegate_to: localhost
  vars:
    ansible_python_interpreter: "{{ ansible_playbook_python }}"

- name: Plan only, without waiting for the guest (run with --check --diff to see every drifted field)
  deevnet.image_factory.factory_vm:
    name: metrics01
    inventory: /srv/site/inventory
    catalogue: /srv/site/images.yml
    wait: false
  check_mode: true
  register: plan

- name: Re-create a running mgmt VM whose NIC moved to another VLAN (its disks are lost)
  deevnet.image_factory.factory_vm:
    name: jump01
    inventory: /srv/site/inventory
    recreate: true
    allow_mgmt: true
    timeout: 900
    lock_wait: 60
"""

RETURN = r"""
action:
  description: The plan for the VM.
  returned: always
  type: str
  choices: [create, in-sync, drift, recreate, blocked]
  sample: drift
state:
  description: What the run did (C(planned) in check mode).
  returned: always
  type: str
  choices: [planned, created, recreated, corrected, unchanged, drift-unresolved, blocked, failed, not-ready]
  sample: corrected
host:
  description: The inventory name of the hypervisor the VM lives on.
  returned: always
  type: str
  sample: pve-mgmt
vmid:
  description: The VM's id on its hypervisor.
  returned: always
  type: int
  sample: 1103
macs:
  description: The MACs of its NICs (read back from the API after a real run, the inventory's in check mode).
  returned: always
  type: list
  elements: str
  sample: ["02:de:10:10:03:00"]
address:
  description: The guest's address on its first NIC.
  returned: when O(wait=true) and the guest reported it
  type: str
  sample: 10.10.0.13
notes:
  description: What the plan and the run noted (pending changes, a grown disk, an unchecked lineage).
  returned: always
  type: list
  elements: str
  sample: ["takes effect at the next start: memory"]
drift:
  description: Every field whose current value differs from the inventory's.
  returned: always
  type: list
  elements: dict
  contains:
    field:
      description: The field as the deploy plan names it (C(memory), C(net0.tag), C(scsi0.size), ...).
      type: str
      sample: net0.tag
    current:
      description: Its value on the hypervisor.
      type: raw
      sample: "120"
    desired:
      description: Its value from the inventory.
      type: raw
      sample: "110"
    safe:
      description: Whether a config update corrects it (false means only a re-create does).
      type: bool
      sample: false
  sample: [{field: net0.tag, current: "120", desired: "110", safe: false}]
unresolved:
  description: The drifted fields this run leaves as they are (unsafe drift without O(recreate=true)).
  returned: always
  type: list
  elements: str
  sample: [net0.tag]
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Any

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    from image_factory import deploy
    from image_factory.errors import FactoryError
    from image_factory.settings import Settings
    from image_factory.site.inventory import load_site
except ImportError:
    HAS_IMAGE_FACTORY = False
    IMAGE_FACTORY_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    HAS_IMAGE_FACTORY = True
    IMAGE_FACTORY_IMPORT_ERROR = None


class _InstalledAnsibleCore(importlib.abc.MetaPathFinder):
    """Finds the ansible-core modules a module's payload lacks in the installed ansible-core.

    Ansible runs a module with an ``ansible`` package of its own that holds only the module_utils the module
    imports; the factory reads the site through ansible-core's inventory (ansible.inventory, ansible.vars,
    ansible.parsing and the module_utils they use). Consulted after every other finder, so what the payload
    has still comes from the payload; the interpreter is the one that runs ansible-playbook
    (ansible_python_interpreter: the factory's venv), so both are one ansible-core.
    """

    def __init__(self, package_dir: Path) -> None:
        self.package_dir = package_dir

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("ansible."):
            return None
        where = self.package_dir.joinpath(*fullname.split(".")[1:])
        if (where / "__init__.py").is_file():
            return importlib.util.spec_from_file_location(fullname, where / "__init__.py",
                                                          submodule_search_locations=[str(where)])
        module = where.parent / f"{where.name}.py"
        return importlib.util.spec_from_file_location(fullname, module) if module.is_file() else None


def _reach_installed_ansible_core() -> None:
    for entry in sys.path:
        package_dir = Path(entry or ".") / "ansible"
        if (package_dir / "inventory" / "manager.py").is_file():
            if not any(isinstance(f, _InstalledAnsibleCore) for f in sys.meta_path):
                sys.meta_path.append(_InstalledAnsibleCore(package_dir))
            return


# The deploy plan's reasons name the CLI's flags; in a task they are this module's options.
CLI_FLAG_AS_OPTION = {
    "--i-know-this-is-mgmt": "allow_mgmt=true",
    "--recreate": "recreate=true",
    "deploy.vm": "factory_vm",
}
CHANGED_STATES = {"created", "recreated", "corrected"}
LEFT_BEHIND = {"left-incomplete", "left-unmarked", "not-touched"}


def _as_options(text: str) -> str:
    for flag, option in CLI_FLAG_AS_OPTION.items():
        text = text.replace(flag, option)
    return text


def _fields(diffs: list[Any]) -> str:
    return "; ".join(f"{d.field}: {d.current!r} -> {d.desired!r}" for d in diffs)


def _diff(plan: Any) -> dict[str, str]:
    """Ansible's before/after: one line per drifted field; a create or re-create as the VM that will exist."""
    before = "".join(f"{d.field}: {d.current}\n" for d in plan.diffs)
    after = "".join(f"{d.field}: {d.desired}{'' if d.safe else '  (unsafe: re-create only)'}\n" for d in plan.diffs)
    if plan.action == "create":
        before, after = "", f"{plan.vm} ({plan.vmid}) cloned from {plan.template}\n"
    elif plan.action == "recreate":
        before += f"{plan.vm} ({plan.vmid}) destroyed\n"
        after += f"{plan.vm} ({plan.vmid}) re-created from {plan.template}\n"
    return {"before": before, "after": after, "before_header": f"{plan.host} VMID {plan.vmid}",
            "after_header": "inventory"}


def _changed(result: Any, check_mode: bool) -> bool:
    """Whether the run changed the VM (in check mode: would change it)."""
    plan = result.plan
    if check_mode:
        return plan.action in ("create", "recreate") or (plan.action == "drift" and bool(plan.safe_diffs))
    if result.state in CHANGED_STATES:
        return True
    if result.state == "drift-unresolved":
        return bool(plan.safe_diffs)  # the safe fields were corrected before the unsafe ones stopped it
    if result.state == "not-ready":
        return plan.action in ("create", "recreate") or bool(plan.safe_diffs)
    # failed: a re-create destroyed the old VM; a create that could not clean up left a VM behind
    return result.state == "failed" and (plan.action == "recreate" or result.cleanup in LEFT_BEHIND)


def _failure(result: Any, check_mode: bool) -> str | None:
    """Why the task fails, naming every field that is left with its current and wanted value; None if it does not."""
    plan = result.plan
    where = f"{plan.vm} (VMID {plan.vmid} on {plan.host})"
    if plan.action == "blocked":
        return f"{where}: blocked: {_as_options(plan.reason)}"
    if result.state in ("failed", "not-ready"):
        cleanup = f" (cleanup: {result.cleanup})" if result.cleanup else ""
        return f"{where}: {result.state}: {result.error or plan.reason}{cleanup}"
    if plan.action == "drift" and plan.unsafe:
        safe = _fields(plan.safe_diffs)
        done = ("; a real run corrects " if check_mode else "; corrected ") + safe if safe else ""
        return f"{where}: {_as_options(plan.reason)}{done}"
    return None


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "inventory": {"type": "path", "required": True},
            "catalogue": {"type": "path"},
            "recreate": {"type": "bool", "default": False},
            "allow_mgmt": {"type": "bool", "default": False},
            "wait": {"type": "bool", "default": True},
            "timeout": {"type": "int", "default": 600},
            "lock_wait": {"type": "int", "default": 900},
        },
        supports_check_mode=True,
    )
    if not HAS_IMAGE_FACTORY:
        module.fail_json(msg=missing_required_lib("image_factory (the deevnet-image-factory package)", reason=(
            "for this module (it is the factory's deploy for one VM): install deevnet-image-factory for that Python, "
            "or set ansible_python_interpreter: '{{ ansible_playbook_python }}' when the project's venv runs "
            "ansible-playbook")),
            exception=IMAGE_FACTORY_IMPORT_ERROR)
    p = module.params
    _reach_installed_ansible_core()
    try:
        site = load_site(p["inventory"], p["catalogue"] or Settings.from_environment().images)
        report = deploy.deploy_vms(None, site, [p["name"]], dry_run=module.check_mode, wait=p["wait"],
                                   timeout=p["timeout"], recreate=p["recreate"], allow_mgmt=p["allow_mgmt"],
                                   progress=False, lock_wait=p["lock_wait"])
    except FactoryError as exc:
        module.fail_json(msg=str(exc))
    result = report.results[0]
    plan = result.plan
    out: dict[str, Any] = {
        "action": plan.action, "state": result.state, "host": plan.host, "vmid": plan.vmid,
        "macs": result.macs or plan.macs, "notes": plan.notes + result.notes,
        "drift": [d.to_dict() for d in plan.diffs],
        "unresolved": [d.field for d in plan.unsafe] if plan.action == "drift" else [],
    }
    if result.address:
        out["address"] = result.address
    if module._diff and (plan.diffs or plan.action in ("create", "recreate")):
        out["diff"] = _diff(plan)
    changed = _changed(result, module.check_mode)
    failure = _failure(result, module.check_mode)
    if failure:
        module.fail_json(msg=failure, changed=changed, **out)
    module.exit_json(changed=changed, **out)


if __name__ == "__main__":
    main()
