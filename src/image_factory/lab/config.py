"""Where a lab lives and how it is laid out.

A lab is one directory (``Settings.lab_dir``, default ``.lab`` in the repository, git-ignored)
plus a private state directory OUTSIDE the repository for the API token secrets
(``~/.local/state/deevnet-image-factory/lab-<hash of the lab dir>/``), because
``image_factory.site.secrets`` refuses secret files inside the repository.

Layout of the lab directory::

    lab.json                      the lab's configuration (written by lab.up, editable)
    pki/ca.pem, ca.key            the lab CA (like /etc/pve/pve-root-ca.pem: no keyUsage extension)
    client/id_ed25519[.pub]       the lab's SSH client key (0600)
    inventory/hosts.yml           the lab inventory (mirrors the example site)
    hosts/<name>/                 one hypervisor: sshd config and host key, node cert, pve.json
    hosts/<name>/root/var/lib/vz  its `local` directory storage (import/, images/, ...)
    hosts/<name>/vms/<vmid>.json  a running VM's qemu: pid, ssh address, MAC
    run/<name>-{sshd,pve}.pid     tracked processes
    log/                          sshd, fakepve and qemu logs
    clusters/<name>/shared, etc-pve   a modelled cluster's shared storage and /etc/pve (lab/cluster.py)

Addresses: a lab has a *slot* s (0 for ``invoke lab.up``; the pytest fixture picks a free one).
Hypervisor i (0-based, inventory order) listens on 127.0.s.(11+i) -- SSH on port 22 and the
API on 8006 -- and a running VM with id v is reachable on 127.(100+s).(v // 256 % 256).(v % 256)
port 22 (its qemu forwards that address to the guest's port 22).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from image_factory.errors import FactoryError
from image_factory.lab.spec import RELEASES, THIN_STORAGE

API_PORT = 8006
SSH_PORT = 22
PVE_VERSION = "8.4.1"
PVE_RELEASE = "8.4"
# A site in the middle of its upgrade: the mgmt host still on 8.4, the tenant host already on 9.2 (pve-manager
# versions; spec.RELEASES holds the qemu-server and pve-storage each shipped with; "9.1.19" selects 9.1).
PVE_VERSIONS_BY_ROLE = {"mgmt": "8.4.1", "tenant": "9.2.5"}
PLAYBOOK_DEFAULTS = "ansible/roles/pve_factory/defaults/main.yml"
LAB_STORAGE = "local"  # a lab node's directory storage: import/ always, images and cloud-init on mgmt
# where VM disks live: production hosts keep them on LVM-thin (pve-facts.md, Storage layouts); the lab
# keeps one host on each layout so every run exercises both
IMAGES_STORAGE_BY_ROLE = {"mgmt": LAB_STORAGE, "tenant": THIN_STORAGE}
TOKEN_ID = "factory@pve!image-factory"  # noqa: S105 - an id, not a secret
# A broad grant for unit tests of the lab itself; lab hosts get playbook_grants() instead.
PRIVILEGES: dict[str, tuple[str, ...]] = {
    "/vms": (
        "VM.Allocate", "VM.Clone", "VM.Config.Disk", "VM.Config.CDROM", "VM.Config.Cloudinit",
        "VM.Config.Network", "VM.Config.Options", "VM.Config.HWType", "VM.Config.Memory",
        "VM.Config.CPU", "VM.PowerMgmt", "VM.Audit",
        # Not in pve-facts' list, but PVE 8.4 checks it for every guest-agent call
        # (GET .../agent/network-get-interfaces), which deploy's readiness check uses.
        "VM.Monitor",
    ),
    "/storage": ("Datastore.AllocateSpace", "Datastore.AllocateTemplate", "Datastore.Audit"),
    "/sdn/zones/localnetwork": ("SDN.Use",),
    "/": ("Sys.Audit",),
}
STORAGE_ROOT = "root/var/lib/vz"  # relative to a host dir: the `local` storage path


class LabError(FactoryError):
    """The lab cannot be brought up, queried or torn down."""


@dataclass
class LabHost:
    name: str
    node: str
    role: str
    address: str
    ssh_port: int = SSH_PORT
    api_port: int = API_PORT
    tls: str = "ca"  # "ca": inventory gets tls_ca_file; "fingerprint": tls_fingerprint
    # pve-manager's version (one of spec.RELEASES): /version and the privilege catalogue follow it, VM
    # behaviour follows the qemu-server and storage behaviour the pve-storage that shipped with it
    pve_version: str = PVE_VERSION
    images_storage: str = LAB_STORAGE  # VM and template disks and cloud-init drives: local (dir) or local-lvm
    cluster: str = ""  # the name of the modelled cluster this host is a node of (lab/cluster.py); "": independent


@dataclass
class LabConfig:
    """The lab's knobs, saved as <lab_dir>/lab.json.

    real_boot: "all", "none" or a list of VM names whose start launches a real qemu.
    time_scale: real seconds per PVE second (fakepve); 0 finishes tasks inside the request.
    durations: True adds PVE-like task durations (clone, import, template, start) in PVE seconds.
    vm_memory_cap: MiB a lab qemu gets at most, whatever the VM's config says.
    placement: plane -> placement policy written to the lab inventory's group vars (pinned, spread, fill); a
        plane with more lab hosts than the example site has needs one (docs/inventory.md).
    """

    slot: int = 0
    hosts: list[LabHost] = field(default_factory=list)
    real_boot: str | list[str] = "all"
    time_scale: float = 1.0
    durations: bool = False
    vm_memory_cap: int = 768
    placement: dict[str, str] = field(default_factory=dict)
    # None: every host on loopback; {"profile": "lan"|"remote", "layout": "separate"|"shared", ...}: each host in
    # its own network namespace behind a shaped veth (lab/wire.py)
    wire: dict[str, Any] | None = None
    # None: independent hosts only; {"name": "labc", "nodes": 3, "role": "tenant"}: a modelled Proxmox VE cluster
    # beside them, its nodes appended to hosts by lab.up (lab/cluster.py)
    cluster: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> LabConfig:
        hosts = [LabHost(**h) for h in data.get("hosts", [])]
        rest = {k: v for k, v in data.items() if k != "hosts"}
        return cls(hosts=hosts, **rest)

    def validate(self, vm_names: set[str] | None = None, where: str = "lab config") -> LabConfig:
        """Raise LabError naming the bad knob; returns self."""
        try:
            self.time_scale = float(self.time_scale)
            self.slot = int(self.slot)
            self.vm_memory_cap = int(self.vm_memory_cap)
        except (TypeError, ValueError):
            raise LabError(f"{where}: time_scale, slot and vm_memory_cap must be numbers") from None
        if self.time_scale < 0:
            raise LabError(f"{where}: time_scale must be >= 0 (got {self.time_scale})")
        if not 0 <= self.slot <= 155:
            raise LabError(f"{where}: slot must be 0-155 (got {self.slot})")
        if self.vm_memory_cap < 128:
            raise LabError(f"{where}: vm_memory_cap must be at least 128 MiB")
        if isinstance(self.real_boot, str):
            if self.real_boot not in ("all", "none"):
                raise LabError(f"{where}: real_boot must be 'all', 'none' or a list of VM names")
        elif vm_names is not None:
            unknown = sorted(set(self.real_boot) - vm_names)
            if unknown:
                raise LabError(f"{where}: real_boot names unknown VM(s) {', '.join(unknown)} "
                               f"(have: {', '.join(sorted(vm_names))})")
        if not self.hosts:
            raise LabError(f"{where}: no hosts")
        bad = {k: v for k, v in self.placement.items() if k not in ("mgmt", "tenant")
               or v not in ("pinned", "spread", "fill")}
        if bad:
            raise LabError(f"{where}: placement {bad}: planes are mgmt and tenant, policies pinned, spread, fill")
        names = [h.name for h in self.hosts]
        if len(set(names)) != len(names):
            raise LabError(f"{where}: a host name is used twice ({', '.join(names)})")
        from image_factory.lab.wire import MAX_HOSTS, parse  # local: a cycle (wire raises config's LabError)
        if parse(self.wire, where) is not None and len(self.hosts) > MAX_HOSTS:
            raise LabError(f"{where}: a wired lab takes at most {MAX_HOSTS} hosts")
        from image_factory.lab.cluster import validate_cluster  # local: cluster builds on this module
        validate_cluster(self, where)
        for h in self.hosts:
            if h.pve_version not in RELEASES:
                raise LabError(f"{where}: host {h.name}: pve_version {h.pve_version!r} is not a release the lab "
                               f"models (pve-manager {', '.join(RELEASES)})")
        return self

    def host(self, name: str) -> LabHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise LabError(f"the lab has no hypervisor {name!r} (have: {', '.join(h.name for h in self.hosts)})")


def playbook_grants(root: Path, version: str, node: str, storages: list[str]) -> dict[str, list[str]]:
    """What ansible/playbooks/hypervisor.yml grants the factory's user and token on a node of this version:
    the role's own privilege list for the major and its ACL paths (the rule of pve_factory_acl_paths),
    read from the role's defaults, so the lab can never be more generous than a prepared host."""
    defaults = yaml.safe_load((root / PLAYBOOK_DEFAULTS).read_text(encoding="utf-8"))
    major = min(max(int(version.split(".")[0]), 8), 9)
    privileges = [*defaults["pve_factory_privileges_common"], *defaults["pve_factory_privileges_agent"][major],
                  *defaults["pve_factory_privileges_storage_and_node"]]
    paths = ["/vms", *(f"/storage/{s}" for s in dict.fromkeys(storages)), "/sdn/zones/localnetwork",
             f"/nodes/{node}"]
    return {path: list(privileges) for path in paths}


def host_address(slot: int, index: int) -> str:
    return f"127.0.{slot}.{11 + index}"


def vm_address(slot: int, vmid: int) -> str:
    """The loopback address a running lab VM's SSH is forwarded from."""
    return f"127.{100 + slot}.{vmid // 256 % 256}.{vmid % 256}"


@dataclass(frozen=True)
class LabPaths:
    lab_dir: Path
    config: Path = field(init=False)
    pki: Path = field(init=False)
    ca_cert: Path = field(init=False)
    ca_key: Path = field(init=False)
    client_key: Path = field(init=False)
    inventory_dir: Path = field(init=False)
    inventory: Path = field(init=False)
    run: Path = field(init=False)
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        layout = {"config": "lab.json", "pki": "pki", "ca_cert": "pki/ca.pem", "ca_key": "pki/ca.key",
                  "client_key": "client/id_ed25519", "inventory_dir": "inventory", "inventory": "inventory/hosts.yml",
                  "run": "run", "log": "log"}
        for name, relative in layout.items():
            object.__setattr__(self, name, self.lab_dir / relative)

    def host_dir(self, name: str) -> Path:
        return self.lab_dir / "hosts" / name

    def storage_dir(self, name: str) -> Path:
        return self.host_dir(name) / STORAGE_ROOT

    def import_dir(self, name: str) -> Path:
        return self.storage_dir(name) / "import"

    def vms_dir(self, name: str) -> Path:
        return self.host_dir(name) / "vms"

    def control_socket(self, name: str) -> Path:
        return self.run / f"{name}-control.sock"

    def pidfile(self, name: str, kind: str) -> Path:
        return self.run / f"{name}-{kind}.pid"

    @property
    def state_dir(self) -> Path:
        """Private directory outside the repository for the token secrets."""
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        digest = hashlib.sha256(str(self.lab_dir.resolve()).encode()).hexdigest()[:16]
        return base / "deevnet-image-factory" / f"lab-{digest}"

    def token_secret(self, name: str) -> Path:
        """The API token secret of a host, or of a cluster (one token.cfg for all its nodes) by its name."""
        return self.state_dir / f"{name}.token"

    def cluster_dir(self, cluster: str) -> Path:
        return self.lab_dir / "clusters" / cluster

    def shared_storage_dir(self, cluster: str) -> Path:
        """The cluster's shared storage: one directory every node's sshd and API see (like an NFS mount)."""
        return self.cluster_dir(cluster) / "shared"

    def etc_pve(self, cluster: str) -> Path:
        """The cluster's /etc/pve (pmxcfs): one directory all its nodes share; priv/lock/ holds cfs locks."""
        return self.cluster_dir(cluster) / "etc-pve"

    @property
    def vault_password(self) -> Path:
        """The vault password of the lab inventory's vaulted token secret (0600, beside the secrets)."""
        return self.state_dir / "vault-password"


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private(path: Path, data: bytes | str) -> None:
    """Write a 0600 file atomically (created with that mode, then renamed into place)."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)
    tmp.chmod(0o600)
    tmp.replace(path)


def write_public(path: Path, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(raw)
    tmp.replace(path)
