"""LabPve: fakepve 0.5.0 made to behave like the PVE 8.4 node the tool drives (pve-facts.md).

fakepve keeps its state in memory. The lab backs the node's ``local`` directory storage with a
real directory tree (the same tree the node's sshd writes into) and closes the gaps between
fakepve and PVE 8.4 that publish and deploy rely on, by subclassing -- never by patching
site-packages:

- one node (the hypervisor's name), PVE 8.4.1, one privilege-separated API token whose rights
  are the intersection of the user's and the token's ACLs;
- ``local`` is a ``dir`` storage whose path is real: files in ``import/`` list as
  ``local:import/<file>``; VM disks are real qcow2/raw files under ``images/<vmid>/``;
- ``POST .../upload`` with ``content=import``: PVE's filename rule, fields before the file
  part, Content-Length required, staged in the node's var/tmp, checksum checked in the task;
- ``import-from=<volid>`` really checked with ``qemu-img info`` and converted into the target
  storage (sized from the source); absolute paths refused for everyone but root@pam;
- cloud-init volumes are ``vm-<id>-cloudinit``; a clone gets its own; clones get fresh
  BC:24:11 MACs (fakepve); template conversion renames the disk files to ``base-...``;
  linked clones are qcow2 overlays of the template's base file;
- disk allocation and copies take the storage lock, waiting at most 10 PVE seconds:
  ``can't lock file '/var/lock/pve-manager/pve-storage-<sid>' - got timeout``;
- optional PVE-like task durations;
- starting a VM launches a real qemu (vmrunner), the guest agent answers from it;
- a control endpoint (unix socket) for fault hooks and resets.

Its own parsing, on purpose: every property string, size and tag list the lab reads or writes is parsed by
``props`` (PVE's rules) and fakepve, never by the product's ``image_factory.pve.codec``. The lab is the oracle
the product is tested against; sharing the codec would make a codec bug agree with itself and pass every test.

One concern per module, each a mixin of ``LabPve`` (node.py) over ``base.LabNodeBase``: access (tokens, ACLs,
schema by version, bridges, tag policy), tasks, storage, upload, disks, vmconfig, clones, cluster (node, cluster
options, network), power, agent, state (persistence), control (fault hooks) and members (a node of the modelled
cluster: what its peers share, forwarding calls for them, going offline; inert on an independent node).
"""

from image_factory.lab.pve.access import NEWER_PARAMETERS
from image_factory.lab.pve.base import config_digest
from image_factory.lab.pve.node import LabPve, NodeSpec, parse_name_dir, random_mac

__all__ = ["NEWER_PARAMETERS", "LabPve", "NodeSpec", "config_digest", "parse_name_dir", "random_mac"]
