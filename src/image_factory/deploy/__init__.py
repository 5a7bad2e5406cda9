"""Deploy the inventory's VMs: clone a tested template, write the fixed MACs, start, wait, converge.

One code path for planning and doing: :func:`plan_deploy` reads each hypervisor and turns every
selected VM into a :class:`VmPlan` (create / in-sync / drift / recreate / blocked, with the differing
fields); :func:`deploy_vms` executes exactly those plans (``dry_run`` stops after planning).

PVE behaviour this relies on (docs/pve-facts.md): a clone always gets fresh random MACs, so the
inventory MACs are written by one config update after the clone task has ended; ``sshkeys`` is
percent-encoded with ``quote(keys, safe="")``; MACs are compared case-insensitively on the parsed
``netN`` property string; clones on one host contend for the storage lock (10 s), so clones are
serialised per host and retried on "can't lock file ... got timeout"; every task is awaited on the
node named in its UPID.

A VM this tool made carries a marker block in its description (``managed-by: deevnet-image-factory``,
the inventory name, the template lineage, and ``factory-state: incomplete`` until the config update
has landed). A VM without the marker is never touched. A half-made VM is removed (stop, destroy with
purge and unreferenced disks); if that fails too it is tagged ``factory-incomplete`` and reported, and
the next run recreates it.
"""

from image_factory.deploy.act import deploy_vms, destroy_vm, remove_vm
from image_factory.deploy.decide import choose_template, decide, place_vms
from image_factory.deploy.desired import (
    boot_disk,
    check_placement,
    compare,
    decode_sshkeys,
    describe,
    desired_config,
    encode_sshkeys,
    ipconfig_value,
    nic_net,
    select_vms,
)
from image_factory.deploy.gather import plan_deploy
from image_factory.deploy.model import (
    DEFAULT_TIMEOUT,
    DeployError,
    DeployPlan,
    DeployReport,
    FieldDiff,
    HostLoad,
    HostState,
    NotReady,
    Observed,
    Placed,
    VmPlan,
    VmResult,
)
from image_factory.deploy.present import plan_table, report_table
from image_factory.deploy.ready import agent_configured, guest_address, known_address, ssh_answers, wait_ready
from image_factory.pve.hostlock import DEFAULT_WAIT
from image_factory.pve.templates import TemplateInfo, find_templates

__all__ = [
    "DEFAULT_TIMEOUT", "DEFAULT_WAIT", "DeployError", "DeployPlan", "DeployReport", "FieldDiff", "HostLoad",
    "HostState", "NotReady", "Observed", "Placed", "TemplateInfo", "VmPlan", "VmResult", "agent_configured",
    "boot_disk", "check_placement", "choose_template", "compare", "decide", "decode_sshkeys", "deploy_vms",
    "describe", "desired_config", "destroy_vm", "encode_sshkeys", "find_templates", "guest_address", "ipconfig_value",
    "known_address", "nic_net", "place_vms", "plan_deploy", "plan_table", "remove_vm", "report_table", "select_vms",
    "ssh_answers", "wait_ready",
]
