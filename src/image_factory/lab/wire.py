"""A shaped wire between the client and the lab's hosts: network namespaces, veth pairs and ``tc``.

With ``"wire": {"profile": "lan"}`` (or ``"remote"``) in lab.json each hypervisor's sshd runs inside its own
network namespace and its API listens there too (fakepve itself, and the VMs' qemu, stay in the client's
namespace, so a VM's SSH forward is on 127/8 as without a wire). The namespaces reach the client by veth pairs:

- layout ``separate``: one veth pair per host, client <-> host, each shaped at the host rate and delay;
- layout ``shared``: one uplink veth from the client into a bridge namespace, shaped at the uplink rate (the
  client's one NIC), and one veth per host from the bridge, shaped at the host rate and delay.

Every link is shaped in both directions: ``tbf`` for the rate, ``netem`` for the one-way delay (half the
profile's round-trip delay on each end). Host i answers on 198.18.s.(4i+2) (RFC 2544's benchmarking range,
slot s), the client is 198.18.s.(4i+1) on link i (separate) or 198.18.s.1 on the uplink (shared).

Names carry the slot (namespaces ``ifwire-<s>-...``, client-side links ``wr<s>...``): ``teardown(slot)`` removes
whatever a crashed lab of that slot left, and ``setup`` starts with it.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from image_factory.lab.config import LabError

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
LAYOUTS = ("separate", "shared")
MAX_HOSTS = 63  # 198.18.s.(4i+2) stays inside the slot's /24


@dataclass(frozen=True)
class WireShape:
    """One profile: the client's uplink and each host's link (Mbit/s), and the round-trip delay added on a host
    link (ms)."""

    uplink_mbit: float
    host_mbit: float
    delay_ms: float


PROFILES = {
    "lan": WireShape(uplink_mbit=1000, host_mbit=1000, delay_ms=0.2),
    "remote": WireShape(uplink_mbit=100, host_mbit=100, delay_ms=20),
}


@dataclass(frozen=True)
class Wire:
    """lab.json's ``wire`` checked: the profile's shape with any field the file overrides, and the layout."""

    profile: str
    layout: str
    shape: WireShape

    def to_mapping(self) -> dict[str, Any]:
        return {"profile": self.profile, "layout": self.layout, **asdict(self.shape)}


def parse(data: Any, where: str = "lab config") -> Wire | None:
    """lab.json's ``wire`` value as a Wire (None: no wire, every host on loopback); LabError naming the bad key."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise LabError(f"{where}: wire must be a mapping like {{\"profile\": \"lan\", \"layout\": \"separate\"}}")
    profile = data.get("profile")
    if profile is None:
        return None
    if profile not in PROFILES:
        raise LabError(f"{where}: wire.profile must be one of {', '.join(PROFILES)} or null (got {profile!r})")
    layout = data.get("layout", "separate")
    if layout not in LAYOUTS:
        raise LabError(f"{where}: wire.layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")
    unknown = sorted(set(data) - {"profile", "layout", *asdict(PROFILES[profile])})
    if unknown:
        raise LabError(f"{where}: wire has unknown key(s) {', '.join(unknown)}")
    fields = asdict(PROFILES[profile])
    for key in fields:
        if key in data:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 \
                    or (key != "delay_ms" and value == 0):
                raise LabError(f"{where}: wire.{key} must be a positive number (got {value!r})")
            fields[key] = float(value)
    return Wire(profile=profile, layout=layout, shape=WireShape(**fields))


def host_address(slot: int, index: int) -> str:
    if index >= MAX_HOSTS:
        raise LabError(f"a wired lab takes at most {MAX_HOSTS} hosts")
    return f"198.18.{slot}.{4 * index + 2}"


def host_netns(slot: int, index: int) -> str:
    return f"ifwire-{slot}-h{index}"


def _bridge_netns(slot: int) -> str:
    return f"ifwire-{slot}-br"


def _client_link(slot: int, index: int | None) -> str:
    """The client-side end of host i's link (separate) or of the uplink (index None)."""
    return f"wr{slot}up" if index is None else f"wr{slot}h{index}"


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


# ------------------------------------------------------------------------------------------- tc, ip


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"wire: `{' '.join(argv)}` failed: {proc.stderr.strip()}")
    return proc


def _tc(*args: str, netns: str | None = None) -> None:
    argv = ["tc", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        hint = ""
        if "netem" in args and "unknown" in proc.stderr:
            hint = (" (this kernel has no netem qdisc, CONFIG_NET_SCH_NETEM: give the wire \"delay_ms\": 0 to shape "
                    "the rate alone)")
        raise LabError(f"wire: `{' '.join(argv)}` failed: {proc.stderr.strip()}{hint}")


def tbf_burst_bytes(mbit: float) -> int:
    """A bucket that holds 4 ms at the rate (a tickless kernel's timer slack at 1 Gbit/s; tbf drops a packet larger
    than its bucket, so never below a 64 KiB GSO segment)."""
    return max(64 * 1024, int(mbit * 1e6 / 8 * 0.004))


def _shape(dev: str, mbit: float, one_way_ms: float, netns: str | None) -> None:
    """Egress of ``dev`` limited to ``mbit`` and delayed by ``one_way_ms`` (netem, with tbf below it)."""
    tbf = ["tbf", "rate", f"{mbit:g}mbit", "burst", str(tbf_burst_bytes(mbit)), "latency", "50ms"]
    if one_way_ms > 0:
        _tc("qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", f"{one_way_ms * 1000:.0f}us",
            "limit", "100000", netns=netns)
        _tc("qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", *tbf, netns=netns)
    else:
        _tc("qdisc", "add", "dev", dev, "root", "handle", "10:", *tbf, netns=netns)


def _link_pair(client_end: str, far_end: str, far_netns: str, client_netns: str | None = None) -> None:
    _ip("link", "add", client_end, "type", "veth", "peer", "name", far_end, "netns", far_netns, netns=client_netns)


# --------------------------------------------------------------------------------------- up, down


def setup(slot: int, hosts: int, wire: Wire) -> list[str]:
    """Namespaces, links and shaping for ``hosts`` hosts of lab slot ``slot`` (after removing any a crashed lab of
    the slot left); returns each host's address. Everything made is removed again if a step fails."""
    teardown(slot)
    try:
        return _setup(slot, hosts, wire)
    except BaseException:
        teardown(slot)
        raise


def _setup(slot: int, hosts: int, wire: Wire) -> list[str]:
    shape, one_way = wire.shape, wire.shape.delay_ms / 2
    addresses = [host_address(slot, i) for i in range(hosts)]
    for i in range(hosts):
        _ip("netns", "add", host_netns(slot, i))
        _ip("link", "set", "lo", "up", netns=host_netns(slot, i))
    if wire.layout == "separate":
        for i, address in enumerate(addresses):
            ns, client_end = host_netns(slot, i), _client_link(slot, i)
            _link_pair(client_end, "eth0", ns)
            client_address = f"198.18.{slot}.{4 * i + 1}"
            _ip("addr", "add", f"{client_address}/30", "dev", client_end)
            _ip("addr", "add", f"{address}/30", "dev", "eth0", netns=ns)
            _ip("link", "set", client_end, "up")
            _ip("link", "set", "eth0", "up", netns=ns)
            _shape(client_end, shape.host_mbit, one_way, None)
            _shape("eth0", shape.host_mbit, one_way, ns)
        return addresses
    bridge_ns, uplink = _bridge_netns(slot), _client_link(slot, None)
    _ip("netns", "add", bridge_ns)
    _ip("link", "add", "br0", "type", "bridge", netns=bridge_ns)
    _ip("link", "set", "br0", "up", netns=bridge_ns)
    _link_pair(uplink, "uplink", bridge_ns)
    _ip("addr", "add", f"198.18.{slot}.1/24", "dev", uplink)
    _ip("link", "set", "uplink", "master", "br0", "up", netns=bridge_ns)
    _ip("link", "set", uplink, "up")
    _shape(uplink, shape.uplink_mbit, 0, None)
    _shape("uplink", shape.uplink_mbit, 0, bridge_ns)
    for i, address in enumerate(addresses):
        ns, port = host_netns(slot, i), f"h{i}"
        _link_pair(port, "eth0", ns, client_netns=bridge_ns)
        _ip("addr", "add", f"{address}/24", "dev", "eth0", netns=ns)
        _ip("link", "set", port, "master", "br0", "up", netns=bridge_ns)
        _ip("link", "set", "eth0", "up", netns=ns)
        _shape(port, shape.host_mbit, one_way, bridge_ns)
        _shape("eth0", shape.host_mbit, one_way, ns)
    return addresses


def leftovers(slot: int) -> list[str]:
    """The slot's namespaces and client-side links that exist now (none after teardown)."""
    names = [p.name for p in NETNS_DIR.glob(f"ifwire-{slot}-*")] if NETNS_DIR.is_dir() else []
    links = [p.name for p in Path("/sys/class/net").glob(f"wr{slot}[hu]*")]
    return sorted(names + links)


def teardown(slot: int) -> None:
    """Remove the slot's namespaces (their veth ends go with them, and so do the peers) and any client-side link
    left without one. Processes still inside a namespace keep it alive unnamed: stop them first."""
    for name in leftovers(slot):
        if name.startswith("ifwire-"):
            _ip("netns", "delete", name, check=False)
        else:
            _ip("link", "delete", name, check=False)
    left = leftovers(slot)
    if left:
        raise LabError(f"wire: could not remove {', '.join(left)} (remove them with `ip netns delete` / "
                       "`ip link delete`)")


# --------------------------------------------------------------------------------- entering a netns


def exec_prefix(netns: str | None) -> list[str]:
    """What runs a command inside the namespace (``ip netns exec`` replaces itself: the pid is the command's)."""
    return ["ip", "netns", "exec", netns] if netns else []


@contextmanager
def entered(netns: str | None) -> Iterator[None]:
    """The calling thread inside ``netns`` while the block runs (sockets made there stay there), then back."""
    if not netns:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(netns_path(netns)) as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise LabError(f"wire: cannot enter network namespace {netns}: {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            libc.setns(home.fileno(), CLONE_NEWNET)
