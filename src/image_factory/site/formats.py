"""The site model's vocabulary and value formats: planes and placement, PVE's own formats as field types,
MACs and SSH public keys; every value that reaches a property string, a remote path or a hostname is
checked here, so nothing can smuggle in a ",key=value" or a shell word."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Annotated, Literal

from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from pydantic import AfterValidator, BaseModel, ConfigDict

PLANES = ("mgmt", "tenant")
# How a plane places a VM that names no hypervisor (docs/inventory.md, "Several hypervisors per plane"); the
# variable ``placement`` of group mgmt or tenant (group_vars/tenant.yml), default pinned.
PLACEMENT_KEY = "placement"
PLACEMENTS = ("pinned", "spread", "fill")
Placement = Literal["pinned", "spread", "fill"]
HYPERVISOR_GROUP = "hypervisors"
Plane = Literal["mgmt", "tenant"]

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
# PVE's API sets no maximum disk size (`size` is a pattern, qemu-server's resize and import); the factory
# bounds every disk it creates at 64 TiB, as Vm.disk_gb, far below qcow2's own limit.
MAX_DISK_MIB = 64 * 1024 * 1024
MAX_CORES = 128


def dns_name(v: str) -> str:
    if not DNS_NAME_RE.match(v):
        raise ValueError(f"{v!r} is not a DNS name (letters, digits, '-', labels of at most 63, dot-separated)")
    return v


def matching(regex: re.Pattern[str], what: str = "", *, message: str = "") -> AfterValidator:
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
DnsName = Annotated[str, AfterValidator(dns_name)]
NodeName = Annotated[str, matching(NODE_RE, "a PVE node name (letters, digits and '-', at most 63)")]
BridgeId = Annotated[str, matching(BRIDGE_RE, "a PVE bridge id (letters, digits, '_', '.', '-', at most 15)")]
StorageId = Annotated[str, matching(STORAGE_ID_RE, "a PVE storage id ([a-z][a-z0-9_.-]*[a-z0-9])")]
ImageName = Annotated[str, matching(IMAGE_NAME_RE, "an image name ([a-z0-9][a-z0-9.-]*, never a path)")]
Hostname = Annotated[str, matching(
    NAME_RE, message="VM names become hostnames: lowercase letters, digits and '-', max 63")]
TokenId = Annotated[str, matching(TOKEN_ID_RE, message="must look like 'user@realm!tokenid'")]


def _disk_size(v: str) -> str:
    if not SIZE_RE.match(v):
        raise ValueError("must look like '10G' or '4096M'")
    mib = int(v[:-1]) * (1024 if v.endswith("G") else 1)
    if mib > MAX_DISK_MIB:
        raise ValueError(f"{v} is larger than {MAX_DISK_MIB // 1024**2}T, the largest disk the factory creates")
    return v


DiskSize = Annotated[str, AfterValidator(_disk_size)]
UnixUser = Annotated[str, matching(UNIX_USER_RE, "a user name ([a-z_][a-z0-9_-]*, at most 32)")]
RemotePath = Annotated[str, AfterValidator(_remote_path)]
Ipv4Address = Annotated[str, _parsed(lambda v: str(ipaddress.IPv4Address(v)),
                                     "is not an IPv4 address without prefix (e.g. 10.0.0.5)")]
Ipv6Address = Annotated[str, _parsed(lambda v: str(ipaddress.IPv6Address(v)),
                                     "is not an IPv6 address without prefix (e.g. 2001:db8::5)")]
IpAddress = Annotated[str, _parsed(lambda v: str(ipaddress.ip_address(v)), "is not an IP address")]
Nameservers = Annotated[str, _parsed(lambda v: " ".join(str(ipaddress.ip_address(x)) for x in _words(v)),
                                     "must be IP addresses separated by spaces")]
SearchDomains = Annotated[str, _parsed(lambda v: " ".join(dns_name(x) for x in _words(v)),
                                       "must be DNS names separated by spaces")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def cidr_address(v: str) -> str:
    try:
        iface = ipaddress.ip_interface(v)
    except ValueError:
        raise ValueError(f"{v!r} is not an address in CIDR form (e.g. 10.0.0.5/24)") from None
    if "/" not in v:
        raise ValueError(f"{v!r} needs a prefix length (e.g. /24)")
    return str(iface)


def ssh_public_key(entry: str) -> str:
    """One OpenSSH public key per entry, parsed for real; returns it normalised to 'type base64 [comment]'."""
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
