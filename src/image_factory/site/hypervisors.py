"""A hypervisor of the site: its API and token, pinned TLS and SSH, storages, VMID ranges and, for an install,
what Proxmox's automated installer needs (invoke host.answer)."""

from __future__ import annotations

import ipaddress
import re
import zoneinfo
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, SecretStr, field_validator, model_validator

from image_factory.console import register_secret
from image_factory.site.formats import (
    FINGERPRINT_RE,
    MAC_RE,
    SSH_KEY_RE,
    BridgeId,
    DnsName,
    IpAddress,
    NodeName,
    Plane,
    RemotePath,
    StorageId,
    Strict,
    TokenId,
    UnixUser,
    cidr_address,
    dns_name,
    matching,
    normalize_mac,
    ssh_public_key,
)
from image_factory.site.inventory_source import Vaulted


class VmidRange(Strict):
    first: int = Field(ge=100, le=999_999_999)
    last: int = Field(ge=100, le=999_999_999)

    @model_validator(mode="after")
    def _ordered(self) -> VmidRange:
        if self.last < self.first:
            raise ValueError(f"last ({self.last}) is below first ({self.first})")
        return self

    def __contains__(self, vmid: object) -> bool:
        return isinstance(vmid, int) and self.first <= vmid <= self.last

    def overlaps(self, other: VmidRange) -> bool:
        return self.first <= other.last and other.first <= self.last


class SshEndpoint(Strict):
    host: str
    port: int = Field(default=22, ge=1, le=65535)
    user: UnixUser = "root"

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v.strip("[]")))
        except ValueError:
            return dns_name(v)
    host_key: str = Field(description="pinned public host key, 'ssh-ed25519 AAAA...'")
    key_file: Path | None = Field(default=None, description="client private key; default: ssh agent/~/.ssh")

    @field_validator("host_key")
    @classmethod
    def _key_shape(cls, v: str) -> str:
        v = " ".join(v.split()[:2])
        if not SSH_KEY_RE.match(v):
            raise ValueError("must be '<type> <base64>' of an SSH public host key (ssh-ed25519, ecdsa, rsa)")
        return v


class Storages(Strict):
    images: StorageId = Field(default="local-lvm", description="storage that holds VM and template disks")
    import_: StorageId = Field(default="local", alias="import", description="file storage with 'import' content")
    import_dir: RemotePath = Field(default="/var/lib/vz/import", description="that storage's import/ directory")
    cloudinit: StorageId = Field(default="local-lvm", description="storage for the cloud-init drive")
    staging_dir: RemotePath = Field(default="/var/tmp", description="where PVE stages API uploads")
    snippets: StorageId | None = Field(
        default=None, description="file storage with 'snippets' content: cloud-init vendor data (cicustom)")
    snippets_dir: RemotePath = Field(default="/var/lib/vz/snippets", description="that storage's snippets/ directory")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ClusterNode(Strict):
    """One node of a cluster entry: its SSH endpoint with its own pinned host key, and where its paths differ from
    the entry's, its own ``storage`` mapping (replacing the entry's whole, as Ansible replaces a mapping)."""

    ssh: SshEndpoint
    storage: Storages | None = None


class ClusterNodes(Strict):
    """A cluster entry's ``pve.nodes``: the nodes the factory uses, by PVE node name, in the order preferred for a
    cluster-wide upload."""

    nodes: dict[NodeName, ClusterNode] = Field(min_length=1)


# Proxmox's auto-installer (proxmox-auto-installer/src/answer.rs, 8.4.6 and 9.1.7; docs/host-install.md).
KEYBOARD_LAYOUTS = ("de", "de-ch", "dk", "en-gb", "en-us", "es", "fi", "fr", "fr-be", "fr-ca", "fr-ch", "hu",
                    "is", "it", "jp", "lt", "mk", "nl", "no", "pl", "pt", "pt-br", "se", "si", "tr")
ZFS_RAID_LEVELS = {"raid0": 1, "raid1": 2, "raid10": 4, "raidz-1": 3, "raidz-2": 4, "raidz-3": 5}  # min. disks
# The storages each root filesystem's install creates (Proxmox/Install/StorageConfig.pm).
INSTALL_STORAGES = {"ext4": ("local", "local-lvm"), "xfs": ("local", "local-lvm"), "zfs": ("local", "local-zfs")}
DISK_NAME_RE = re.compile(r"^[a-z][a-z0-9]*$")  # kernel block device names (sda, nvme0n1, vda)
CRYPT_HASH_HINT = "a crypt(3) hash such as '$y$...' or '$6$...' (mkpasswd -m yescrypt)"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _hardware_mac(v: Any) -> Any:
    """A NIC's burned-in MAC: globally administered MACs are expected here, only multicast is refused."""
    if not isinstance(v, str):
        return v
    v = normalize_mac(v)
    if not MAC_RE.match(v):
        raise ValueError(f"MAC {v!r} is not six colon-separated hex bytes")
    if int(v[:2], 16) & 1:
        raise ValueError(f"MAC {v!r} is a multicast address")
    return v


HardwareMac = Annotated[str, BeforeValidator(_hardware_mac)]


class InstallNetwork(Strict):
    source: Literal["static", "dhcp"]
    mac: HardwareMac | None = Field(default=None, description="the management NIC (default: the first of macs)")
    address: str | None = Field(default=None, description="static: the host's address in CIDR form")
    gateway: IpAddress | None = None
    dns: IpAddress | None = None

    @field_validator("address")
    @classmethod
    def _cidr(cls, v: str | None) -> str | None:
        return None if v is None else cidr_address(v)

    @model_validator(mode="after")
    def _complete(self) -> InstallNetwork:
        given = [k for k in ("address", "gateway", "dns") if getattr(self, k) is not None]
        if self.source == "static" and len(given) < 3:
            raise ValueError("a static network needs address, gateway and dns")
        if self.source == "dhcp" and given:
            raise ValueError(f"{', '.join(given)} only apply to source: static (the installer refuses them with DHCP)")
        if self.address and self.gateway and ipaddress.ip_address(self.gateway) not in (
                ipaddress.ip_interface(self.address).network):
            raise ValueError(f"gateway {self.gateway} is outside {self.address}")
        return self


class InstallDisks(Strict):
    filesystem: Literal["ext4", "xfs", "zfs"]
    disks: list[Annotated[str, matching(DISK_NAME_RE, "a block device name such as sda or nvme0n1")]] = Field(
        min_length=1)
    zfs_raid: Literal["raid0", "raid1", "raid10", "raidz-1", "raidz-2", "raidz-3"] | None = None
    hdsize: float | None = Field(default=None, gt=0, description="GB of each disk to use")
    swapsize: float | None = Field(default=None, ge=0, description="ext4/xfs: GB of swap")

    @model_validator(mode="after")
    def _layout(self) -> InstallDisks:
        if len(set(self.disks)) != len(self.disks):
            raise ValueError("a disk is listed twice")
        if self.filesystem == "zfs":
            if self.zfs_raid is None:
                raise ValueError("filesystem zfs needs zfs_raid (e.g. raid1 for a mirror)")
            if len(self.disks) < ZFS_RAID_LEVELS[self.zfs_raid]:
                raise ValueError(f"{self.zfs_raid} needs at least {ZFS_RAID_LEVELS[self.zfs_raid]} disks")
            if self.swapsize is not None:
                raise ValueError("swapsize applies to ext4/xfs (LVM) only")
        else:
            if self.zfs_raid is not None:
                raise ValueError(f"zfs_raid applies to filesystem zfs, not {self.filesystem}")
            if len(self.disks) != 1:
                raise ValueError(f"{self.filesystem} + LVM installs on exactly one disk (the installer's rule)")
        return self


def _timezone(v: str) -> str:
    known = zoneinfo.available_timezones()
    if v != "UTC" and known and v not in known:
        raise ValueError(f"{v!r} is not a time zone name (e.g. Europe/Vienna, America/Chicago, UTC)")
    return v


class HostInstall(Strict):
    """How Proxmox's automated installer sets this hypervisor up (invoke host.answer)."""

    macs: list[HardwareMac] = Field(min_length=1, description="the host's NIC MACs: how the answer server knows it")
    fqdn: DnsName | None = Field(default=None, description="default: ssh.host when that is a DNS name")
    keyboard: Literal[KEYBOARD_LAYOUTS] = "en-us"  # type: ignore[valid-type]
    country: Annotated[str, matching(re.compile(r"^[a-z]{2}$"), "a two-letter country code")]
    timezone: Annotated[str, AfterValidator(_timezone)]
    mailto: Annotated[str, matching(re.compile(r"^[^@\s]+@[^@\s]+$"), "an email address")]
    root_password_hash_env: str | None = None
    root_password_hash_file: Path | None = None
    root_ssh_keys: list[str] = Field(default_factory=list)
    root_ssh_key_files: list[Path] = Field(default_factory=list, description="public key files, read at render")
    network: InstallNetwork
    disk: InstallDisks

    @field_validator("macs")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a MAC is listed twice")
        return v

    @field_validator("root_ssh_keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        return [ssh_public_key(k) for k in v]

    @model_validator(mode="after")
    def _complete(self) -> HostInstall:
        if (self.root_password_hash_env is None) == (self.root_password_hash_file is None):
            raise ValueError("exactly one of root_password_hash_env or root_password_hash_file must be set "
                             f"({CRYPT_HASH_HINT}; the installer requires a root password)")
        if not self.root_ssh_keys and not self.root_ssh_key_files:
            raise ValueError("root_ssh_keys or root_ssh_key_files: the host playbook logs in as root with a key")
        if self.network.mac is not None and self.network.mac not in self.macs:
            raise ValueError(f"network.mac {self.network.mac} is not one of macs")
        return self

    @property
    def management_mac(self) -> str:
        return self.network.mac or self.macs[0]


def _vaulted_secret(v: Any) -> Any:
    """A token secret written in the inventory is accepted only encrypted at rest (Ansible vault); it is masked
    in everything printed from the moment it is read."""
    if v is None or isinstance(v, SecretStr):
        return v
    if not isinstance(v, Vaulted):
        raise ValueError("is plaintext: a token secret in the inventory must be vault-encrypted (`ansible-vault "
                         "encrypt_string --name token_secret`, or a vault-encrypted host_vars file); or name it by "
                         "token_secret_env or token_secret_file")
    register_secret(str(v))
    return SecretStr(str(v))


def _api_url(v: str) -> str:
    if not re.match(r"^https://[^/\s]+(:\d+)?/?$", v):
        raise ValueError("must be 'https://host[:port]' (TLS is required; no path)")
    return v.rstrip("/")


class Hypervisor(Strict):
    name: DnsName
    role: Plane
    node: NodeName
    api_url: str
    api_urls: list[str] = Field(default_factory=list, description="a cluster's other nodes' APIs, tried in order "
                                                                  "after api_url when it cannot be reached")
    token_id: TokenId
    token_secret_env: str | None = None
    token_secret_file: Path | None = None
    token_secret: Annotated[SecretStr | None, BeforeValidator(_vaulted_secret)] = Field(default=None, exclude=True)
    tls_ca_file: Path | None = None
    tls_fingerprint: str | None = None
    ssh: SshEndpoint
    storage: Storages = Storages()
    bridge: BridgeId = "vmbr0"
    template_vmids: VmidRange
    vm_vmids: VmidRange
    install: HostInstall | None = None
    cluster_lock_dir: RemotePath = Field(default="/etc/pve/priv/lock", description="a cluster entry's: the cluster "
                                         "file system's lock directory, where the factory's cluster lock is made")
    cluster: str | None = Field(default=None, description="the cluster entry this node is a member of (set by the "
                                                          "site's loader from pve.nodes, never written in an entry)")

    def member(self, node: str, spec: ClusterNode) -> Hypervisor:
        """This cluster entry's hypervisor for one of its nodes: named ``<entry>/<node>``, reached over that node's
        SSH, everything else (API endpoints, token, storages unless the node has its own, VMID ranges) the
        cluster's."""
        return self.model_copy(update={"name": f"{self.cluster}/{node}", "node": node, "ssh": spec.ssh,
                                       "storage": spec.storage or self.storage})

    @property
    def token_secret_source(self) -> str:
        """Where the token secret comes from, for messages (never the secret)."""
        if self.token_secret_env:
            return f"environment variable {self.token_secret_env}"
        if self.token_secret_file:
            return f"file {self.token_secret_file}"
        return "the vault-encrypted pve.token_secret of the inventory"

    @field_validator("api_url")
    @classmethod
    def _https(cls, v: str) -> str:
        return _api_url(v)

    @field_validator("api_urls")
    @classmethod
    def _endpoints(cls, v: list[str]) -> list[str]:
        urls = [_api_url(u) for u in v]
        if len(set(urls)) != len(urls):
            raise ValueError("an endpoint is listed twice")
        return urls

    @field_validator("tls_fingerprint")
    @classmethod
    def _fp(cls, v: str | None) -> str | None:
        if v is not None and not FINGERPRINT_RE.match(v):
            raise ValueError("must be the SHA-256 fingerprint as 32 colon-separated hex bytes")
        return v.upper() if v else v

    @model_validator(mode="after")
    def _one_of(self) -> Hypervisor:
        if [self.token_secret_env, self.token_secret_file, self.token_secret].count(None) != 2:
            raise ValueError("exactly one of token_secret_env, token_secret_file or a vaulted token_secret must be set")
        if self.tls_ca_file is None and self.tls_fingerprint is None:
            raise ValueError("one of tls_ca_file or tls_fingerprint must be set (TLS is always verified)")
        if self.api_url in self.api_urls:
            raise ValueError("api_urls repeats api_url")
        if self.api_urls and self.tls_ca_file is None:
            raise ValueError("api_urls needs tls_ca_file: each node of a cluster has its own certificate, signed by "
                             "the cluster's CA (/etc/pve/pve-root-ca.pem); one tls_fingerprint pins one node")
        if self.template_vmids.overlaps(self.vm_vmids):
            raise ValueError("template_vmids and vm_vmids overlap")
        if self.install is not None:
            self._installable(self.install)
        return self

    def _installable(self, install: HostInstall) -> None:
        fqdn = install.fqdn or self.install_fqdn
        if fqdn is None or "." not in fqdn:
            raise ValueError("install.fqdn is needed (ssh.host is not a fully qualified name)")
        if fqdn.split(".")[0] != self.node.lower():
            raise ValueError(f"install.fqdn {fqdn} must start with the node name {self.node} (PVE's node = hostname)")
        made = INSTALL_STORAGES[install.disk.filesystem]
        for key, storage in (("images", self.storage.images), ("cloudinit", self.storage.cloudinit)):
            if storage not in made[1:]:
                raise ValueError(f"storage.{key} {storage!r} is not what a {install.disk.filesystem} install creates "
                                 f"({made[1]}); set storage.{key}: {made[1]}")
        static = install.network.address
        if static and _is_ip(self.ssh.host) and self.ssh.host != str(ipaddress.ip_interface(static).ip):
            raise ValueError(f"install.network.address {static} is not ssh.host {self.ssh.host}: the host playbook "
                             "would not reach the installed host")
        if self.storage.import_ != "local":
            raise ValueError(f"storage.import {self.storage.import_!r}: an install makes only 'local' as file storage")

    @property
    def install_fqdn(self) -> str | None:
        if self.install is not None and self.install.fqdn:
            return self.install.fqdn
        if _is_ip(self.ssh.host) or "." not in self.ssh.host:
            return None
        return self.ssh.host
