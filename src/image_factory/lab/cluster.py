"""The lab's modelled Proxmox VE cluster: nodes that share one /etc/pve, one API process and one shared storage.

``"cluster": {"name": "labc", "nodes": 3}`` in lab.json adds the cluster's nodes (pve-c1, pve-c2, ...) to the
lab's hosts, beside the independent ones, on the next addresses of the slot. Each node is a host as any other
(its own sshd, address, API endpoint, control socket, ``local`` and ``local-lvm``); what a cluster shares is
modelled by running all its nodes' APIs in ONE process (pve/members.py), as pmxcfs shares /etc/pve:

- VM configs, VMIDs, ACLs, tokens, tickets and datacenter.cfg are cluster-wide;
- each node's endpoint answers for the others by forwarding the call (pveproxy's proxyto), 595 when the node
  is offline;
- one ``dir`` storage ``shared`` (``shared 1``, content images,import): a directory every node's sshd sees;
- the cluster's /etc/pve is one directory (``clusters/<name>/etc-pve``) every node's sshd sees: ``mkdir`` of
  ``priv/lock/<name>`` there is pmxcfs's cluster-wide lock (docs/pve-facts.md, "Clusters").

Kept apart from the controller, whose size it would push past the limit; the controller calls in here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from image_factory.lab.config import LabConfig, LabError, LabHost, LabPaths, host_address

SHARED_STORAGE = "shared"  # the cluster's shared dir storage (an NFS mount on a real cluster)
CLUSTER_VERSION = "9.2.5"
DEFAULT_CLUSTER = {"name": "labc", "nodes": 3, "role": "tenant", "node_prefix": "pve-c",
                   "pve_version": CLUSTER_VERSION, "images_storage": SHARED_STORAGE}
CLUSTER_KEYS = set(DEFAULT_CLUSTER)
# pve-cluster's cluster name rule (PVE::Corosync / pvecm create: 1-15 characters, letters, digits and -)
CLUSTER_NAME = re.compile(r"^[A-Za-z0-9-]{1,15}$")
NODE_NAME = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?$")
# each node's own template VMIDs (nodes of one cluster need disjoint ranges: site/crosschecks.py)
TEMPLATE_VMIDS_BASE = 9100


def knob(cfg: LabConfig, where: str) -> dict[str, Any] | None:
    """lab.json's ``cluster`` with its defaults filled, or None; LabError naming the bad key."""
    if cfg.cluster is None:
        return None
    if not isinstance(cfg.cluster, dict):
        raise LabError(f"{where}: cluster must be a mapping like {{\"name\": \"labc\", \"nodes\": 3}}")
    unknown = sorted(set(cfg.cluster) - CLUSTER_KEYS)
    if unknown:
        raise LabError(f"{where}: cluster: unknown key(s) {', '.join(unknown)} "
                       f"(have: {', '.join(sorted(CLUSTER_KEYS))})")
    out = {**DEFAULT_CLUSTER, **cfg.cluster}
    if not isinstance(out["name"], str) or not CLUSTER_NAME.match(out["name"]):
        raise LabError(f"{where}: cluster.name {out['name']!r}: 1-15 letters, digits or '-' (pvecm's rule)")
    if not isinstance(out["nodes"], int) or not 2 <= out["nodes"] <= 8:
        raise LabError(f"{where}: cluster.nodes must be a number of nodes from 2 to 8 (got {out['nodes']!r})")
    if out["role"] not in ("mgmt", "tenant"):
        raise LabError(f"{where}: cluster.role must be mgmt or tenant (got {out['role']!r})")
    if not isinstance(out["node_prefix"], str) or not NODE_NAME.match(out["node_prefix"] + "1"):
        raise LabError(f"{where}: cluster.node_prefix {out['node_prefix']!r} does not make a node name")
    if out["images_storage"] not in (SHARED_STORAGE, "local", "local-lvm"):
        raise LabError(f"{where}: cluster.images_storage must be {SHARED_STORAGE}, local or local-lvm")
    return out


def ensure_nodes(cfg: LabConfig, where: str = "lab config") -> None:
    """Append the cluster's nodes to cfg.hosts (once: a lab.json written by lab.up already lists them); their
    plane gets placement spread unless lab.json names its policy."""
    spec = knob(cfg, where)
    if spec is None:
        return
    have = {h.name for h in cfg.hosts}
    # the plane has several hypervisors now: without a policy of its own, spread over them
    cfg.placement.setdefault(spec["role"], "spread")
    for i in range(1, int(spec["nodes"]) + 1):
        name = f"{spec['node_prefix']}{i}"
        if name in have:
            continue
        address = host_address(cfg.slot, len(cfg.hosts))
        cfg.hosts.append(LabHost(name=name, node=name, role=spec["role"], address=address, tls="ca",
                                 pve_version=spec["pve_version"], images_storage=spec["images_storage"],
                                 cluster=spec["name"]))


def apply_option(cfg: LabConfig, value: str, where: str) -> None:
    """lab.up --cluster: ``none`` drops the cluster and its nodes, ``NAME[:NODES]`` sets it (its nodes made
    anew when the name or size changes)."""
    name, _, count = value.partition(":")
    if name == "none":
        cfg.cluster = None
        cfg.hosts = [h for h in cfg.hosts if not h.cluster]
        return
    try:
        nodes = int(count) if count else int((cfg.cluster or {}).get("nodes", DEFAULT_CLUSTER["nodes"]))
    except ValueError:
        raise LabError(f"{where}: {value!r} is not NAME or NAME:NODES (e.g. labc:3)") from None
    before = dict(cfg.cluster or {})
    cfg.cluster = {**before, "name": name, "nodes": nodes}
    if (before.get("name"), before.get("nodes")) != (name, nodes):
        cfg.hosts = [h for h in cfg.hosts if not h.cluster]
    ensure_nodes(cfg, where)


def validate_cluster(cfg: LabConfig, where: str) -> None:
    spec = knob(cfg, where)
    members = [h for h in cfg.hosts if h.cluster]
    if spec is None:
        if members:
            raise LabError(f"{where}: host {members[0].name} names cluster {members[0].cluster!r}, but there is "
                           "no cluster knob")
        return
    stray = [h.name for h in members if h.cluster != spec["name"]]
    if stray:
        raise LabError(f"{where}: host(s) {', '.join(stray)} name another cluster than {spec['name']!r}")
    if len(members) != spec["nodes"]:
        raise LabError(f"{where}: cluster {spec['name']!r} has {len(members)} node host(s), cluster.nodes says "
                       f"{spec['nodes']}")
    if cfg.wire is not None:
        raise LabError(f"{where}: a cluster lab runs on loopback only (no wire)")


def members(cfg: LabConfig) -> list[LabHost]:
    return [h for h in cfg.hosts if h.cluster]


def secret_owner(host: LabHost) -> str:
    """Whose token secret and root password a host uses: a cluster's are one for all its nodes (token.cfg and
    the root password live in /etc/pve)."""
    return host.cluster or host.name


def template_vmids(cfg: LabConfig, host: LabHost) -> dict[str, int]:
    index = [h.name for h in members(cfg)].index(host.name)
    first = TEMPLATE_VMIDS_BASE + 100 * index
    return {"first": first, "last": first + 99}


def node_extra(paths: LabPaths, cfg: LabConfig, host: LabHost) -> dict[str, Any]:
    """What a node's API needs to know of its cluster (pve.json's extra.cluster)."""
    if not host.cluster:
        return {}
    for d in (paths.shared_storage_dir(host.cluster), paths.etc_pve(host.cluster) / "priv" / "lock"):
        d.mkdir(parents=True, exist_ok=True)
    return {"cluster": {"name": host.cluster, "nodes": [h.node for h in members(cfg)],
                        "shared_storage": SHARED_STORAGE,
                        "shared_dir": str(paths.shared_storage_dir(host.cluster)),
                        "etc_pve": str(paths.etc_pve(host.cluster)), "ca_cert": str(paths.ca_cert)}}


def api_command(paths: LabPaths, nodes: list[LabHost]) -> list[str]:
    """One API process serving every node of the cluster (each node's pve.json named, so each is 'ours')."""
    argv = [sys.executable, "-m", "image_factory.lab.pve_server"]
    for host in nodes:
        argv += ["--config", str(paths.host_dir(host.name) / "pve.json")]
    return argv


def start_api(paths: LabPaths, nodes: list[LabHost]) -> subprocess.Popen[bytes]:
    log = (paths.log / f"{nodes[0].cluster}-pve.log").open("ab")
    proc = subprocess.Popen(api_command(paths, nodes), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True)
    log.close()
    return proc


def log_file(paths: LabPaths, host: LabHost) -> Path:
    return paths.log / (f"{host.cluster}-pve.log" if host.cluster else f"{host.name}-pve.log")
