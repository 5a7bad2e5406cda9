"""A VM of the site: its NICs with fixed MACs, cloud-init (addresses, keys, vendor data), CPU and data disks."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from image_factory.ownership import imitates_marker, reserved_tag
from image_factory.site.formats import (
    MAX_CORES,
    MAX_DISK_MIB,
    MAX_MEMORY_MIB,
    TAG_RE,
    BridgeId,
    CpuType,
    Hostname,
    ImageName,
    IpAddress,
    Ipv4Address,
    Ipv6Address,
    Nameservers,
    Plane,
    SearchDomains,
    StorageId,
    Strict,
    UnixUser,
    cidr_address,
    mac_problem,
    normalize_mac,
    ssh_public_key,
)
from image_factory.site.vendordata import VendorData, read_vendor_data

MAX_DESCRIPTION = 4096  # PVE keeps 8 KiB; the rest is the factory's marker block


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
        return cidr_address(v)


class StaticIp6(Strict):
    ip: str
    gw: str | None = None

    @field_validator("ip")
    @classmethod
    def _cidr(cls, v: str) -> str:
        if not isinstance(ipaddress.ip_interface(cidr_address(v)), ipaddress.IPv6Interface):
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
        return [ssh_public_key(key) for key in v]

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
