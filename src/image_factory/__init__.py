"""deevnet-image-factory: from a Git repo to running Proxmox VE VMs.

Stages, data flowing one way: inventory -> render -> build -> imagetest -> publish -> deploy.
"""

__version__ = "0.2.0"  # the package version (pyproject.toml reads it): one place
