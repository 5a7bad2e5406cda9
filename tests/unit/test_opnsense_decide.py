"""opnsense's pure decision (image_factory.handoffs.opnsense.decide): OPNsense's refusals replayed over every row,
the order of writes and removals; no API, no fake."""

from __future__ import annotations

import dataclasses

import pytest

from image_factory.handoffs import opnsense as opn

pytestmark = pytest.mark.unit


def _host(host: str, ip: str, mac: str, *, ours: bool = True, uuid: str = "", domain: str = "d.lan") -> dict[str, str]:
    return {"uuid": uuid or f"u-{host}", "host": host, "domain": domain, "ip": ip, "hwaddr": mac,
            "descr": f"{opn.MARKER} {host} nic0 tenant/app on pve-tenant" if ours else "hand-made", "set_tag": ""}


WANT_A = opn.HostEntry("a", "d.lan", "10.0.0.1", "02:de:21:11:01:00", f"{opn.MARKER} a nic0 tenant/app on pve-tenant")
WANT_B = opn.HostEntry("b", "d.lan", "10.0.0.2", "02:de:21:11:02:00", f"{opn.MARKER} b nic0 tenant/app on pve-tenant")

# (desired hosts, OPNsense's host rows) -> {key: (action, words in why)}: the pure plan, OPNsense's rules replayed
PLAN_CASES: dict[str, tuple[list[opn.Entry], list[dict[str, str]], dict[str, tuple[str, str]]]] = {
    "empty: both made": ([WANT_A, WANT_B], [], {WANT_A.hwaddr: ("create", ""), WANT_B.hwaddr: ("create", "")}),
    "a foreign DHCP host on an address": ([WANT_A], [_host("x", "10.0.0.1", "aa:00:00:00:00:01", ours=False)],
                                          {WANT_A.hwaddr: ("conflict", "does not own holds 10.0.0.1 (x (aa:")}),
    "a foreign host override may share it": ([WANT_A], [_host("x", "10.0.0.1", "", ours=False)],
                                             {WANT_A.hwaddr: ("create", "")}),
    "a foreign entry with the name": ([WANT_A], [_host("a", "10.0.0.9", "aa:00:00:00:00:01", ours=False)],
                                      {WANT_A.hwaddr: ("conflict", "already has the name a.d.lan")}),
    "a foreign entry with the MAC": ([WANT_A], [_host("x", "10.0.0.9", WANT_A.hwaddr.upper(), ours=False)],
                                     {WANT_A.hwaddr: ("conflict", "holds 02:de:21:11:01:00")}),
    "our deleted host frees its address first": (
        [WANT_A], [_host("old", "10.0.0.1", "02:de:21:11:09:00")],
        {WANT_A.hwaddr: ("create", ""), "02:de:21:11:09:00": ("delete", "no longer in the inventory")}),
    "our updated host frees its address first": (
        [WANT_A, dataclasses.replace(WANT_B, ip="10.0.0.3")],
        [_host("b", "10.0.0.1", WANT_B.hwaddr)],
        {WANT_A.hwaddr: ("create", ""), WANT_B.hwaddr: ("update", "")}),
    "IPv6 beside IPv4: one list, made": ([dataclasses.replace(WANT_A, ip="10.0.0.1, 2001:db8::1")], [],
                                         {WANT_A.hwaddr: ("create", "")}),
    "a foreign DHCP host on the IPv6 address": (
        [dataclasses.replace(WANT_A, ip="10.0.0.1,2001:db8::1")],
        [_host("x", "2001:db8::1", "aa:00:00:00:00:01", ours=False)],
        {WANT_A.hwaddr: ("conflict", "does not own holds 2001:db8::1")}),
    "a partial IPv6 address may repeat": ([dataclasses.replace(WANT_A, ip="::1")],
                                          [_host("x", "::1", "aa:00:00:00:00:01", ours=False)],
                                          {WANT_A.hwaddr: ("create", "")}),
    "an IPv6 address added to ours": ([dataclasses.replace(WANT_A, ip="10.0.0.1,2001:db8::1")],
                                      [_host("a", "10.0.0.1", WANT_A.hwaddr)], {WANT_A.hwaddr: ("update", "")}),
    "a swap of two of ours": (
        [dataclasses.replace(WANT_A, ip="10.0.0.2"), dataclasses.replace(WANT_B, ip="10.0.0.1")],
        [_host("a", "10.0.0.1", WANT_A.hwaddr), _host("b", "10.0.0.2", WANT_B.hwaddr)],
        {WANT_A.hwaddr: ("conflict", "two runs"), WANT_B.hwaddr: ("conflict", "two runs")}),
}


@pytest.mark.parametrize("case", PLAN_CASES)
def test_the_plan_replays_opnsenses_refusals_over_every_row(case: str) -> None:
    desired, rows, expected = PLAN_CASES[case]
    report = opn.plan([opn.HOSTS], {opn.HOSTS.name: desired}, {opn.HOSTS.name: rows}, [])
    assert {c.key: (c.action, c.why) for c in report.changes if c.action != "unchanged"}.keys() == expected.keys()
    for c in report.changes:
        action, words = expected[c.key]
        assert c.action == action and words in c.why, (c.action, c.why)
    assert report.refused == any(a == "conflict" for a, _ in expected.values())


def test_the_plan_keeps_an_assigned_vlan_and_orders_removals_after_their_users() -> None:
    rows = {opn.VLANS.name: [{"uuid": "v1", "if": "vtnet1", "tag": "110", "descr": f"{opn.MARKER} tenant acme: x",
                              "vlanif": "vlan01 [ACME]"},
                             {"uuid": "v2", "if": "vtnet1", "tag": "120", "descr": f"{opn.MARKER} tenant globex: x",
                              "vlanif": "vlan02"}],
            opn.TAGS.name: [{"uuid": "t2", "tag": f"{opn.MARKER} tenant globex"}],
            opn.HOSTS.name: [_host("g", "10.0.0.5", "02:de:22:11:01:00") | {"set_tag": "t2"}]}
    kinds = [opn.VLANS, opn.TAGS, opn.HOSTS]
    report = opn.plan(kinds, {k.name: [] for k in kinds}, rows, [])
    assert [(c.action, c.kind, c.key) for c in report.changes] == [
        ("blocked", "vlan", "acme"), ("delete", "vlan", "globex"), ("delete", "tag", "globex"),
        ("delete", "host", "02:de:22:11:01:00")]
    assert report.changes[0].why.startswith("cannot delete: assigned to ACME")
    assert [(c.kind, c.key) for c in opn.write_order(report.changes)] == [
        ("host", "02:de:22:11:01:00"), ("tag", "globex"), ("vlan", "globex")]
    assert not report.refused and not report.ok


def _range(start: str, prefix_len: str = "", constructor: str = "") -> dict[str, str]:
    return {"uuid": f"r-{start}", "start_addr": start, "prefix_len": prefix_len, "constructor": constructor}


V6_HOSTS: list[opn.Entry] = [dataclasses.replace(WANT_A, ip="10.0.0.1,2001:db8:1::1"),
                             dataclasses.replace(WANT_B, ip="2001:db8:2::2")]
# (OPNsense's range rows) -> the addresses the note names ("" for no note): dnsmasq serves a fixed IPv6 address
# only on the subnet of some dhcp-range (dnsmasq(8)); OPNsense's template gives a range prefix_len 64 by default
NOTE_CASES: dict[str, tuple[list[dict[str, str]], str]] = {
    "no range at all": ([], "a 2001:db8:1::1, b 2001:db8:2::2"),
    "an IPv4 range only": ([_range("10.0.0.100")], "a 2001:db8:1::1, b 2001:db8:2::2"),
    "a /64 (the default) covers one": ([_range("2001:db8:1::")], "b 2001:db8:2::2"),
    "a /46 covers both": ([_range("2001:db8::", "46")], ""),
    "a constructed range: its subnet is the interface's, unknown here": ([_range("::100", "", "opt1")], ""),
}


@pytest.mark.parametrize("case", NOTE_CASES)
def test_ipv6_reservations_no_range_serves_are_named(case: str) -> None:
    rows, named = NOTE_CASES[case]
    notes = opn.ipv6_notes(V6_HOSTS, rows)
    if named:
        assert len(notes) == 1 and f"covers {named}:" in notes[0], notes
    else:
        assert notes == []
    assert opn.ipv6_notes([WANT_A], []) == [], "no IPv6 reservation, no note"
