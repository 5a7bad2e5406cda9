"""The site model: hypervisors and VMs from an Ansible YAML inventory, images from a catalogue.

The inventory is a plain Ansible inventory (``ansible-inventory -i ansible/inventory --list``
reads it): hypervisors live in the group ``hypervisors`` with a ``pve`` mapping, VMs live in the
groups ``mgmt`` and ``tenant`` with a ``vm`` mapping. Everything is validated with pydantic
before any action; all problems are reported together, each naming file, entry and key.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import string
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from image_factory import families, tools
from image_factory.console import register_secret
from image_factory.errors import Problem, ValidationFailed
from image_factory.ownership import imitates_marker, reserved_tag
from image_factory.platform import Platform
from image_factory.site import inventory_source
from image_factory.site.inventory_source import HostVars, Vaulted, YamlIntForm

PLANES = ("mgmt", "tenant")
# How a plane places a VM that names no hypervisor (docs/inventory.md, "Several hypervisors per plane"); the
# variable ``placement`` of group mgmt or tenant (group_vars/tenant.yml), default pinned.
PLACEMENT_KEY = "placement"
PLACEMENTS = ("pinned", "spread", "fill")
Placement = Literal["pinned", "spread", "fill"]
HYPERVISOR_GROUP = "hypervisors"
Plane = Literal["mgmt", "tenant"]
Suite = Literal["common", "hygiene", "fedora", "updates", "builder", "firmware"]

MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
TAG_RE = re.compile(r"^[a-z0-9_][a-z0-9_\-+.]*$")
TENANT_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
TOKEN_ID_RE = re.compile(r"^[^\s@!]+@[^\s@!]+![A-Za-z][A-Za-z0-9._-]*$")
FINGERPRINT_RE = re.compile(r"^([0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}$")
SSH_KEY_RE = re.compile(r"^(ssh-ed25519|ecdsa-sha2-nistp(256|384|521)|ssh-rsa) [A-Za-z0-9+/=]+$")
SIZE_RE = re.compile(r"^[1-9][0-9]*[GM]$")
# PVE's own formats (pve-common JSONSchema): every value that reaches a property string or a remote
# path is checked against them, so nothing can smuggle in a ",key=value" or a shell word.
DNS_NAME_RE = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$",
                         re.IGNORECASE)
NODE_RE = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$")  # pve-node
BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # pve-bridge-id, within Linux's 15-character interface names
STORAGE_ID_RE = re.compile(r"^[a-z][a-z0-9_.-]*[a-z0-9]$", re.IGNORECASE)  # pve-storage-id
IMAGE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{0,62}$")
UNIX_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
REMOTE_PATH_RE = re.compile(r"^/[A-Za-z0-9_./-]*$")
MAX_MEMORY_MIB = 4 * 1024 * 1024  # qemu-server's memory maximum (4 TiB)
MAX_DESCRIPTION = 4096  # PVE keeps 8 KiB; the rest is the factory's marker block
TEMPLATE_FIELDS = ("image", "build_id", "release", "family")  # what publish.template_name fills in
MAX_TEMPLATE_PATTERN = 128
# PVE's API sets no maximum disk size (`size` is a pattern, qemu-server's resize and import); the factory
# bounds every disk it creates at 64 TiB, as Vm.disk_gb, far below qcow2's own limit.
MAX_DISK_MIB = 64 * 1024 * 1024
MAX_CORES = 128
EOL_WARN_DAYS = 30


def _dns_name(v: str) -> str:
    if not DNS_NAME_RE.match(v):
        raise ValueError(f"{v!r} is not a DNS name (letters, digits, '-', labels of at most 63, dot-separated)")
    return v


def _matching(regex: re.Pattern[str], what: str = "", *, message: str = "") -> AfterValidator:
    """``message`` replaces the default "'<value>' is not <what>"."""
    def check(v: str) -> str:
        if not regex.match(v):
            raise ValueError(message or f"{v!r} is not {what}")
        return v

    return AfterValidator(check)


def _remote_path(v: str) -> str:
    if not REMOTE_PATH_RE.match(v) or "/../" in f"{v}/" or "/./" in f"{v}/":
        raise ValueError(f"{v!r} must be an absolute path on the hypervisor of letters, digits, '_', '.', '-', '/' "
                         "without '.' or '..' segments")
    return v.rstrip("/") or "/"


def _parsed(parse: Callable[[str], str], problem: str) -> AfterValidator:
    """``parse`` normalises the value or raises ValueError; the error then names the value and ``problem``."""
    def check(v: str) -> str:
        try:
            return parse(v)
        except ValueError:
            raise ValueError(f"{v!r} {problem}") from None

    return AfterValidator(check)


def _words(v: str) -> list[str]:
    if not v.split():
        raise ValueError("empty")
    return v.split()


# PVE's formats as field types: a value that reaches a property string or a remote path is checked here.
DnsName = Annotated[str, AfterValidator(_dns_name)]
NodeName = Annotated[str, _matching(NODE_RE, "a PVE node name (letters, digits and '-', at most 63)")]
BridgeId = Annotated[str, _matching(BRIDGE_RE, "a PVE bridge id (letters, digits, '_', '.', '-', at most 15)")]
StorageId = Annotated[str, _matching(STORAGE_ID_RE, "a PVE storage id ([a-z][a-z0-9_.-]*[a-z0-9])")]
ImageName = Annotated[str, _matching(IMAGE_NAME_RE, "an image name ([a-z0-9][a-z0-9.-]*, never a path)")]
Hostname = Annotated[str, _matching(
    NAME_RE, message="VM names become hostnames: lowercase letters, digits and '-', max 63")]
TokenId = Annotated[str, _matching(TOKEN_ID_RE, message="must look like 'user@realm!tokenid'")]


def _disk_size(v: str) -> str:
    if not SIZE_RE.match(v):
        raise ValueError("must look like '10G' or '4096M'")
    mib = int(v[:-1]) * (1024 if v.endswith("G") else 1)
    if mib > MAX_DISK_MIB:
        raise ValueError(f"{v} is larger than {MAX_DISK_MIB // 1024**2}T, the largest disk the factory creates")
    return v


DiskSize = Annotated[str, AfterValidator(_disk_size)]
UnixUser = Annotated[str, _matching(UNIX_USER_RE, "a user name ([a-z_][a-z0-9_-]*, at most 32)")]
RemotePath = Annotated[str, AfterValidator(_remote_path)]
Ipv4Address = Annotated[str, _parsed(lambda v: str(ipaddress.IPv4Address(v)),
                                     "is not an IPv4 address without prefix (e.g. 10.0.0.5)")]
Ipv6Address = Annotated[str, _parsed(lambda v: str(ipaddress.IPv6Address(v)),
                                     "is not an IPv6 address without prefix (e.g. 2001:db8::5)")]
IpAddress = Annotated[str, _parsed(lambda v: str(ipaddress.ip_address(v)), "is not an IP address")]
Nameservers = Annotated[str, _parsed(lambda v: " ".join(str(ipaddress.ip_address(x)) for x in _words(v)),
                                     "must be IP addresses separated by spaces")]
SearchDomains = Annotated[str, _parsed(lambda v: " ".join(_dns_name(x) for x in _words(v)),
                                       "must be DNS names separated by spaces")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------- hypervisors


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
            return _dns_name(v)
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


# Proxmox's auto-installer (proxmox-auto-installer/src/answer.rs, 8.4.6 and 9.1.7; docs/host-install.md).
KEYBOARD_LAYOUTS = ("de", "de-ch", "dk", "en-gb", "en-us", "es", "fi", "fr", "fr-be", "fr-ca", "fr-ch", "hu",
                    "is", "it", "jp", "lt", "mk", "nl", "no", "pl", "pt", "pt-br", "se", "si", "tr")
ZFS_RAID_LEVELS = {"raid0": 1, "raid1": 2, "raid10": 4, "raidz-1": 3, "raidz-2": 4, "raidz-3": 5}  # min. disks
# The storages each root filesystem's install creates (Proxmox/Install/StorageConfig.pm).
INSTALL_STORAGES = {"ext4": ("local", "local-lvm"), "xfs": ("local", "local-lvm"), "zfs": ("local", "local-zfs")}
DISK_NAME_RE = re.compile(r"^[a-z][a-z0-9]*$")  # kernel block device names (sda, nvme0n1, vda)
CRYPT_HASH_HINT = "a crypt(3) hash such as '$y$...' or '$6$...' (mkpasswd -m yescrypt)"


def _cidr_address(v: str) -> str:
    try:
        iface = ipaddress.ip_interface(v)
    except ValueError:
        raise ValueError(f"{v!r} is not an address in CIDR form (e.g. 10.0.0.5/24)") from None
    if "/" not in v:
        raise ValueError(f"{v!r} needs a prefix length (e.g. /24)")
    return str(iface)


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
        return None if v is None else _cidr_address(v)

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
    disks: list[Annotated[str, _matching(DISK_NAME_RE, "a block device name such as sda or nvme0n1")]] = Field(
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
    import zoneinfo

    known = zoneinfo.available_timezones()
    if v != "UTC" and known and v not in known:
        raise ValueError(f"{v!r} is not a time zone name (e.g. Europe/Vienna, America/Chicago, UTC)")
    return v


class HostInstall(Strict):
    """How Proxmox's automated installer sets this hypervisor up (invoke host.answer)."""

    macs: list[HardwareMac] = Field(min_length=1, description="the host's NIC MACs: how the answer server knows it")
    fqdn: DnsName | None = Field(default=None, description="default: ssh.host when that is a DNS name")
    keyboard: Literal[KEYBOARD_LAYOUTS] = "en-us"  # type: ignore[valid-type]
    country: Annotated[str, _matching(re.compile(r"^[a-z]{2}$"), "a two-letter country code")]
    timezone: Annotated[str, AfterValidator(_timezone)]
    mailto: Annotated[str, _matching(re.compile(r"^[^@\s]+@[^@\s]+$"), "an email address")]
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
        return [_ssh_public_key(k) for k in v]

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


# ----------------------------------------------------------------------------------------------- VMs


def _ssh_public_key(entry: str) -> str:
    """One OpenSSH public key per entry, parsed for real; returns it normalised to 'type base64 [comment]'."""
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    if "\n" in entry or "\r" in entry or not entry.isprintable():
        raise ValueError("an ssh_keys entry holds a line break or control character (one key per entry)")
    parts = entry.split(None, 2)
    if len(parts) < 2 or not SSH_KEY_RE.match(" ".join(parts[:2])):
        raise ValueError(f"not an SSH public key: {entry[:40]!r}")
    try:
        load_ssh_public_key(" ".join(parts[:2]).encode())
    except (ValueError, TypeError):
        raise ValueError(f"SSH public key does not parse (damaged base64 or wrong type): {entry[:40]!r}") from None
    return " ".join(parts)


def normalize_mac(value: str) -> str:
    """Canonical inventory form: lowercase, colon-separated."""
    return value.strip().lower().replace("-", ":")


def mac_problem(mac: str) -> str | None:
    """Why ``mac`` is not usable as a fixed inventory MAC, or None."""
    if not MAC_RE.match(mac):
        return "is not six colon-separated hex bytes"
    first = int(mac[:2], 16)
    if first & 1:
        return "is a multicast address (bit 0 of the first byte set)"
    if not first & 2:
        return "is not locally administered (second hex digit must be 2, 6, a or e)"
    return None


class Nic(Strict):
    mac: str
    model: Literal["virtio", "e1000", "vmxnet3", "rtl8139"] = "virtio"
    bridge: BridgeId | None = None
    vlan: int | None = Field(default=None, ge=1, le=4094)
    firewall: bool = True
    address: Ipv4Address | None = Field(
        default=None, description="IPv4 address for this NIC's DHCP reservation/DNS entry (mac.export)"
    )
    address6: Ipv6Address | None = Field(
        default=None, description="IPv6 address for this NIC's DHCPv6 reservation/DNS entry (mac.export)"
    )

    @field_validator("mac", mode="before")
    @classmethod
    def _mac(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        v = normalize_mac(v)
        why = mac_problem(v)
        if why:
            raise ValueError(f"MAC {v!r} {why}")
        return v


class StaticIp(Strict):
    ip: str
    gw: IpAddress | None = None

    @field_validator("ip")
    @classmethod
    def _cidr(cls, v: str) -> str:
        return _cidr_address(v)


class StaticIp6(Strict):
    ip: str
    gw: str | None = None

    @field_validator("ip")
    @classmethod
    def _cidr(cls, v: str) -> str:
        if not isinstance(ipaddress.ip_interface(_cidr_address(v)), ipaddress.IPv6Interface):
            raise ValueError(f"{v!r} is not an IPv6 address in CIDR form (e.g. 2001:db8::5/64)")
        # qemu-server's pve-ipv6-config: CIDR with a prefix of 8-128
        if not 8 <= ipaddress.IPv6Interface(v).network.prefixlen <= 128:
            raise ValueError(f"{v!r}: the prefix must be 8-128")
        return str(ipaddress.IPv6Interface(v))

    @field_validator("gw")
    @classmethod
    def _gw(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return str(ipaddress.IPv6Address(v))
        except ValueError:
            raise ValueError(f"{v!r} is not an IPv6 address without prefix (e.g. 2001:db8::1)") from None


# cloud-init vendor data reaches the guest through PVE, which reads a snippet with a 1 MiB limit
# (qemu-server Cloudinit.pm read_cloudinit_snippets_file).
MAX_SNIPPET = 1024 * 1024


@functools.lru_cache(maxsize=64)
def cloud_config_problem(text: str) -> str:
    """Why ``text`` is no valid cloud-config ("" if it is): cloud-init's own ``cloud-init schema`` where it is
    installed, else the shape cloud-init requires (a ``#cloud-config`` first line and a YAML mapping)."""
    if not text.startswith("#cloud-config"):
        return "vendor data must start with a '#cloud-config' line (the only format the factory hands on)"
    try:
        body = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return f"is not YAML: {str(exc).splitlines()[0]}"
    if not isinstance(body, dict):
        return "is not a YAML mapping of cloud-config keys"
    tool = tools.find("cloud-init")
    if tool is None:
        return ""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as tmp:
        tmp.write(text)
        tmp.flush()
        done = subprocess.run([tool, "schema", "--config-file", tmp.name], capture_output=True, text=True,
                              timeout=120, check=False)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().replace(tmp.name, "<file>")
        return f"cloud-init schema refuses it: {detail[-600:]}"
    return ""


@dataclass(frozen=True)
class VendorData:
    """A cloud-init vendor-data file from the site repository, read and checked when the inventory is loaded.

    On the hypervisor it is stored under a name made from its content, so a changed file is a changed
    ``cicustom`` (drift) and a snippet another VM still uses is never overwritten."""

    file: str
    sha256: str
    text: str = field(repr=False)

    @property
    def snippet_name(self) -> str:
        return f"factory-vendor-{self.sha256[:16]}.yaml"

    def volume(self, storage: str) -> str:
        return f"{storage}:snippets/{self.snippet_name}"


VENDOR_FILE_RE = re.compile(r"^[A-Za-z0-9_./-]+$")


def read_vendor_data(v: Any, info: ValidationInfo) -> Any:
    """``vendor_data: <path>`` relative to the directory that holds the inventory (load_site's context)."""
    if v is None or isinstance(v, VendorData):
        return v
    if not isinstance(v, str) or not VENDOR_FILE_RE.match(v) or v.startswith("/") or ".." in v.split("/"):
        raise ValueError(f"{v!r} must be a relative path inside the site repository (letters, digits, '_', '.', "
                         "'-', '/'; no '..')")
    base = Path((info.context or {}).get("site_dir", "."))
    path = base / v
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SNIPPET:
        raise ValueError(f"{path} is {len(data)} bytes; PVE reads at most {MAX_SNIPPET} of a snippet")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    problem = cloud_config_problem(text)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return VendorData(v, hashlib.sha256(data).hexdigest(), text)


class CloudInit(Strict):
    user: UnixUser = "ansible"
    ssh_keys: list[str] = Field(default_factory=list)
    ipconfig: Literal["dhcp"] | StaticIp = "dhcp"
    ip6: Literal["auto", "dhcp"] | StaticIp6 | None = Field(
        default=None, description="NIC 0's IPv6: auto (SLAAC), dhcp (DHCPv6) or a static address; none by default")
    nameserver: Nameservers | None = None
    searchdomain: SearchDomains | None = None
    upgrade: bool = False
    vendor_data: Annotated[Any, BeforeValidator(read_vendor_data)] = Field(
        default=None, description="a #cloud-config file in the site repository, given to the VM as cicustom vendor=")

    @field_validator("ssh_keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        return [_ssh_public_key(key) for key in v]

    @field_validator("ipconfig")
    @classmethod
    def _ipv4(cls, v: Any) -> Any:
        if isinstance(v, StaticIp) and not isinstance(ipaddress.ip_interface(v.ip), ipaddress.IPv4Interface):
            raise ValueError(f"ip {v.ip} is not IPv4: PVE's ip= takes IPv4 only; put an IPv6 address in "
                             "cloudinit.ip6")
        return v

    @property
    def vendor(self) -> VendorData | None:
        return self.vendor_data if isinstance(self.vendor_data, VendorData) else None


def host_address_in(ip: ipaddress.IPv4Address, net: ipaddress.IPv4Network) -> bool:
    """``ip`` is in ``net`` and is neither its network nor its broadcast address."""
    return ip in net and ip not in (net.network_address, net.broadcast_address)


class DhcpRange(Strict):
    first: Ipv4Address
    last: Ipv4Address


class Tenant(Strict):
    """One tenant: its own VLAN on the tenant bridge, subnet, gateway (OPNsense), DHCP range and DNS domain.

    ``id`` (1-15) is baked into its VMs' MACs (byte 2 = 0x20 + id, docs/mac-namespace.md): never renumber it.
    """

    name: Annotated[str, _matching(TENANT_NAME_RE, "a tenant name ([a-z][a-z0-9-]*, at most 32)")]
    id: StrictInt = Field(ge=1, le=15)
    vlan: StrictInt = Field(ge=2, le=4094, description="VLAN id on the tenant bridge (1 is the untagged default)")

    @field_validator("id", "vlan", mode="before")
    @classmethod
    def _plain_integer(cls, v: Any) -> Any:
        # "1" or 1.0 would be tenant 1 here but could read otherwise elsewhere: one reading everywhere
        if isinstance(v, YamlIntForm):
            raise ValueError(f"{v.text} is not a plain integer: YAML 1.1 reads it as {int(v)}, YAML 1.2 and people "
                             "otherwise; write it in decimal without a leading zero")
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{v!r} is not a plain integer: write it unquoted and without a decimal point")
        return v
    subnet: str
    gateway: Ipv4Address
    dhcp_range: DhcpRange
    domain: DnsName
    bridge: BridgeId | None = Field(default=None, description="default: the tenant hypervisor's bridge")

    @field_validator("subnet")
    @classmethod
    def _network(cls, v: str) -> str:
        try:
            return str(ipaddress.IPv4Network(v, strict=True))
        except ValueError as exc:
            raise ValueError(f"{v!r} is not an IPv4 network in CIDR form with no host bits set ({exc})") from None

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    def problems(self) -> list[tuple[str, str]]:
        """(key, message) for every address of the tenant that is outside its subnet or in the wrong place."""
        net, out = self.network, []
        usable = functools.partial(host_address_in, net=net)
        gw = ipaddress.IPv4Address(self.gateway)
        first, last = ipaddress.IPv4Address(self.dhcp_range.first), ipaddress.IPv4Address(self.dhcp_range.last)
        if not usable(gw):
            out.append(("gateway", f"{gw} is not a host address of the tenant's subnet {net}"))
        for key, ip in (("dhcp_range.first", first), ("dhcp_range.last", last)):
            if not usable(ip):
                out.append((key, f"{ip} is not a host address of the tenant's subnet {net}"))
        if first > last:
            out.append(("dhcp_range", f"first {first} is after last {last}"))
        elif first <= gw <= last:
            out.append(("dhcp_range", f"holds the gateway {gw}"))
        return out

    def fixed_address_problem(self, address: str) -> str:
        """Why a VM's fixed ``address`` cannot be used in this tenant ("" if it can)."""
        ip, net = ipaddress.IPv4Address(address), self.network
        if ip not in net:
            return f"{ip} is outside tenant {self.name}'s subnet {net}"
        if ip == net.network_address:
            return f"{ip} is tenant {self.name}'s network address"
        if ip == net.broadcast_address:
            return f"{ip} is tenant {self.name}'s broadcast address"
        if str(ip) == self.gateway:
            return f"{ip} is tenant {self.name}'s gateway (OPNsense): the VM would take the tenant's route"
        if ipaddress.IPv4Address(self.dhcp_range.first) <= ip <= ipaddress.IPv4Address(self.dhcp_range.last):
            return (f"{ip} is inside tenant {self.name}'s dynamic pool {self.dhcp_range.first}-{self.dhcp_range.last}: "
                    "a lease could hand it to another VM; use an address outside dhcp_range")
        return ""


# qemu-server's x86_64 CPU models (PVE/QemuServer/CPUConfig.pm, 9.2.6: the built-in x86-64-vN models, QEMU's models
# and `host`); a VM's cpu must be one of them ("Built-in cputype '...' is not defined").
CPU_TYPES = frozenset({
    "x86-64-v2", "x86-64-v2-AES", "x86-64-v3", "x86-64-v4", "host", "kvm32", "kvm64", "qemu32", "qemu64", "max",
    "486", "pentium", "pentium2", "pentium3", "coreduo", "core2duo", "Conroe", "Penryn", "Nehalem", "Nehalem-IBRS",
    "Westmere", "Westmere-IBRS", "SandyBridge", "SandyBridge-IBRS", "IvyBridge", "IvyBridge-IBRS", "Haswell",
    "Haswell-IBRS", "Haswell-noTSX", "Haswell-noTSX-IBRS", "Broadwell", "Broadwell-IBRS", "Broadwell-noTSX",
    "Broadwell-noTSX-IBRS", "Skylake-Client", "Skylake-Client-IBRS", "Skylake-Client-noTSX-IBRS", "Skylake-Client-v4",
    "Skylake-Server", "Skylake-Server-IBRS", "Skylake-Server-noTSX-IBRS", "Skylake-Server-v4", "Skylake-Server-v5",
    "Cascadelake-Server", "Cascadelake-Server-v2", "Cascadelake-Server-noTSX", "Cascadelake-Server-v4",
    "Cascadelake-Server-v5", "Cooperlake", "Cooperlake-v2", "KnightsMill", "Icelake-Server", "Icelake-Server-noTSX",
    "Icelake-Server-v3", "Icelake-Server-v4", "Icelake-Server-v5", "Icelake-Server-v6", "Icelake-Server-v7",
    "SapphireRapids", "SapphireRapids-v2", "SapphireRapids-v3", "SapphireRapids-v4", "GraniteRapids",
    "GraniteRapids-v2", "GraniteRapids-v3", "SierraForest", "SierraForest-v2", "SierraForest-v3", "ClearwaterForest",
    "athlon", "phenom", "Opteron_G1", "Opteron_G2", "Opteron_G3", "Opteron_G4", "Opteron_G5", "EPYC", "EPYC-IBPB",
    "EPYC-v3", "EPYC-v4", "EPYC-v5", "EPYC-Rome", "EPYC-Rome-v2", "EPYC-Rome-v3", "EPYC-Rome-v4", "EPYC-Rome-v5",
    "EPYC-Milan", "EPYC-Milan-v2", "EPYC-Milan-v3", "EPYC-Genoa", "EPYC-Genoa-v2", "EPYC-Turin",
})


def _cpu_type(v: str) -> str:
    if v not in CPU_TYPES:
        close = sorted(t for t in CPU_TYPES if t.lower().startswith(v.lower()[:3]))[:6]
        hint = f" (close: {', '.join(close)})" if close else " (e.g. host, x86-64-v2-AES, x86-64-v3)"
        raise ValueError(f"{v!r} is not a CPU type qemu-server knows{hint}; names are case-sensitive")
    return v


CpuType = Annotated[str, AfterValidator(_cpu_type)]
DISK_BUSES = {"scsi": 31, "virtio": 16, "sata": 6}  # qemu-server's MAX_*_DISKS
DATA_DISK_SLOT_RE = re.compile(r"^(scsi|virtio|sata)(\d{1,2})$")
# The cloud-init drive of a q35 (UEFI) template: the last SCSI slot, leaving scsi1.. to a VM's data disks.
Q35_CLOUDINIT_SLOT = "scsi30"
# which drive options each bus takes (qemu-server Drive.pm: ssd on scsi/sata/ide, iothread on scsi/virtio)
DISK_BUS_OPTIONS = {"scsi": {"ssd", "iothread"}, "virtio": {"iothread"}, "sata": {"ssd"}}


class DataDisk(Strict):
    """An extra data disk: created by deploy on ``storage`` at ``slot``, grown but never shrunk or removed."""

    slot: str = Field(description="the drive key, e.g. scsi1, virtio1, sata0 (scsi0 is the boot disk)")
    size_gb: int = Field(ge=1, le=MAX_DISK_MIB // 1024)
    storage: StorageId | None = Field(default=None, description="default: the hypervisor's storage.images")
    discard: bool = False
    ssd: bool = False
    iothread: bool = False

    @field_validator("slot")
    @classmethod
    def _slot(cls, v: str) -> str:
        found = DATA_DISK_SLOT_RE.match(v)
        if not found or int(found[2]) >= DISK_BUSES[found[1]] or (found[2] != "0" and found[2].startswith("0")):
            raise ValueError(f"{v!r} is not a drive key (scsi0-30, virtio0-15, sata0-5)")
        if v == "scsi0":
            raise ValueError("scsi0 is the template's boot disk (size it with vm.disk_gb)")
        if v == Q35_CLOUDINIT_SLOT:
            raise ValueError(f"{v} holds the cloud-init drive of a UEFI (q35) template: use scsi1-29")
        return v

    @model_validator(mode="after")
    def _options(self) -> DataDisk:
        bus = self.bus
        bad = [o for o in ("ssd", "iothread") if getattr(self, o) and o not in DISK_BUS_OPTIONS[bus]]
        if bad:
            raise ValueError(f"{', '.join(bad)} is not an option of a {bus} disk (qemu-server: ssd on scsi and sata, "
                             "iothread on scsi and virtio)")
        return self

    @property
    def bus(self) -> str:
        return self.slot.rstrip("0123456789")


class Vm(Strict):
    name: Hostname
    plane: Plane
    vmid: int = Field(ge=100, le=999_999_999)
    hypervisor: str | None = None
    image: ImageName
    role: str
    cores: int = Field(default=2, ge=1, le=MAX_CORES)
    memory: int = Field(default=2048, ge=256, le=MAX_MEMORY_MIB, description="MiB")
    disk_gb: int = Field(default=20, ge=1, le=MAX_DISK_MIB // 1024)
    cpu: CpuType | None = Field(default=None, description="CPU type (qemu-server's cputype); default: the template's")
    disks: list[DataDisk] = Field(default_factory=list, max_length=16, description="extra data disks")
    nics: list[Nic] = Field(min_length=1, max_length=8)
    cloudinit: CloudInit = CloudInit()
    tags: list[str] = Field(default_factory=list)
    tenant: str | None = Field(default=None, description="tenant plane only: the tenant (VLAN, subnet) it belongs to")
    clone: Literal["full", "linked"] | None = None
    template_vmid: int | None = Field(default=None, description="pin a template instead of the newest")
    description: str = ""

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if not TAG_RE.match(v) or reserved_tag(v):
            raise ValueError("must match [a-z0-9_][a-z0-9_-+.]* and not start with 'factory-' (it becomes a PVE tag)")
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if not TAG_RE.match(t)]
        if bad:
            raise ValueError(f"invalid PVE tag(s) {bad}: each must match [a-z0-9_][a-z0-9_-+.]*")
        reserved = [t for t in v if reserved_tag(t)]
        if reserved:
            raise ValueError(f"tag(s) {reserved}: 'factory-' tags are the factory's own")
        return sorted(set(v))

    @field_validator("description")
    @classmethod
    def _description(cls, v: str) -> str:
        if len(v) > MAX_DESCRIPTION:
            raise ValueError(f"is {len(v)} characters long; at most {MAX_DESCRIPTION}")
        if imitates_marker(v):
            raise ValueError("holds a 'managed-by:' or 'factory-...:' line: those are the factory's ownership "
                             "marker and may not appear in inventory text")
        if any(not (ch.isprintable() or ch in "\n\t") for ch in v):
            raise ValueError("holds control characters")
        return v

    @model_validator(mode="after")
    def _nic0_address(self) -> Vm:
        static = self.cloudinit.ipconfig
        first = self.nics[0].address
        if first is not None and isinstance(static, StaticIp) and static.ip.split("/")[0] != first:
            raise ValueError(
                f"nics[0].address {first} disagrees with cloudinit.ipconfig.ip {static.ip} (NIC 0 is the same NIC)"
            )
        static6, first6 = self.cloudinit.ip6, self.nics[0].address6
        if first6 is not None and isinstance(static6, StaticIp6) and static6.ip.split("/")[0] != first6:
            raise ValueError(
                f"nics[0].address6 {first6} disagrees with cloudinit.ip6.ip {static6.ip} (NIC 0 is the same NIC)")
        return self

    @field_validator("disks")
    @classmethod
    def _unique_slots(cls, v: list[DataDisk]) -> list[DataDisk]:
        slots = [d.slot for d in v]
        twice = sorted({s for s in slots if slots.count(s) > 1})
        if twice:
            raise ValueError(f"slot(s) {', '.join(twice)} used by more than one disk")
        return v

    @property
    def clone_mode(self) -> Literal["full", "linked"]:
        return self.clone or ("full" if self.plane == "mgmt" else "linked")

    @property
    def all_tags(self) -> list[str]:
        return sorted({*self.tags, self.plane, self.role, "image-factory"})

    @property
    def macs(self) -> list[str]:
        return [n.mac for n in self.nics]


# -------------------------------------------------------------------------------------------- images


class Repository(Strict):
    """An upstream package repository a build takes packages from: its signed state (epoch) is part of the
    build's identity, so a nightly rebuilds when upstream moved (image_factory.image.upstream).

    A debian repository with its own ``key`` is an extra one (a team's own packages): the build adds it to
    the guest, signed by that key, and installs its ``packages``; ``build_only`` removes it again before
    the seal (a repository deployed VMs cannot or should not reach)."""

    kind: Literal["debian", "fedora-metalink"]
    uri: str | None = Field(default=None, description="debian: the archive root (http://deb.debian.org/debian)")
    suite: str | None = Field(default=None, description="debian: the suite (trixie, trixie-security)")
    components: list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._/-]*$")]] = Field(
        default_factory=lambda: ["main"], min_length=1)
    repo: str | None = Field(default=None, description="fedora-metalink: the repo id (updates-released-f45)")
    key: str | None = Field(default=None, description="debian, extra repository: its OpenPGP public key file")
    fingerprint: str | None = Field(default=None, description="the key's pinned fingerprint (40 hex digits)")
    packages: list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9+.-]+$")]] = Field(default_factory=list)
    build_only: bool = False

    @field_validator("uri")
    @classmethod
    def _http_uri(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"https?://[A-Za-z0-9.\[\]:-]+(/[A-Za-z0-9._~/%+-]*)?", v):
            raise ValueError("must be an http(s) URL without spaces, quotes or query (http://deb.example.org/debian)")
        return v.rstrip("/") if v else v

    @field_validator("suite")
    @classmethod
    def _suite_word(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-z0-9][a-z0-9._/-]*", v):
            raise ValueError("must be a suite name (trixie, trixie-security, stable)")
        return v

    @field_validator("fingerprint")
    @classmethod
    def _fingerprint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        compact = v.replace(" ", "").lower()
        if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", compact):
            raise ValueError("must be the key's full fingerprint (40 or 64 hex digits, spaces allowed)")
        return compact

    @model_validator(mode="after")
    def _complete(self) -> Repository:
        if self.kind == "debian" and not (self.uri and self.suite):
            raise ValueError("a debian repository needs uri and suite")
        if self.kind == "fedora-metalink" and not self.repo:
            raise ValueError("a fedora-metalink repository needs repo (for example updates-released-f45)")
        if (self.key is None) != (self.fingerprint is None):
            raise ValueError("key and fingerprint go together: the key file is refused unless it has the "
                             "pinned fingerprint")
        if self.kind != "debian" and (self.key or self.packages or self.build_only):
            raise ValueError("key, packages and build_only are for extra debian repositories")
        if (self.packages or self.build_only) and not self.key:
            raise ValueError("packages and build_only need the repository's own key (an extra repository)")
        if self.is_extra and self.on_loopback and not self.build_only:
            raise ValueError("a repository on this machine's loopback is reachable during the build only (the "
                             "build VM reaches it through QEMU's gateway): set build_only: true")
        return self

    @property
    def name(self) -> str:
        return f"{self.uri} {self.suite}" if self.kind == "debian" else f"metalink {self.repo}"

    @property
    def is_extra(self) -> bool:
        """Not one of the release's own suites: the build adds it to the guest."""
        return self.key is not None

    @property
    def on_loopback(self) -> bool:
        host = re.sub(r"^https?://", "", self.uri or "").split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def slug(self) -> str:
        """A file name for the guest's sources and keyring (factory-<host>-<suite>)."""
        host = re.sub(r"^https?://", "", self.uri or self.repo or "").split("/", 1)[0]
        return "factory-" + re.sub(r"[^a-z0-9]+", "-", f"{host}-{self.suite or ''}".lower()).strip("-")


class Source(Strict):
    url: str = Field(description="http(s) URL, or a path relative to the repository root")
    checksum: str = Field(description="'sha256:<hex>', 'file:<url-or-path>' or 'none' for local fixtures")

    @field_validator("checksum")
    @classmethod
    def _checksum(cls, v: str) -> str:
        if v in ("none", "refresh") or v.startswith("file:") or re.fullmatch(
                r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}", v):
            return v
        raise ValueError("must be 'sha256:<64 hex>', 'sha512:<128 hex>', 'file:<checksum file>', 'refresh' or 'none'")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", v)
        if scheme and scheme[1].lower() not in ("http", "https"):
            raise ValueError(f"{scheme[1]}:// is not supported: use https://, http:// or a local path")
        if not v.strip() or any(ch.isspace() for ch in v):
            raise ValueError("must be a URL or path without whitespace")
        return v

    @model_validator(mode="after")
    def _none_only_local(self) -> Source:
        if self.checksum == "none" and not self.is_local:
            raise ValueError("checksum 'none' is accepted for local files only; a download needs 'sha256:...' or "
                             "a signed 'file:' checksum")
        if (self.checksum == "refresh") != (not self.is_local and self.url.endswith("/")):
            raise ValueError("checksum 'refresh' (media not pinned yet) goes with the release's media directory "
                             "URL (ending in '/'), and a directory URL needs it")
        return self

    @property
    def pinned(self) -> bool:
        """False until image.refresh has written a file URL and its signed checksum."""
        return self.checksum != "refresh"

    @property
    def is_local(self) -> bool:
        return not re.match(r"^[a-z]+://", self.url, re.IGNORECASE)


class Image(Strict):
    name: ImageName
    family: str = Field(description="a registered image family (image_factory.families)")
    release: int = Field(ge=1)
    mode: Literal["iso", "cloud"]
    source: Source
    # The firmware the build VM and the template boot with: bios (SeaBIOS) or uefi (OVMF, q35). iso mode
    # installs for it (a BIOS boot partition or an EFI system partition); a cloud image must carry a loader
    # for it, as vendors' hybrid GPT images (Debian genericcloud, Fedora Cloud Base) carry both.
    firmware: Literal["bios", "uefi"] = "bios"
    # uefi only: Secure Boot enforced by the template's EFI vars, with the key set the catalogue chooses
    # (Microsoft's 2011 CAs expired in June 2026: choose deliberately); a vTPM 2.0; the QEMU machine.
    secure_boot: bool = False
    keys: Literal["microsoft-2023", "microsoft-2011+2023", "distribution-only", "none"] | None = None
    tpm: bool = False
    machine: Literal["pc", "q35"] | None = Field(default=None, description="default: q35 for uefi, pc for bios")
    eol: date | None = Field(default=None, description="end of life: warn 30 days before, refuse after")
    disk_size: DiskSize = "10G"
    playbook: str = Field(default="ansible/playbooks/template.yml",
                          description="relative to the repository (or site) directory, never outside it")
    test_suites: list[Suite] = Field(default_factory=lambda: list[Suite](["common"]))
    template_name: str = "tpl-{image}-{build_id}"
    memory: int = Field(default=2048, ge=512, le=MAX_MEMORY_MIB, description="MiB for the build VM")
    cpus: int = Field(default=2, ge=1, le=MAX_CORES)
    # The template's CPU type (publish sets it; a clone, deploy's or OpenTofu's, inherits it instead of PVE's
    # kvm64/qemu64); a VM's own vm.cpu overrides it. A publish parameter, not a build input: excluded from the
    # catalogue digest a build's identity hashes, so setting it rebuilds nothing (the next publish carries it).
    cpu: CpuType | None = Field(default=None, exclude=True)
    # qemu-img convert -c: smaller uploads over a WAN, ~15 s more per build on 2 TCG cores.
    compress: bool = True
    # Apply the release's updates during the build (reboot into a newer kernel before sealing).
    updates: bool = True
    # An image that takes updates is rebuilt once its build is this old, even with nothing else changed:
    # the nightly then carries the upstream fixes of the last week at the latest.
    max_age_days: int = Field(default=7, ge=1, le=365)
    # Upstream repositories whose state is part of the build's identity; Fedora's default is its release
    # and updates repositories (see upstream_repositories).
    repositories: list[Repository] | None = None
    # The image carries this factory (a nightly runner's image): the wheel built from this checkout and the
    # hashed lock requirements/build.txt reach the playbook as factory_bundle (docs/images.md).
    factory: bool = False

    @property
    def upstream_repositories(self) -> list[Repository]:
        if self.repositories is not None:
            return list(self.repositories)
        return [Repository.model_validate(r) for r in families.get(self.family).default_repositories(self.release)]

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        if v not in families.FAMILIES:
            raise ValueError(f"unknown image family {v!r} (known: {', '.join(sorted(families.FAMILIES))})")
        return v

    @property
    def machine_type(self) -> str:
        return self.machine or ("q35" if self.firmware == "uefi" else "pc")

    @property
    def platform(self) -> Platform:
        return Platform(self.firmware, self.secure_boot, self.keys, self.tpm, self.machine_type, self.family)

    @model_validator(mode="after")
    def _uefi_options(self) -> Image:
        if self.firmware != "uefi":
            extra = [k for k in ("secure_boot", "tpm") if getattr(self, k)] + (["keys"] if self.keys else [])
            if extra:
                raise ValueError(f"{', '.join(extra)} need{'s' if len(extra) == 1 else ''} firmware: uefi (this entry "
                                 "is firmware: bios)")
        if self.secure_boot and self.keys is None:
            raise ValueError("secure_boot: true needs keys: (microsoft-2023, microsoft-2011+2023, distribution-only "
                             "or none)")
        if self.keys is not None and not self.secure_boot:
            raise ValueError("keys: goes with secure_boot: true")
        if self.firmware == "uefi" and self.machine == "pc":
            # one UEFI machine, so a manifest's machine is never ambiguous (Manifest.machine_type)
            raise ValueError("firmware: uefi boots on machine: q35 (Secure Boot needs q35's SMM; the template's EFI "
                             "disk and its cloud-init drive on SCSI are laid out for q35): drop machine: pc")
        return self

    @model_validator(mode="after")
    def _iso_needs_an_installer(self) -> Image:
        if self.mode == "iso" and self.family in families.FAMILIES and families.get(self.family).installer is None:
            raise ValueError(f"mode: iso needs an installer, and the {self.family} family has none (cloud mode only)")
        return self

    @model_validator(mode="after")
    def _builder_suite_needs_the_factory(self) -> Image:
        if "builder" in self.test_suites and not self.factory:
            raise ValueError("test_suites: the builder suite checks the factory installed in the image: it needs "
                             "factory: true")
        return self

    @model_validator(mode="after")
    def _keys_boot_the_signed_chain(self) -> Image:
        # Measured (docs/images.md): OVMF refuses Debian 13's shim with only Debian's CA in db ("Access Denied");
        # Fedora's is signed by Microsoft only as well. The store itself is made (firmware.KEY_SETS).
        if self.keys == "distribution-only":
            raise ValueError("keys: distribution-only cannot boot the Debian or Fedora chain: the firmware loads shim "
                             "first, and shim is signed by Microsoft's UEFI CA only, not by the distribution's CA "
                             "(choose microsoft-2011+2023 or microsoft-2023; docs/images.md)")
        return self

    @model_validator(mode="after")
    def _eol_known(self) -> Image:
        if self.eol is None and not self.source.is_local:
            raise ValueError("eol: a downloaded release needs its end-of-life date (YYYY-MM-DD)")
        return self

    def eol_status(self, today: date, warn_days: int = EOL_WARN_DAYS) -> tuple[str, str]:
        """("ok" | "warn" | "eol", message) for this image on ``today``."""
        if self.eol is None:
            return "ok", ""
        days = (self.eol - today).days
        if days < 0:
            return "eol", (f"{self.name}: {self.family} {self.release} reached its end of life on {self.eol} "
                           f"({-days} days ago): no more security updates; move to a supported release, or pass "
                           "--allow-eol to build it from the archive anyway")
        if days <= warn_days:
            return "warn", (f"{self.name}: {self.family} {self.release} reaches its end of life on {self.eol} "
                            f"(in {days} days); plan the move to a newer release")
        return "ok", ""

    @field_validator("playbook")
    @classmethod
    def _confined_playbook(cls, v: str) -> str:
        """The playbook runs with the build's credentials: it comes from the repository (or site) directory only."""
        path = PurePosixPath(v)
        if (path.is_absolute() or v.startswith("~") or ".." in path.parts or "\\" in v
                or path.suffix not in (".yml", ".yaml") or not REMOTE_PATH_RE.match(f"/{v}")):
            raise ValueError("must be a playbook (.yml) inside the repository, as a relative path without '..' "
                             "(e.g. ansible/playbooks/template.yml)")
        return v

    @field_validator("template_name")
    @classmethod
    def _tpl(cls, v: str) -> str:
        """Placeholders by name only: a field path (``{image.__class__}``), a format spec (``{image:>300000000}``)
        or a conversion (``{image!r}``) would reach attributes or pad without bound."""
        use = " ".join(f"{{{name}}}" for name in TEMPLATE_FIELDS)
        if len(v) > MAX_TEMPLATE_PATTERN:
            raise ValueError(f"is {len(v)} characters long; at most {MAX_TEMPLATE_PATTERN}")
        try:
            fields = list(string.Formatter().parse(v))
        except ValueError as exc:
            raise ValueError(f"{exc}; use {use} (write a literal brace as {{{{ or }}}})") from None
        for _, name, spec, conversion in fields:
            if name is None:
                continue
            if name not in TEMPLATE_FIELDS:
                raise ValueError(f"unknown placeholder {{{name}}}; use {use}")
            if spec or conversion:
                raise ValueError(f"placeholder {{{name}}} takes no format spec or conversion; use {use}")
        return v


# ---------------------------------------------------------------------------------------------- site


@dataclass(frozen=True)
class Site:
    inventory_path: Path
    images_path: Path
    hypervisors: dict[str, Hypervisor]
    vms: dict[str, Vm]
    images: dict[str, Image]
    vm_sources: dict[str, str] = field(default_factory=dict)
    tenants: dict[str, Tenant] = field(default_factory=dict)
    placement: dict[str, Placement] = field(default_factory=dict)  # plane -> policy; absent: pinned

    def policy(self, plane: str) -> Placement:
        return self.placement.get(plane, "pinned")

    def candidates(self, vm: Vm) -> list[Hypervisor]:
        """The hypervisors the VM may run on, in inventory order: the one it names, or every host of its plane
        whose vm_vmids hold its VMID (load() has proven there is at least one)."""
        return _candidates(vm, self.hypervisors)

    def hypervisor_for(self, vm: Vm) -> Hypervisor:
        """The hypervisor of a VM whose host the inventory fixes (it names one, or its plane has one host for
        its VMID); a VM the plane's policy places has its host in the deploy plan (deploy.decide.place_vms)."""
        hosts = self.candidates(vm)
        if len(hosts) != 1:
            raise ValidationFailed([Problem(self.vm_sources.get(vm.name, str(self.inventory_path)), vm.name,
                                            "vm.hypervisor", f"is placed by the {vm.plane} plane's policy "
                                            f"{self.policy(vm.plane)} over {', '.join(h.name for h in hosts)}: "
                                            "its host is decided when it is deployed (invoke deploy.plan)")])
        return hosts[0]

    def placed_by_policy(self, vm: Vm) -> bool:
        return len(self.candidates(vm)) > 1

    def vms_on(self, hypervisor: str) -> list[Vm]:
        """The VMs that run, or may be placed, on the hypervisor."""
        return [vm for vm in self.vms.values() if any(h.name == hypervisor for h in self.candidates(vm))]

    def select_hypervisors(self, names: list[str] | tuple[str, ...] | None) -> list[Hypervisor]:
        if not names:
            return list(self.hypervisors.values())
        unknown = [n for n in names if n not in self.hypervisors]
        if unknown:
            raise ValidationFailed(
                Problem(str(self.inventory_path), n, "", f"no such hypervisor (have: {', '.join(self.hypervisors)})")
                for n in unknown
            )
        return [self.hypervisors[n] for n in names]

    def image(self, name: str) -> Image:
        if name not in self.images:
            raise ValidationFailed(
                [Problem(str(self.images_path), name, "", f"no such image (have: {', '.join(self.images)})")]
            )
        return self.images[name]

    def summary(self) -> dict[str, Any]:
        per_host: dict[str, dict[str, list[str]]] = {
            h: {"mgmt": [], "tenant": []} for h in self.hypervisors
        }
        for vm in self.vms.values():
            hosts = self.candidates(vm)
            for hv in hosts:
                per_host[hv.name][vm.plane].append(vm.name if len(hosts) == 1 else f"{vm.name}?")
        return {
            "inventory": str(self.inventory_path),
            "images_file": str(self.images_path),
            "hypervisors": {
                h.name: {"role": h.role, "node": h.node, "api": h.api_url, "vms": per_host[h.name]}
                for h in self.hypervisors.values()
            },
            "vms": {p: sorted(v.name for v in self.vms.values() if v.plane == p) for p in PLANES},
            "placement": {p: self.policy(p) for p in PLANES},
            "images": {
                i.name: {"family": i.family, "release": i.release, "mode": i.mode} for i in self.images.values()
            },
        }


def eol_gate(images: Iterable[Image], catalogue: Path | str, *, allow_eol: bool = False,
             today: date | None = None) -> list[str]:
    """Warnings for images within 30 days of their end of life; ValidationFailed for those past it."""
    day = today or date.today()
    warnings: list[str] = []
    refused: list[Problem] = []
    for image in images:
        level, message = image.eol_status(day)
        if level == "warn" or (level == "eol" and allow_eol):
            warnings.append(message + (" (--allow-eol given)" if level == "eol" else ""))
        elif level == "eol":
            refused.append(Problem(str(catalogue), image.name, "eol", message.split(": ", 1)[1]))
    if refused:
        raise ValidationFailed(refused)
    return warnings


# ----------------------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


_DECIMAL = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")


def _construct_int(loader: _UniqueKeyLoader, node: yaml.ScalarNode) -> int:
    value: int = loader.construct_yaml_int(node)
    if _DECIMAL.fullmatch(node.value):
        return value
    written = YamlIntForm(value)
    written.text = node.value
    return written


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
yaml.SafeDumper.add_representer(YamlIntForm, yaml.representer.SafeRepresenter.represent_int)  # dumps as the number


def _yaml_file(path: Path, problems: list[Problem]) -> Any:
    try:
        with path.open(encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        problems.append(Problem(str(path), "", "", "file not found"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        problems.append(Problem(str(path), "", where, f"invalid YAML: {getattr(exc, 'problem', exc)}"))
    return None


def _pydantic_problems(file: str, entry: str, prefix: str, exc: ValidationError) -> Iterator[Problem]:
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        yield Problem(file, entry, loc, msg)


HOST_KEYS = ("pve", "vm")


def _read_inventory(path: Path, problems: list[Problem], groups: dict[str, Any] | None = None,
                    group_files: dict[str, dict[str, str]] | None = None) -> dict[str, HostVars]:
    """The hosts of the factory's groups, read by ansible-core; ``groups`` (if given) receives each group's own
    ``tenants``, ``group_files`` the file each came from."""
    found = inventory_source.read(path, problems, host_keys=HOST_KEYS, group_keys=(TENANTS_KEY, PLACEMENT_KEY),
                                  only_groups=(HYPERVISOR_GROUP, *PLANES))
    if groups is not None:
        groups.update(found.groups)
    if group_files is not None:
        group_files.update(found.group_sources)
    return found.hosts


def _read_images(path: Path, problems: list[Problem]) -> dict[str, Image]:
    data = _yaml_file(path, problems)
    if data is None:
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("images"), dict):
        problems.append(Problem(str(path), "", "images", "the catalogue needs an 'images:' mapping"))
        return {}
    for key in sorted(set(data) - {"images", "defaults"}):
        problems.append(Problem(str(path), "", key, "unknown key (the catalogue takes images, defaults)"))
    defaults = data.get("defaults") or {}
    images: dict[str, Image] = {}
    for name, body in data["images"].items():
        if not isinstance(body, dict):
            problems.append(Problem(str(path), str(name), "", "an image must be a mapping"))
            continue
        try:
            images[name] = Image(name=name, **{**defaults, **body})
        except ValidationError as exc:
            problems.extend(_pydantic_problems(str(path), str(name), "", exc))
        except TypeError as exc:
            problems.append(Problem(str(path), str(name), "", str(exc)))
    return images


def site_dir(inventory: Path) -> Path:
    """Where files the inventory names (cloud-init vendor data) are found: the directory holding the inventory
    (``ansible/`` for ``-i ansible/inventory``; a file inventory's own directory)."""
    return inventory.parent


def load_site(inventory: str | Path, images: str | Path) -> Site:
    """Load and validate the whole site model; raise ValidationFailed listing every problem."""
    inventory_path, images_path = Path(inventory), Path(images)
    problems: list[Problem] = []
    groups: dict[str, Any] = {}
    group_files: dict[str, dict[str, str]] = {}
    records = _read_inventory(inventory_path, problems, groups, group_files)
    catalogue = _read_images(images_path, problems)
    tenants = read_tenants(groups, tenants_file(group_files, inventory_path), problems)
    placement = read_placement(groups, group_files, inventory_path, problems)

    hypervisors: dict[str, Hypervisor] = {}
    vms: dict[str, Vm] = {}
    sources: dict[str, str] = {}
    for rec in records.values():
        planes = sorted(rec.groups & set(PLANES))
        is_hv = HYPERVISOR_GROUP in rec.groups
        if is_hv and planes:
            problems.append(Problem(rec.file, rec.name, "", "a host cannot be both a hypervisor and a VM"))
            continue
        if is_hv:
            body = rec.vars.get("pve")
            if not isinstance(body, dict):
                problems.append(Problem(rec.source("pve"), rec.name, "pve", "hypervisors need a 'pve' mapping"))
                continue
            try:
                hypervisors[rec.name] = Hypervisor(name=rec.name, **body)
            except ValidationError as exc:
                problems.extend(_pydantic_problems(rec.source("pve"), rec.name, "pve", exc))
        elif planes:
            if len(planes) > 1:
                problems.append(Problem(rec.file, rec.name, "", "a VM belongs to exactly one plane, not both"))
                continue
            body = rec.vars.get("vm")
            if not isinstance(body, dict):
                problems.append(Problem(rec.source("vm"), rec.name, "vm", "VMs need a 'vm' mapping"))
                continue
            try:
                plane: Plane = "mgmt" if planes[0] == "mgmt" else "tenant"
                vm = Vm.model_validate({"name": rec.name, "plane": plane, **body},
                                       context={"site_dir": site_dir(inventory_path)})
                vms[rec.name], found = _on_tenant_network(vm, tenants, rec.source("vm"), _named_tenants(groups))
                problems.extend(found)
                sources[rec.name] = rec.source("vm")
            except ValidationError as exc:
                problems.extend(_pydantic_problems(rec.source("vm"), rec.name, "vm", exc))

    if not problems and not hypervisors:
        problems.append(Problem(str(inventory_path), "", HYPERVISOR_GROUP,
                                "no hypervisor: the inventory needs hosts in group 'hypervisors' with a 'pve' mapping"))
    if not problems and not vms:
        problems.append(Problem(str(inventory_path), "", "mgmt/tenant",
                                "no VM: the inventory needs hosts in group 'mgmt' or 'tenant' with a 'vm' mapping"))
    if not problems and not catalogue:
        problems.append(Problem(str(images_path), "", "images", "the catalogue has no image"))
    problems.extend(_cross_checks(hypervisors, vms, catalogue, sources, str(inventory_path), str(images_path),
                                  placement))
    problems.extend(_site_address_checks(hypervisors, vms, tenants, sources, str(inventory_path)))
    if problems:
        raise ValidationFailed(problems)
    return Site(inventory_path, images_path, hypervisors, vms, catalogue, sources, tenants, placement)


def read_placement(groups: dict[str, Any], group_files: dict[str, dict[str, str]], inventory: Path,
                   problems: list[Problem]) -> dict[str, Placement]:
    """Each plane's ``placement`` (a variable of group mgmt or tenant): pinned, spread or fill."""
    policies: dict[str, Placement] = {}
    for plane in PLANES:
        raw = (groups.get(plane) or {}).get(PLACEMENT_KEY)
        if raw is None:
            continue
        if raw not in PLACEMENTS:
            problems.append(Problem(group_files.get(plane, {}).get(PLACEMENT_KEY, str(inventory)), f"group {plane}",
                                    f"vars.{PLACEMENT_KEY}", f"{raw!r} is not one of {', '.join(PLACEMENTS)}"))
            continue
        policies[plane] = raw
    return policies


def _candidates(vm: Vm, hypervisors: dict[str, Hypervisor]) -> list[Hypervisor]:
    if vm.hypervisor is not None:
        return [hypervisors[vm.hypervisor]] if vm.hypervisor in hypervisors else []
    return [h for h in hypervisors.values() if h.role == vm.plane and vm.vmid in h.vm_vmids]


TENANTS_KEY = "tenants"


def tenants_file(group_files: dict[str, dict[str, str]], inventory: Path | str) -> str:
    """The file the tenant group's ``tenants`` came from (group_vars/tenant.yml, or an inventory file)."""
    return group_files.get("tenant", {}).get(TENANTS_KEY, str(inventory))


def read_tenants(groups: dict[str, Any], inv_file: str, problems: list[Problem]) -> dict[str, Tenant]:
    """``tenants`` from the vars of group ``tenant``: name -> VLAN, subnet, gateway, DHCP range, DNS domain."""
    raw = (groups.get("tenant") or {}).get(TENANTS_KEY)
    if raw is None:
        return {}
    where = "group tenant"
    if not isinstance(raw, dict):
        problems.append(Problem(inv_file, where, f"vars.{TENANTS_KEY}",
                                "must map each tenant name to its id, vlan, subnet, gateway, dhcp_range and domain"))
        return {}
    tenants: dict[str, Tenant] = {}
    for name, body in raw.items():
        entry = f"tenant {name}"
        if not isinstance(body, dict):
            problems.append(Problem(inv_file, entry, "", "a tenant must be a mapping"))
            continue
        try:
            tenant = Tenant(name=str(name), **body)
        except ValidationError as exc:
            problems.extend(_pydantic_problems(inv_file, entry, "", exc))
            continue
        problems.extend(Problem(inv_file, entry, key, message) for key, message in tenant.problems())
        tenants[tenant.name] = tenant
    seen = list(tenants.values())
    for i, a in enumerate(seen):
        for b in seen[i + 1:]:
            pair = f"tenants {a.name}, {b.name}"
            if a.id == b.id:
                problems.append(Problem(inv_file, pair, "id", f"both have id {a.id} (it is baked into their MACs)"))
            if a.vlan == b.vlan:
                problems.append(Problem(inv_file, pair, "vlan", f"both use VLAN {a.vlan}"))
            if a.network.overlaps(b.network):
                problems.append(Problem(inv_file, pair, "subnet", f"{a.subnet} and {b.subnet} overlap"))
            if a.domain.lower() == b.domain.lower():
                problems.append(Problem(inv_file, pair, "domain",
                                        f"both use domain {a.domain}: one tenant's names would answer for the other"))
    return tenants


def _named_tenants(groups: dict[str, Any]) -> set[str]:
    """Every tenant name the inventory defines, valid or not."""
    raw = (groups.get("tenant") or {}).get(TENANTS_KEY)
    return {str(name) for name in raw} if isinstance(raw, dict) else set()


def _on_tenant_network(vm: Vm, tenants: dict[str, Tenant], file: str,
                       named: set[str] | None = None) -> tuple[Vm, list[Problem]]:
    """The VM with its NICs on its tenant's VLAN and bridge, or the reasons it cannot be there."""
    if vm.tenant is None:
        return vm, []
    if vm.plane != "tenant":
        return vm, [Problem(file, vm.name, "vm.tenant", "only tenant-plane VMs belong to a tenant")]
    tenant = tenants.get(vm.tenant)
    if tenant is None and vm.tenant in (named or set()):
        return vm, []  # the tenant is defined but invalid: its own problems say why
    if tenant is None:
        have = ", ".join(sorted(tenants)) or f"none: define them under the tenant group's vars.{TENANTS_KEY}"
        return vm, [Problem(file, vm.name, "vm.tenant", f"no tenant {vm.tenant!r} (have: {have})")]
    problems: list[Problem] = []
    nics = []
    for i, nic in enumerate(vm.nics):
        if nic.vlan is not None and nic.vlan != tenant.vlan:
            problems.append(Problem(file, vm.name, f"vm.nics.{i}.vlan",
                                    f"{nic.vlan} is not tenant {tenant.name}'s VLAN {tenant.vlan}: a tenant VM's NICs "
                                    "are on its tenant's VLAN (leave vlan out)"))
        if nic.address and (why := tenant.fixed_address_problem(nic.address)):
            problems.append(Problem(file, vm.name, f"vm.nics.{i}.address", why))
        nics.append(nic.model_copy(update={"vlan": tenant.vlan, "bridge": nic.bridge or tenant.bridge}))
    ip = vm.cloudinit.ipconfig
    if isinstance(ip, StaticIp):
        iface = ipaddress.ip_interface(ip.ip)
        if iface.network != tenant.network:
            problems.append(Problem(file, vm.name, "vm.cloudinit.ipconfig.ip",
                                    f"{ip.ip} is not in tenant {tenant.name}'s subnet {tenant.subnet}"))
        elif vm.nics[0].address is None and (why := tenant.fixed_address_problem(str(iface.ip))):
            problems.append(Problem(file, vm.name, "vm.cloudinit.ipconfig.ip", why))
        if ip.gw and ip.gw != tenant.gateway:
            problems.append(Problem(file, vm.name, "vm.cloudinit.ipconfig.gw",
                                    f"{ip.gw} is not tenant {tenant.name}'s gateway {tenant.gateway}"))
    return vm.model_copy(update={"nics": nics}), problems


def _cross_checks(
    hypervisors: dict[str, Hypervisor], vms: dict[str, Vm], images: dict[str, Image],
    sources: dict[str, str], inv_file: str, img_file: str, placement: dict[str, Placement] | None = None,
) -> Iterator[Problem]:
    host_macs: dict[str, list[str]] = defaultdict(list)
    for host in hypervisors.values():
        for mac in host.install.macs if host.install else ():
            host_macs[mac].append(host.name)
    for mac, names in host_macs.items():
        if len(names) > 1:
            yield Problem(inv_file, ", ".join(names), "pve.install.macs",
                          f"MAC {mac} is listed for more than one hypervisor (the answer server matches by MAC)")
    yield from _cluster_checks(hypervisors, inv_file)
    by_vmid: dict[int, list[str]] = defaultdict(list)
    by_mac: dict[str, list[str]] = defaultdict(list)
    for vm in vms.values():
        file = sources[vm.name]
        by_vmid[vm.vmid].append(vm.name)
        for i, nic in enumerate(vm.nics):
            by_mac[nic.mac].append(f"{vm.name} nic {i}")
        if vm.image not in images:
            yield Problem(file, vm.name, "vm.image", f"image {vm.image!r} is not in the catalogue {img_file}")
        if vm.hypervisor is not None:
            hv = hypervisors.get(vm.hypervisor)
            if hv is None:
                yield Problem(file, vm.name, "vm.hypervisor", f"no hypervisor named {vm.hypervisor!r}")
                continue
            if hv.role != vm.plane:
                yield Problem(
                    file, vm.name, "vm.hypervisor",
                    f"{vm.plane} VMs may only run on the {vm.plane} hypervisors; {hv.name} has role {hv.role}",
                )
            elif vm.vmid not in hv.vm_vmids:
                yield Problem(
                    file, vm.name, "vm.vmid",
                    f"{vm.vmid} is outside {hv.name}'s vm_vmids {hv.vm_vmids.first}-{hv.vm_vmids.last}",
                )
        else:
            plane_hosts = [h for h in hypervisors.values() if h.role == vm.plane]
            fitting = _candidates(vm, hypervisors)
            policy = (placement or {}).get(vm.plane, "pinned")
            if not plane_hosts:
                yield Problem(file, vm.name, "vm.hypervisor", f"no hypervisor has role {vm.plane}")
                continue
            if not fitting:
                ranges = ", ".join(f"{h.name} {h.vm_vmids.first}-{h.vm_vmids.last}" for h in plane_hosts)
                yield Problem(file, vm.name, "vm.vmid", f"{vm.vmid} is outside the vm_vmids of every {vm.plane} "
                                                         f"hypervisor ({ranges})")
            elif len(fitting) > 1 and policy == "pinned":
                yield Problem(file, vm.name, "vm.hypervisor",
                              f"the {vm.plane} plane has {len(fitting)} hypervisors for VMID {vm.vmid} "
                              f"({', '.join(h.name for h in fitting)}) and placement pinned: name the VM's "
                              f"hypervisor, or set placement: spread or fill for group {vm.plane}")
        lacking = [h.name for h in _candidates(vm, hypervisors) if h.storage.snippets is None]
        if vm.cloudinit.vendor is not None and lacking:
            yield Problem(file, vm.name, "vm.cloudinit.vendor_data",
                          f"{', '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no snippets storage: set "
                          "pve.storage.snippets (a file storage with 'snippets' content, e.g. local) and "
                          "pve.storage.snippets_dir")
        if vm.plane == "mgmt" and vm.clone == "linked":
            yield Problem(file, vm.name, "vm.clone", "mgmt VMs must be full clones (no template dependency)")
    for vmid, names in by_vmid.items():
        if len(names) > 1:
            yield Problem(inv_file, ", ".join(sorted(names)), "vm.vmid", f"VM id {vmid} is used more than once")
    for mac, users in by_mac.items():
        if len(users) > 1:
            yield Problem(inv_file, ", ".join(sorted(users)), "vm.nics.mac", f"MAC {mac} is used more than once")


def _cluster_checks(hypervisors: dict[str, Hypervisor], inv_file: str) -> Iterator[Problem]:
    """Entries that share an API endpoint are nodes of one cluster, where a VMID names one guest cluster-wide:
    each node's templates need VMIDs of their own (template_vmids disjoint), and each entry its own node."""
    entries = list(hypervisors.values())
    for i, a in enumerate(entries):
        for b in entries[i + 1:]:
            if not {a.api_url, *a.api_urls} & {b.api_url, *b.api_urls}:
                continue
            pair = f"{a.name}, {b.name}"
            if a.node == b.node:
                yield Problem(inv_file, pair, "pve.node", f"both are node {a.node} of the cluster they share an API "
                                                          "endpoint with: a node is one entry")
            elif a.template_vmids.overlaps(b.template_vmids):
                yield Problem(inv_file, pair, "pve.template_vmids",
                              f"{a.template_vmids.first}-{a.template_vmids.last} and {b.template_vmids.first}-"
                              f"{b.template_vmids.last} overlap: nodes of one cluster (they share an API endpoint) "
                              "share its VMIDs, so each node's templates need a range of their own")


# A tenant VM's MAC carries its tenant's id in byte 2 (02:de:2<id>:..., docs/mac-namespace.md); the rest of
# the namespace is mac.check's, but a MAC claiming another tenant is refused here, where every task loads.
_TENANT_MAC_RE = re.compile(r"^02:de:2([1-9a-f]):")


def mac_tenant_id(mac: str) -> int:
    """The tenant id a namespace MAC claims (byte 2 = 0x20 + id), 0 for none."""
    found = _TENANT_MAC_RE.match(mac)
    return int(found[1], 16) if found else 0


def _literal_ip(host: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(host.strip("[]"))
    except ValueError:
        return None


def _fixed_addresses(vm: Vm) -> Iterator[tuple[str, str]]:
    """(key, address) of every fixed address of the VM: each NIC's, and NIC 0's static cloud-init address."""
    for i, nic in enumerate(vm.nics):
        if nic.address:
            yield f"vm.nics.{i}.address", nic.address
    static = vm.cloudinit.ipconfig
    if isinstance(static, StaticIp) and vm.nics[0].address is None:
        yield "vm.cloudinit.ipconfig.ip", str(ipaddress.ip_interface(static.ip).ip)


def _hypervisor_host(hv: Hypervisor) -> Iterator[tuple[str, str]]:
    """(key, host) of the names or addresses the factory reaches the hypervisor at."""
    yield "pve.api_url", re.sub(r"^https://", "", hv.api_url).rsplit(":", 1)[0].strip("[]")
    yield "pve.ssh.host", hv.ssh.host


def _mgmt_plane(hypervisors: dict[str, Hypervisor], vms: dict[str, Vm]) -> tuple[
        list[tuple[ipaddress.IPv4Network, str]], dict[str, str]]:
    """The mgmt plane as the inventory knows it: its networks (mgmt VMs' static networks and fixed addresses, the
    hypervisors' addresses) and its DNS domains (mgmt VMs' search domains, the hypervisors' parent domains), each
    with where it comes from."""
    networks: list[tuple[ipaddress.IPv4Network, str]] = []
    domains: dict[str, str] = {}
    for vm in vms.values():
        if vm.plane != "mgmt":
            continue
        static = vm.cloudinit.ipconfig
        if isinstance(static, StaticIp) and isinstance(net := ipaddress.ip_interface(static.ip).network,
                                                       ipaddress.IPv4Network):
            networks.append((net, f"{vm.name}'s cloudinit.ipconfig.ip {static.ip}"))
        networks.extend((ipaddress.IPv4Network(address), f"{vm.name}'s {key}") for key, address in _fixed_addresses(vm))
        for domain in (vm.cloudinit.searchdomain or "").split():
            domains.setdefault(domain.lower(), f"{vm.name}'s cloudinit.searchdomain")
    for hv in hypervisors.values():
        for key, host in _hypervisor_host(hv):
            ip = _literal_ip(host)
            if ip is not None:
                networks.append((ipaddress.IPv4Network(ip), f"hypervisor {hv.name}'s {key}"))
            elif "." in host:
                domains.setdefault(host.split(".", 1)[1].lower(), f"hypervisor {hv.name}'s {key} {host}")
    return networks, domains


def _site_address_checks(hypervisors: dict[str, Hypervisor], vms: dict[str, Vm], tenants: dict[str, Tenant],
                         sources: dict[str, str], inv_file: str) -> Iterator[Problem]:
    """What only the whole site shows: an address held twice, a MAC claiming another tenant, a tenant on the mgmt
    plane's network or in its DNS domain."""
    holders: dict[str, list[tuple[str, str, str]]] = defaultdict(list)  # address -> (file, entry, key)
    for vm in vms.values():
        for key, address in _fixed_addresses(vm):
            holders[address].append((sources[vm.name], vm.name, key))
    for hv in hypervisors.values():
        seen: set[str] = set()  # its API and SSH may share one address
        for key, host in _hypervisor_host(hv):
            if (ip := _literal_ip(host)) is not None and str(ip) not in seen:
                seen.add(str(ip))
                holders[str(ip)].append((inv_file, hv.name, key))
    vm_names = set(vms)
    for address, owners in sorted(holders.items()):
        # hypervisors may share an address (one host, or a forwarder, on other ports); a VM may not share one
        if len(owners) > 1 and any(entry in vm_names for _, entry, _ in owners):
            for owner in owners:
                others = ", ".join(f"{entry} {key}" for _, entry, key in owners if (_, entry, key) != owner)
                yield Problem(owner[0], owner[1], owner[2], f"address {address} is also held by {others}")
    by_id = {t.id: t for t in tenants.values()}
    for vm in vms.values():
        own = tenants[vm.tenant].id if vm.tenant in tenants else 0
        if vm.tenant and not own:
            continue  # an unknown tenant is reported where the VM is read
        for i, nic in enumerate(vm.nics):
            claimed = mac_tenant_id(nic.mac)
            if claimed and claimed != own:
                whose = f"tenant {by_id[claimed].name}'s" if claimed in by_id else "a tenant id no tenant has"
                mine = f"tenant {vm.tenant} (id {own})" if own else f"no tenant ({vm.plane} plane)"
                yield Problem(sources[vm.name], vm.name, f"vm.nics.{i}.mac",
                              f"MAC {nic.mac}: byte 2 2{claimed:x} is {whose} (id {claimed}), but the VM belongs to "
                              f"{mine}; run: invoke mac.generate --vm {vm.name}")
    networks, domains = _mgmt_plane(hypervisors, vms)
    for t in tenants.values():
        entry = f"tenant {t.name}"
        for net, where in networks:
            if t.network.overlaps(net):
                yield Problem(inv_file, entry, "subnet", f"{t.subnet} overlaps the mgmt network ({where})")
        if t.domain.lower() in domains:
            yield Problem(inv_file, entry, "domain",
                          f"{t.domain} is the mgmt plane's domain ({domains[t.domain.lower()]}): tenant names would "
                          "answer in it")
