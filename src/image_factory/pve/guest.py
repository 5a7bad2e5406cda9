"""Talk to a deployed guest with its identity proven, not assumed.

The guest's SSH host key is read through the QEMU guest agent over the hypervisor's API (TLS
verified, token authenticated): a trusted channel, so SSH to the guest is strict from the first
connection. Used by the demo and for writing known_hosts entries after a deploy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import paramiko

from image_factory.errors import RemoteError
from image_factory.pve.client import PveClient
from image_factory.pve.sshlink import HostKeyMismatch, SshLink
from image_factory.site.inventory import SshEndpoint

HOST_KEY_FILES = ("/etc/ssh/ssh_host_ed25519_key.pub", "/etc/ssh/ssh_host_ecdsa_key.pub")


def agent_file_read(client: PveClient, vmid: int, path: str) -> str:
    """A file of the guest, read through the guest agent (``agent/file-read``).

    file-read, not exec: it needs VM.Monitor on PVE 8 and only VM.GuestAgent.FileRead on PVE 9 (exec
    needs VM.GuestAgent.Unrestricted). It does not help on RHEL-family guests: qemu-ga 10's default
    allow-list there blocks guest-file-* as well as guest-exec (docs/pve-facts.md): there this fails with
    the agent's refusal unless the image widens the allow-list.
    """
    answer = client.vm_agent(vmid, "file-read", file=path)
    if not isinstance(answer, dict) or "content" not in answer:
        raise RemoteError(client.name, f"VM {vmid}: agent/file-read of {path}: unexpected answer {answer!r}")
    return str(answer["content"])


def host_key_via_agent(client: PveClient, vmid: int, *, timeout: float = 120.0) -> str:
    """The guest's ed25519 (else ecdsa) SSH host public key, as '<type> <base64>'.

    Waits (bounded) because a first boot generates the keys a little after the agent starts.
    """
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        for path in HOST_KEY_FILES:
            try:
                text = agent_file_read(client, vmid, path)
            except RemoteError as exc:
                last = str(exc)
                continue
            parts = text.split()
            if len(parts) >= 2:
                return f"{parts[0]} {parts[1]}"
        if time.monotonic() > deadline:
            raise RemoteError(client.name, f"VM {vmid}: the guest agent could not read an SSH host key: {last}")
        time.sleep(2)


@dataclass
class GuestView:
    hostname: str
    links: str
    host_key: str


def inspect_over_ssh(
    name: str, address: str, user: str, key_file: Path, host_key: str, *, timeout: float = 20.0, wait: float = 180.0
) -> GuestView:
    """SSH to the guest, verifying the host key learnt through the agent; show hostname and links."""
    endpoint = SshEndpoint(host=address, port=22, user=user, host_key=host_key, key_file=key_file)
    deadline = time.monotonic() + wait
    while True:
        try:
            with SshLink(name, endpoint, timeout=timeout) as link:
                hostname = link.run(["hostname"]).stdout.strip()
                links = link.run(["ip", "-br", "link"]).stdout.strip()
            return GuestView(hostname, links, host_key)
        except HostKeyMismatch:
            raise
        except (RemoteError, paramiko.SSHException) as exc:
            # sshd starts after the agent on a first boot; a refused or reset handshake is retried.
            if time.monotonic() > deadline:
                raise RemoteError(name, f"SSH to {user}@{address} failed: {exc}") from None
            time.sleep(2)
