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
from image_factory.lab.pytest_plugin import LabHandle, claim_slot, start_lab, stop_lab
from image_factory.pve import PveClient
from image_factory.sshlink import connect

pytestmark = pytest.mark.lab

RATE_MBIT = 40  # far below what an unshaped veth carries, even on this busy machine
PAYLOAD = 6 * 1024 * 1024  # 1.3 s at the rate: tbf's 64 KiB bucket is 1% of it


def _upload_rates(lab: LabHandle) -> dict[str, float]:
    """Each host's SFTP upload rate in Mbit/s, both hosts at once."""
    rates: dict[str, float] = {}
    errors: list[BaseException] = []
    data = os.urandom(PAYLOAD)

    def put(name: str) -> None:
        hv = lab.hv(name)
        try:
            with connect(name, hv.ssh) as link, link.sftp() as sftp:
                start = time.monotonic()
                sftp.putfo(io.BytesIO(data), f"{hv.storage.import_dir}/wire-probe.raw")
                rates[name] = PAYLOAD * 8 / 1e6 / (time.monotonic() - start)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(name,)) for name in lab.hypervisors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return rates


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
        rates = _upload_rates(handle)
        if layout == "separate":  # each host has its own link at the rate
            assert all(r < 1.2 * RATE_MBIT for r in rates.values()), rates
        else:  # both share one uplink at the rate
            assert sum(rates.values()) < 1.2 * RATE_MBIT, rates
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
