"""The lab's shaped wire (lab/wire.py): hosts in their own network namespaces behind tbf-shaped veths."""

from __future__ import annotations

import io
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from image_factory.lab import wire
from image_factory.lab.config import LabError
from image_factory.lab.pytest_plugin import LabHandle, claim_slot, start_lab, stop_lab
from image_factory.pve.client import PveClient
from image_factory.pve.sshlink import connect

pytestmark = pytest.mark.lab

# Far below what the same upload reaches unshaped (paramiko's SFTP: 43-51 Mbit/s per host with the machine at load
# 16 on 2 CPUs), so a missing shaper fails the bound.
RATE_MBIT = 8
PAYLOAD = 1536 * 1024  # 1.6 s at the rate: tbf's 64 KiB bucket is 4% of it


def _upload_rates(lab: LabHandle) -> tuple[dict[str, float], float]:
    """Each host's SFTP upload rate in Mbit/s, both hosts at once, and the rate of both together (all bytes over
    the time from the first start to the last end)."""
    rates: dict[str, float] = {}
    spans: list[tuple[float, float]] = []
    errors: list[BaseException] = []
    data = os.urandom(PAYLOAD)

    def put(name: str) -> None:
        hv = lab.hv(name)
        try:
            with connect(name, hv.ssh) as link, link.sftp() as sftp:
                start = time.monotonic()
                sftp.putfo(io.BytesIO(data), f"{hv.storage.import_dir}/wire-probe.raw")
                end = time.monotonic()
                rates[name] = PAYLOAD * 8 / 1e6 / (end - start)
                spans.append((start, end))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(name,)) for name in lab.hypervisors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    together = len(spans) * PAYLOAD * 8 / 1e6 / (max(e for _, e in spans) - min(s for s, _ in spans))
    return rates, together


@pytest.mark.parametrize("layout", ["separate", "shared"])
def test_wire_bounds_the_rate_by_its_shape_and_down_removes_it(tmp_path: Path, layout: str) -> None:
    shape = {"profile": "lan", "layout": layout, "host_mbit": RATE_MBIT, "uplink_mbit": RATE_MBIT, "delay_ms": 0}
    handle, slot_lock = start_lab(tmp_path / "lab", real_boot="none", wire=shape)
    slot = handle.config.slot
    try:
        made = wire.leftovers(slot)
        assert [f"ifwire-{slot}-h0", f"ifwire-{slot}-h1"] == [n for n in made if n.endswith(("h0", "h1"))
                                                                and n.startswith("ifwire")]
        for i, hv in enumerate(handle.hypervisors.values()):
            assert hv.ssh.host == hv.api_url.split("//")[1].split(":")[0] == wire.host_address(slot, i)
            assert PveClient(hv).get("/version")["version"]  # the API answers across the wire too
        # the servers listen inside the namespaces, not on the client's side
        listening = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
        assert "198.18." not in listening
        rates, together = _upload_rates(handle)
        assert all(r < 1.2 * RATE_MBIT for r in rates.values()), rates  # each host's link is at the rate
        if layout == "shared":  # and both share one uplink at the rate
            assert together < 1.2 * RATE_MBIT, (rates, together)
    finally:
        stop_lab(handle, slot_lock)
    assert wire.leftovers(slot) == []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"ifwire-{slot}-" not in netns


def test_a_crashed_wire_of_the_slot_is_removed_before_the_next_is_made() -> None:
    slot, slot_lock = claim_slot()
    try:
        shape = wire.parse({"profile": "remote", "layout": "shared", "delay_ms": 0})
        assert shape is not None
        wire.setup(slot, 2, shape)  # a lab that died without its down
        assert wire.setup(slot, 1, shape) == [wire.host_address(slot, 0)]
        assert f"ifwire-{slot}-h1" not in wire.leftovers(slot)
        tc = subprocess.run(["tc", "qdisc", "show", "dev", f"wr{slot}up"], capture_output=True, text=True).stdout
        assert "rate 100Mbit" in tc
    finally:
        wire.teardown(slot)
        slot_lock.close()
    assert wire.leftovers(slot) == []


def test_a_delay_is_netem_where_the_kernel_has_it_else_a_clear_refusal_that_leaves_nothing() -> None:
    slot, slot_lock = claim_slot()
    shape = wire.parse({"profile": "remote", "layout": "separate"})
    assert shape is not None and shape.shape.delay_ms == 20
    try:
        try:
            wire.setup(slot, 1, shape)
        except LabError as exc:  # this machine's kernel (CONFIG_NET_SCH_NETEM not set)
            assert "no netem qdisc" in str(exc) and '"delay_ms": 0' in str(exc)
            assert wire.leftovers(slot) == []
        else:
            tc = subprocess.run(["tc", "qdisc", "show", "dev", f"wr{slot}h0"], capture_output=True, text=True).stdout
            assert "netem" in tc and "delay 10ms" in tc and "rate 100Mbit" in tc
    finally:
        wire.teardown(slot)
        slot_lock.close()
    assert wire.leftovers(slot) == []
