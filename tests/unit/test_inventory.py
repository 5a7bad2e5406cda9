"""The site model's front door (site/inventory.py): every name it had as one module, from the rooms it re-exports."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import image_factory.site
from image_factory.site import inventory

pytestmark = pytest.mark.unit

# The public names of site/inventory.py before it was split into rooms (issue #33); callers import them from here.
BEFORE_THE_SPLIT = {
    "BRIDGE_RE", "BridgeId", "CPU_TYPES", "CRYPT_HASH_HINT", "CloudInit", "CpuType", "DATA_DISK_SLOT_RE",
    "DISK_BUSES", "DISK_BUS_OPTIONS", "DISK_NAME_RE", "DNS_NAME_RE", "DataDisk", "DhcpRange", "DiskSize", "DnsName",
    "EOL_WARN_DAYS", "FINGERPRINT_RE", "HOST_KEYS", "HYPERVISOR_GROUP", "HardwareMac", "HostInstall", "Hostname",
    "Hypervisor", "IMAGE_NAME_RE", "INSTALL_STORAGES", "Image", "ImageName", "InstallDisks", "InstallNetwork",
    "IpAddress", "Ipv4Address", "Ipv6Address", "KEYBOARD_LAYOUTS", "MAC_RE", "MAX_CORES", "MAX_DESCRIPTION",
    "MAX_DISK_MIB", "MAX_MEMORY_MIB", "MAX_SNIPPET", "MAX_TEMPLATE_PATTERN", "NAME_RE", "NODE_RE", "Nameservers",
    "Nic", "NodeName", "PLACEMENTS", "PLACEMENT_KEY", "PLANES", "Placement", "Plane", "Q35_CLOUDINIT_SLOT",
    "REMOTE_PATH_RE", "RemotePath", "Repository", "SIZE_RE", "SSH_KEY_RE", "STORAGE_ID_RE", "SearchDomains", "Site",
    "Source", "SshEndpoint", "StaticIp", "StaticIp6", "StorageId", "Storages", "Strict", "Suite", "TAG_RE",
    "TEMPLATE_FIELDS", "TENANTS_KEY", "TENANT_NAME_RE", "TOKEN_ID_RE", "Tenant", "TokenId", "UNIX_USER_RE",
    "UnixUser", "VENDOR_FILE_RE", "VendorData", "Vm", "VmidRange", "ZFS_RAID_LEVELS", "cloud_config_problem",
    "eol_gate", "host_address_in", "load_site", "mac_problem", "mac_tenant_id", "normalize_mac", "read_placement",
    "read_tenants", "read_vendor_data", "site_dir", "tenants_file",
}
# Private names other modules imported from it (hostinstall.gather, site.mac).
PRIVATE_IMPORTS = {"_read_inventory", "_ssh_public_key"}


def test_every_name_of_the_single_module_is_still_importable_from_the_front_door() -> None:
    assert set(inventory.__all__) == BEFORE_THE_SPLIT | PRIVATE_IMPORTS
    missing = [name for name in inventory.__all__ if not hasattr(inventory, name)]
    assert missing == []


def test_the_front_door_defines_nothing_and_each_name_comes_from_its_room() -> None:
    """A name the front door exports is the object its room defines (one model, not a copy)."""
    rooms = {info.name: importlib.import_module(f"image_factory.site.{info.name}")
             for info in pkgutil.iter_modules(image_factory.site.__path__) if info.name != "inventory"}
    for name in BEFORE_THE_SPLIT:
        homes = [room for room, module in rooms.items() if name in vars(module) and vars(module)[name] is
                 getattr(inventory, name)]
        assert homes, f"{name} is not one of a room's own names"
    assert inventory.Vm.__module__ == "image_factory.site.vms"
    assert inventory.load_site.__module__ == "image_factory.site.load"
