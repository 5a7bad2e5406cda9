"""Wait until a started guest is ready: its agent reports the inventory MAC, or SSH greets."""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from image_factory.deploy.model import NotReady
from image_factory.pve.client import ApiError, PveClient
from image_factory.pve.codec import parse_props
from image_factory.site.inventory import StaticIp, Vm

READY_POLL_INTERVAL = 2.0
SSH_PORT = 22


def guest_address(interfaces: Any, mac: str) -> str | None:
    """The first usable IPv4 address the guest agent reports on the NIC with ``mac``."""
    for iface in interfaces or []:
        if str(iface.get("hardware-address", "")).lower() != mac.lower():
            continue
        for addr in iface.get("ip-addresses") or []:
            if addr.get("ip-address-type") != "ipv4":
                continue
            try:
                ip = ipaddress.IPv4Address(str(addr.get("ip-address")))
            except ValueError:
                continue
            # the NIC is matched by its MAC (never lo), so any routable-looking address will do
            if not (ip.is_link_local or ip.is_unspecified or ip.is_multicast):
                return str(ip)
    return None


def agent_configured(config: Mapping[str, Any]) -> bool:
    props = parse_props(str(config.get("agent", "0")), "enabled")
    return props.get("enabled", "0").lower() in ("1", "true", "on", "yes")


def known_address(vm: Vm) -> str | None:
    """NIC 0's address when the inventory knows it (nics[0].address or a static ipconfig)."""
    if vm.nics[0].address:
        return vm.nics[0].address
    ip = vm.cloudinit.ipconfig
    return ip.ip.split("/")[0] if isinstance(ip, StaticIp) else None


def ssh_answers(address: str, port: int | None = None, timeout: float = 3.0) -> bool:
    """True when an SSH server greets on address:port (reads the banner; sends nothing)."""
    try:
        with socket.create_connection((address, port or SSH_PORT), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def wait_ready(client: PveClient, vm: Vm, *, timeout: float, sleep: Callable[[float], None] = time.sleep) -> str:
    """Until the guest is ready; returns its address.

    With the guest agent configured (the factory's templates have it): the agent reports a NIC with
    the inventory MAC of nic 0 and an IPv4 address. Without an agent: SSH greets on the address the
    inventory gives nic 0 (static ipconfig or nics[0].address); with neither, refuse to guess.
    """
    deadline = time.monotonic() + timeout
    if not agent_configured(client.vm_config(vm.vmid)):
        address = known_address(vm)
        if address is None:
            raise NotReady(f"{vm.name}: no guest agent configured and no known address to check SSH on; "
                              "enable the agent in the template or deploy with --no-wait")
        while not ssh_answers(address):
            if time.monotonic() > deadline:
                raise NotReady(f"{vm.name}: not ready after {timeout:.0f}s: no SSH greeting on {address}")
            sleep(READY_POLL_INTERVAL)
        return address
    last = "no answer yet"
    while True:
        try:
            answer = client.vm_agent(vm.vmid, "network-get-interfaces")
            interfaces = answer.get("result") if isinstance(answer, dict) else answer
            ip = guest_address(interfaces, vm.nics[0].mac)
            if ip:
                return ip
            seen = [str(i.get("hardware-address", "")).lower() for i in interfaces or []]
            last = f"agent answers, but no NIC {vm.nics[0].mac} with an IPv4 address (NICs seen: {', '.join(seen)})"
        except ApiError as exc:
            if exc.status in (401, 403):
                raise NotReady(
                    f"{vm.name}: cannot read the guest agent: {exc.pve_message} (the API token needs VM.Monitor on "
                    "PVE 8, VM.GuestAgent.Audit on PVE 9; or deploy with --no-wait)"
                ) from None
            last = exc.pve_message
        if time.monotonic() > deadline:
            raise NotReady(f"{vm.name}: not ready after {timeout:.0f}s: {last}")
        sleep(READY_POLL_INTERVAL)


