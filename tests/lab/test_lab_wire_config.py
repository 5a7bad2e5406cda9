"""lab.json's wire value (lab/wire.py): checked before anything is made."""

from __future__ import annotations

import pytest

from image_factory.lab import wire
from image_factory.lab.config import LabConfig, LabError, LabHost


@pytest.mark.parametrize(("value", "message"), [
    ("lan", "wire must be a mapping"),
    ({"profile": "wan"}, "wire.profile must be one of lan, remote"),
    ({"profile": "lan", "layout": "star"}, "wire.layout must be one of separate, shared"),
    ({"profile": "lan", "host_mbit": 0}, "wire.host_mbit must be a positive number"),
    ({"profile": "lan", "delay_ms": "20ms"}, "wire.delay_ms must be a positive number"),
    ({"profile": "lan", "rate": 1}, "wire has unknown key(s) rate"),
])
def test_a_bad_wire_is_refused_naming_the_key(value: object, message: str) -> None:
    with pytest.raises(LabError, match=r"^lab\.json: " + message.replace("(", r"\(").replace(")", r"\)")):
        wire.parse(value, "lab.json")


def test_no_profile_is_no_wire_and_a_profile_takes_overrides() -> None:
    assert wire.parse(None) is None and wire.parse({"profile": None}) is None
    remote = wire.parse({"profile": "remote", "layout": "shared", "delay_ms": 0})
    assert remote == wire.Wire("remote", "shared", wire.WireShape(uplink_mbit=100, host_mbit=100, delay_ms=0))


def test_a_lab_config_with_a_bad_wire_is_refused_by_validate() -> None:
    cfg = LabConfig(hosts=[LabHost(name="h", node="h", role="mgmt", address="127.0.0.11")], wire={"profile": "wan"})
    with pytest.raises(LabError, match=r"^lab\.json: wire\.profile must be one of"):
        cfg.validate(where="lab.json")
