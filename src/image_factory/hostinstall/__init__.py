"""Bare metal to a Proxmox VE host: answer files for Proxmox's automated installer, the HTTPS answer
server the installer posts its system information to, and the prepared install ISO (docs/host-install.md)."""
