"""The lab: two Proxmox VE 8.4 hypervisors made of real parts on this machine.

Each hypervisor of the lab inventory gets an OpenSSH sshd and a fakepve-based API server
(``LabPve``: fakepve plus a fidelity layer) on its own loopback address; VMs started through the
API run under a real qemu. ``up``/``status``/``down`` are the entry points (``invoke lab.*``);
``image_factory.lab.pytest_plugin`` gives tests a running lab with fault hooks.
"""

from image_factory.lab.config import LabConfig, LabError, LabHost, LabPaths, vm_address
from image_factory.lab.controller import Lab, down, leftovers, status, up

__all__ = ["Lab", "LabConfig", "LabError", "LabHost", "LabPaths", "down", "leftovers", "status", "up", "vm_address"]
