"""The property-string codecs: what PVE returns parses, what the factory writes round-trips."""

from __future__ import annotations

import pytest

from image_factory import pvecodec
from image_factory.pvecodec import NetSpec, format_props, format_tags, parse_props, parse_tags


@pytest.mark.parametrize(("raw", "expected"), [
    ("b;a", ["a", "b"]),
    ("Web,db web", ["db", "web"]),  # PVE splits on ; , and space, and compares case-insensitively
    ("", []),
    (None, []),
    (["X", "x", " y "], ["x", "y"]),
])
def test_parse_tags(raw: object, expected: list[str]) -> None:
    assert parse_tags(raw) == expected


def test_format_tags_is_the_normalised_form_and_round_trips() -> None:
    written = format_tags(["mgmt", "Image-Factory", "jump", "mgmt"])
    assert written == "image-factory;jump;mgmt"
    assert format_tags(parse_tags(written)) == written


def test_props_round_trip_in_pves_order() -> None:
    props = parse_props("virtio=BC:24:11:00:00:01,firewall=1,bridge=vmbr0", first_key="model")
    assert props == {"virtio": "BC:24:11:00:00:01", "firewall": "1", "bridge": "vmbr0"}
    assert format_props({"firewall": "1", "bridge": "vmbr0"}, ("virtio", "X")) == "virtio=X,bridge=vmbr0,firewall=1"


def test_net_round_trip() -> None:
    spec = NetSpec.parse("virtio=BC:24:11:00:00:01,firewall=1,bridge=vmbr0,tag=20")
    assert spec.mac == "bc:24:11:00:00:01" and spec.opts == {"bridge": "vmbr0", "firewall": "1", "tag": "20"}
    assert NetSpec.parse(spec.format()) == spec
    assert spec.format() == "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1,tag=20"


@pytest.mark.parametrize(("text", "size"), [("10G", 10 * 2**30), ("2252M", 2252 * 2**20), ("512K", 512 * 2**10),
                                            ("1048576", 2**20), ("1.5G", int(1.5 * 2**30))])
def test_sizes_parse_and_format_as_pve_writes_them(text: str, size: int) -> None:
    from image_factory.pvecodec import format_size, parse_size

    assert parse_size(text) == size
    assert parse_size(format_size(size)) == size
    assert format_size(20 * 2**30) == "20G" and format_size(2252 * 2**20) == "2252M" and format_size(1000) == "1000"


@pytest.mark.parametrize(("text", "ranges"), [
    ("2-4094", [(2, 4094)]), ("10 20 30-40", [(10, 10), (20, 20), (30, 40)]), ("10,20", [(10, 10), (20, 20)]),
    ("", []),
])
def test_bridge_vids_round_trip(text: str, ranges: list[tuple[int, int]]) -> None:
    assert pvecodec.parse_vids(text) == ranges
    assert pvecodec.parse_vids(pvecodec.format_vids(ranges)) == ranges


@pytest.mark.parametrize("bad", ["0-10", "10-5", "4095", "ten", "1-2-3"])
def test_bridge_vids_refuse_what_pve_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        pvecodec.parse_vids(bad)
