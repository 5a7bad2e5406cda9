#!/usr/bin/python
"""Ansible module: converge one VM of the inventory with deevnet-image-factory's own deploy code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: factory_vm
short_description: Converge one VM of the deevnet inventory (clone, fixed MACs, drift) like invoke deploy.vm
description:
  - Runs the image factory's deploy for one inventory VM: the same plan (create, in-sync, drift, recreate,
    blocked) and the same actions as C(invoke deploy.vm), under the same host lock.
  - Check mode is the plan and changes nothing; with --diff the drifted fields are shown.
  - Runs on the controller (delegate to localhost) with a Python that has image_factory installed (the
    project's venv, which runs ansible-playbook: ansible_playbook_python).
options:
  name: {description: The VM's inventory host name., required: true, type: str}
  inventory: {description: The Ansible inventory file or directory the site model is read from., required: true,
              type: path}
  catalogue: {description: The image catalogue (default the repository's packer/images.yml)., type: path}
  recreate: {description: Re-create a VM with unsafe drift (as deploy.vm --recreate)., type: bool, default: false}
  allow_mgmt: {description: Also needed to re-create a running mgmt VM (--i-know-this-is-mgmt)., type: bool,
               default: false}
  wait: {description: Wait until the guest reports its address., type: bool, default: true}
  timeout: {description: Seconds for each PVE task and the readiness wait., type: int, default: 600}
  lock_wait: {description: Seconds to wait for another run's host lock., type: int, default: 900}
author: deevnet-image-factory
"""

RETURN = r"""
action: {description: "The plan: create, in-sync, drift, recreate or blocked.", returned: always, type: str}
state: {description: "What happened: planned (check mode), created, recreated, corrected, unchanged.",
        returned: always, type: str}
vmid: {description: The VM's id., returned: always, type: int}
macs: {description: The MACs of its NICs., returned: always, type: list}
address: {description: The guest's address when waited for., returned: when known, type: str}
"""

CHANGING = {"create", "recreate", "drift"}


def _diff(plan: Any) -> dict[str, str]:
    before = "".join(f"{d.field}: {d.current}\n" for d in plan.diffs)
    after = "".join(f"{d.field}: {d.desired}{'' if d.safe else '  (unsafe: re-create only)'}\n" for d in plan.diffs)
    if plan.action in ("create", "recreate"):
        before, after = ("" if plan.action == "create" else "(to be destroyed)\n"), f"{plan.vm} ({plan.vmid})\n"
    return {"before": before, "after": after, "before_header": f"{plan.host} VMID {plan.vmid}",
            "after_header": "inventory"}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True}, "inventory": {"type": "path", "required": True},
            "catalogue": {"type": "path"}, "recreate": {"type": "bool", "default": False},
            "allow_mgmt": {"type": "bool", "default": False}, "wait": {"type": "bool", "default": True},
            "timeout": {"type": "int", "default": 600}, "lock_wait": {"type": "int", "default": 900},
        },
        supports_check_mode=True,
    )
    try:
        from image_factory import deploy
        from image_factory.errors import FactoryError
        from image_factory.inventory import load_site
        from image_factory.settings import REPO_ROOT
    except ImportError as exc:
        module.fail_json(msg=f"image_factory is not importable by {module._name}'s Python ({exc}): run it with the "
                             "project's venv (ansible_python_interpreter: '{{ ansible_playbook_python }}')")
    p = module.params
    try:
        site = load_site(p["inventory"], p["catalogue"] or Path(REPO_ROOT) / "packer" / "images.yml")
        report = deploy.deploy_vms(None, site, [p["name"]], dry_run=module.check_mode, wait=p["wait"],
                                   timeout=p["timeout"], recreate=p["recreate"], allow_mgmt=p["allow_mgmt"],
                                   progress=False, lock_wait=p["lock_wait"])
    except FactoryError as exc:
        module.fail_json(msg=str(exc))
    result = report.results[0]
    plan = result.plan
    out: dict[str, Any] = {"action": plan.action, "state": result.state, "vmid": plan.vmid,
                           "macs": result.macs or plan.macs, "notes": plan.notes + result.notes}
    if result.address:
        out["address"] = result.address
    if module._diff and (plan.diffs or plan.action in ("create", "recreate")):
        out["diff"] = _diff(plan)
    if plan.action == "blocked" or not result.ok or result.state == "drift-unresolved":
        module.fail_json(msg=result.error or plan.reason or f"{plan.vm}: {result.state}", changed=False, **out)
    changed = plan.action in CHANGING and (plan.action != "drift" or bool(plan.safe_diffs))
    module.exit_json(changed=changed, **out)


if __name__ == "__main__":
    main()
