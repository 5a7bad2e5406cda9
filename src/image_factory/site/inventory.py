"""The site model's front door: hypervisors and VMs from an Ansible YAML inventory, images from a catalogue.

The inventory is a plain Ansible inventory (``ansible-inventory -i ansible/inventory --list``
reads it): hypervisors live in the group ``hypervisors`` with a ``pve`` mapping, VMs live in the
groups ``mgmt`` and ``tenant`` with a ``vm`` mapping. Everything is validated with pydantic
before any action; all problems are reported together, each naming file, entry and key.

This module holds no code of its own: it re-exports the site model's rooms, so callers import from one place.

- ``formats``: planes, placement and PVE's value formats as field types (names, ids, addresses, CPU types,
  MACs, SSH public keys);
- ``hypervisors``: a hypervisor's API, token, TLS, SSH, storages, VMID ranges and host install;
- ``vms`` and ``vendordata``: a VM's NICs, cloud-init, data disks; its cloud-init vendor-data file;
- ``tenants``: tenants' VLANs, subnets, DHCP ranges, domains, and a tenant VM put on its tenant's network;
- ``images``: the image catalogue and the end-of-life gate;
- ``model``: ``Site``, the validated whole, and where a VM may run;
- ``reading``: YAML files and pydantic errors as Problems;
- ``crosschecks``: what only the whole site shows (duplicates, placement, clusters, tenant MACs, mgmt overlap);
- ``load``: ``load_site``, reading and validating everything above.

Layers inside ``site/`` run one way (pyproject's import-linter contract): load > crosschecks > model >
(tenants | images) > (vms | hypervisors) > (vendordata | reading) > formats > (inventory_source | secrets).
"""

from __future__ import annotations

# isort: skip_file
# (several names to a line, room by room: this list is the site model's table of contents; one name to a line
# would also repeat the rooms' own import lists line for line)

from image_factory.site.crosschecks import mac_tenant_id
from image_factory.site.formats import (
    BRIDGE_RE, CPU_TYPES, DNS_NAME_RE, FINGERPRINT_RE, HYPERVISOR_GROUP, IMAGE_NAME_RE, MAC_RE, MAX_CORES,
    MAX_DISK_MIB, MAX_MEMORY_MIB, NAME_RE, NODE_RE, PLACEMENT_KEY, PLACEMENTS, PLANES, REMOTE_PATH_RE, SIZE_RE,
    SSH_KEY_RE, STORAGE_ID_RE, TAG_RE, TENANT_NAME_RE, TOKEN_ID_RE, UNIX_USER_RE, BridgeId, CpuType, DiskSize,
    DnsName, Hostname, ImageName, IpAddress, Ipv4Address, Ipv6Address, Nameservers, NodeName, Placement, Plane,
    RemotePath, SearchDomains, StorageId, Strict, TokenId, UnixUser, mac_problem, normalize_mac, ssh_public_key,
)
from image_factory.site.hypervisors import (
    CRYPT_HASH_HINT, DISK_NAME_RE, INSTALL_STORAGES, KEYBOARD_LAYOUTS, ZFS_RAID_LEVELS, HardwareMac, HostInstall,
    Hypervisor, InstallDisks, InstallNetwork, SshEndpoint, Storages, VmidRange,
)
from image_factory.site.images import (
    EOL_WARN_DAYS, MAX_TEMPLATE_PATTERN, TEMPLATE_FIELDS, Image, Repository, Source, Suite, eol_gate,
)
from image_factory.site.load import HOST_KEYS, load_site, read_inventory, read_placement, site_dir
from image_factory.site.model import Site
from image_factory.site.tenants import TENANTS_KEY, DhcpRange, Tenant, host_address_in, read_tenants, tenants_file
from image_factory.site.vendordata import (
    MAX_SNIPPET, VENDOR_FILE_RE, VendorData, cloud_config_problem, read_vendor_data,
)
from image_factory.site.vms import (
    DATA_DISK_SLOT_RE, DISK_BUS_OPTIONS, DISK_BUSES, MAX_DESCRIPTION, Q35_CLOUDINIT_SLOT, CloudInit, DataDisk, Nic,
    StaticIp, StaticIp6, Vm,
)

# The names other modules imported before the split (hostinstall.gather, site.mac): kept as they were.
_read_inventory = read_inventory
_ssh_public_key = ssh_public_key

__all__ = [
    "BRIDGE_RE",
    "BridgeId",
    "CPU_TYPES",
    "CRYPT_HASH_HINT",
    "CloudInit",
    "CpuType",
    "DATA_DISK_SLOT_RE",
    "DISK_BUSES",
    "DISK_BUS_OPTIONS",
    "DISK_NAME_RE",
    "DNS_NAME_RE",
    "DataDisk",
    "DhcpRange",
    "DiskSize",
    "DnsName",
    "EOL_WARN_DAYS",
    "FINGERPRINT_RE",
    "HOST_KEYS",
    "HYPERVISOR_GROUP",
    "HardwareMac",
    "HostInstall",
    "Hostname",
    "Hypervisor",
    "IMAGE_NAME_RE",
    "INSTALL_STORAGES",
    "Image",
    "ImageName",
    "InstallDisks",
    "InstallNetwork",
    "IpAddress",
    "Ipv4Address",
    "Ipv6Address",
    "KEYBOARD_LAYOUTS",
    "MAC_RE",
    "MAX_CORES",
    "MAX_DESCRIPTION",
    "MAX_DISK_MIB",
    "MAX_MEMORY_MIB",
    "MAX_SNIPPET",
    "MAX_TEMPLATE_PATTERN",
    "NAME_RE",
    "NODE_RE",
    "Nameservers",
    "Nic",
    "NodeName",
    "PLACEMENTS",
    "PLACEMENT_KEY",
    "PLANES",
    "Placement",
    "Plane",
    "Q35_CLOUDINIT_SLOT",
    "REMOTE_PATH_RE",
    "RemotePath",
    "Repository",
    "SIZE_RE",
    "SSH_KEY_RE",
    "STORAGE_ID_RE",
    "SearchDomains",
    "Site",
    "Source",
    "SshEndpoint",
    "StaticIp",
    "StaticIp6",
    "StorageId",
    "Storages",
    "Strict",
    "Suite",
    "TAG_RE",
    "TEMPLATE_FIELDS",
    "TENANTS_KEY",
    "TENANT_NAME_RE",
    "TOKEN_ID_RE",
    "Tenant",
    "TokenId",
    "UNIX_USER_RE",
    "UnixUser",
    "VENDOR_FILE_RE",
    "VendorData",
    "Vm",
    "VmidRange",
    "ZFS_RAID_LEVELS",
    "_read_inventory",
    "_ssh_public_key",
    "cloud_config_problem",
    "eol_gate",
    "host_address_in",
    "load_site",
    "mac_problem",
    "mac_tenant_id",
    "normalize_mac",
    "read_placement",
    "read_tenants",
    "read_vendor_data",
    "site_dir",
    "tenants_file",
]
