"""Preflight: read-only checks that each hypervisor is ready for publish and deploy.

For every selected hypervisor, in parallel (one thread per host), and without changing anything
(API GETs only, and ``df`` over SSH):

========== ===========================================================================
check      what passes
========== ===========================================================================
tls        the API answers over TLS verified with the inventory's CA file or fingerprint
ssh        the SSH host key matches the pinned one and the factory key logs in
token      the API token authenticates
version    PVE 8.4 or newer (``import`` uploads need it)
cluster    a cluster entry's node is a node of its cluster and online (``/cluster/resources``); the detail
           says whether storage.images is shared (one template for the cluster) or local (one per node)
privileges the token's effective privileges (``GET /access/permissions``) cover
           :data:`REQUIRED_PRIVILEGES` on /vms, /storage/<id>, /sdn/zones/localnetwork/<bridge>
           and /nodes/<node>
storage    the images, cloud-init and import storages exist, are enabled and list the
           content types the factory writes (images; import)
space      the import storage (API ``avail``), the upload staging dir, the import dir and a ``dir``
           images storage beside it (``df`` over SSH, per filesystem), or an LVM-thin images pool's
           data space (API ``avail``) have room for the largest artifact
bridge     every bridge the inventory names for this host exists on the node
vmids      the template and VM id ranges hold no guest the factory does not own
           (owned = tagged :data:`FACTORY_TAG`)
macs       no VM on the node but the inventory VM itself carries an inventory MAC (foreign VMs
           and templates included; each host is checked against the whole inventory)
tags       the datacenter tag policy (``/cluster/options``: ``user-tag-access``, ``registered-tags``)
           lets the token set the factory's tags, which otherwise needs Sys.Modify on /; WARN (not a
           failure) where the token cannot read the policy (Sys.Audit on /)
firmware   the host's PVE can make each UEFI / Secure Boot / vTPM / q35 template the catalogue asks for
           (its key set, Microsoft's 2023 CAs: PVE 9.1.19+) and the images storage holds EFI and TPM volumes
========== ===========================================================================

Each failure carries a hint that says how to fix it. :func:`run_preflight` returns a
:class:`PreflightReport`; :meth:`PreflightReport.raise_for_failures` raises
:class:`PreflightFailed` with the host, check, problem and fix of every failure. publish and
deploy run ``run_preflight(..., checks=PUBLISH_CHECKS)`` / ``DEPLOY_CHECKS`` first.

Where things are: ``model`` (results, report, outcome), ``probe`` (:class:`HostProbe`: each fact of a host read
once, its error kept for every check that needs it), the checks as plain functions of the probe by topic
(``access``: tls, ssh, token, privileges; ``capability``: version, cluster, firmware; ``storage``: storage, space;
``network``: bridge; ``guests``: vmids, macs, tags), ``registry`` (a check's name, needs and deploy flag),
``catalogue`` (the checks in run order, the groups), ``run`` (per host, in parallel) and ``present`` (the table).
A new check is a function ``(HostProbe) -> Outcome`` and one ``Check`` line in the catalogue.
"""

from __future__ import annotations

from image_factory.preflight.access import (
    AGENT_PRIVILEGES,
    IMPORT_STORAGE_PRIVILEGES,
    LATEST_MAJOR,
    NODE_PRIVILEGES,
    REQUIRED_PRIVILEGES,
    SDN_PRIVILEGES,
    SDN_ZONE,
    STORAGE_PRIVILEGES,
    VM_BASE_PRIVILEGES,
    VM_PRIVILEGES,
    effective_privileges,
    major_of,
    required_acl,
    required_privileges,
    vm_privileges,
)
from image_factory.preflight.capability import EOL_MAJORS, MIN_VERSION
from image_factory.preflight.catalogue import ALL_CHECKS, CHECK_GROUPS, DEPLOY_CHECKS, PUBLISH_CHECKS
from image_factory.preflight.guests import factory_tags, tag_policy
from image_factory.preflight.model import (
    CHECK_BRIDGE,
    CHECK_FIRMWARE,
    CHECK_MACS,
    CHECK_PRIVILEGES,
    CHECK_SPACE,
    CHECK_SSH,
    CHECK_STORAGE,
    CHECK_TAGS,
    CHECK_TLS,
    CHECK_TOKEN,
    CHECK_VERSION,
    CHECK_VMIDS,
    FACTORY_ROLE,
    PLAYBOOK,
    CheckResult,
    Outcome,
    PreflightFailed,
    PreflightReport,
    SpaceNeed,
    bridges_for,
    failed,
    human_bytes,
    passed,
    split_list,
    warned,
)
from image_factory.preflight.network import vlan_problems, vlan_users
from image_factory.preflight.present import render_table
from image_factory.preflight.probe import HostProbe, parse_version
from image_factory.preflight.registry import CHECKS, Check, check, expand_checks
from image_factory.preflight.run import DEFAULT_TIMEOUT, run_host, run_preflight
from image_factory.preflight.storage import largest_artifact

__all__ = [
    "AGENT_PRIVILEGES", "ALL_CHECKS", "CHECKS", "CHECK_BRIDGE", "CHECK_FIRMWARE", "CHECK_GROUPS", "CHECK_MACS",
    "CHECK_PRIVILEGES", "CHECK_SPACE", "CHECK_SSH", "CHECK_STORAGE", "CHECK_TAGS", "CHECK_TLS", "CHECK_TOKEN",
    "CHECK_VERSION", "CHECK_VMIDS", "DEFAULT_TIMEOUT", "DEPLOY_CHECKS", "EOL_MAJORS", "FACTORY_ROLE",
    "IMPORT_STORAGE_PRIVILEGES", "LATEST_MAJOR", "MIN_VERSION", "NODE_PRIVILEGES", "PLAYBOOK", "PUBLISH_CHECKS",
    "REQUIRED_PRIVILEGES", "SDN_PRIVILEGES", "SDN_ZONE", "STORAGE_PRIVILEGES", "VM_BASE_PRIVILEGES", "VM_PRIVILEGES",
    "Check", "CheckResult", "HostProbe", "Outcome", "PreflightFailed", "PreflightReport", "SpaceNeed", "bridges_for",
    "check", "effective_privileges", "expand_checks", "factory_tags", "failed", "human_bytes", "largest_artifact",
    "major_of", "parse_version", "passed", "render_table", "required_acl", "required_privileges", "run_host",
    "run_preflight", "split_list", "tag_policy", "vlan_problems", "vlan_users", "vm_privileges", "warned",
]
