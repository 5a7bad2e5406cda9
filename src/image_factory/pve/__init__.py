"""The pve wing: talk to one Proxmox VE hypervisor (API client, property codecs, templates, host lock, live MACs,
guest agent, SSH link, upload engines). It never imports the image wing."""
