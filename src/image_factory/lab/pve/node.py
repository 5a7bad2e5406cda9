"""LabPve: fakepve's FakePve with the lab's fidelity layer, one mixin per concern (the package's docstring)."""

from __future__ import annotations

from fakepve.lxc import random_mac
from fakepve.storage import parse_name_dir

from image_factory.lab.pve.access import Access
from image_factory.lab.pve.agent import GuestAgent
from image_factory.lab.pve.base import LabNodeBase
from image_factory.lab.pve.clones import Clones
from image_factory.lab.pve.cluster import Cluster
from image_factory.lab.pve.control import Control
from image_factory.lab.pve.disks import Disks
from image_factory.lab.pve.members import ClusterMember
from image_factory.lab.pve.power import Power
from image_factory.lab.pve.state import StatePersistence
from image_factory.lab.pve.storage import Storage
from image_factory.lab.pve.tasks import Tasks
from image_factory.lab.pve.upload import Upload
from image_factory.lab.pve.vmconfig import VmConfig
from image_factory.lab.spec import NodeSpec


class LabPve(ClusterMember, Control, GuestAgent, Power, Cluster, Clones, VmConfig, Disks, Upload, Storage, Tasks,
             Access, StatePersistence, LabNodeBase):
    """One PVE node as the lab runs it: every concern overrides fakepve's methods of its own area only, so the
    order of the mixins does not matter; each one's super() reaches fakepve."""


__all__ = ["LabPve", "NodeSpec", "parse_name_dir", "random_mac"]
