"""opnsense.sync against the lab's loopback OPNsense API (lab/opnsense_fake.py: OPNsense 25.7+ Dnsmasq shapes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakepve.certs import make_cert

from image_factory import opnsense as opn
from image_factory.errors import FactoryError
from image_factory.inventory import load_site
from image_factory.lab.opnsense_fake import FakeOpnsense, serve
from image_factory.mac import reservations
from image_factory.settings import REPO_ROOT

pytestmark = pytest.mark.unit

KEY, SECRET = "test-key-0123456789", "test-secret-9876543210"  # noqa: S105 - the fake's own, made up


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[FakeOpnsense, str, str]]:
    cert, key, _ = make_cert(str(tmp_path), name="opnsense", hosts=("127.0.0.1",))
    api = FakeOpnsense(KEY, SECRET)
    with serve(api, (cert, key)) as url:
        yield api, url, cert


def _client(url: str, cert: str, secret: str = SECRET) -> opn.OpnsenseClient:
    return opn.OpnsenseClient(url, KEY, secret, ca_file=Path(cert))


def _reservations() -> list[Any]:
    return reservations(load_site(REPO_ROOT / "ansible/inventory", REPO_ROOT / "packer/images.yml"))


def test_converges_from_empty_then_changes_nothing(fake: Any) -> None:
    api, url, cert = fake
    rs = _reservations()
    first = opn.sync(_client(url, cert), rs, dry_run=False)
    assert first.ok and [c.action for c in first.changes] == ["create"] * len(rs)
    assert api.reconfigures == 1 and len(api.hosts) == len(rs)
    by_mac = {h["hwaddr"]: h for h in api.hosts.values()}
    jump = next(r for r in rs if r.hostname == "jump01")
    assert (by_mac[jump.mac]["host"], by_mac[jump.mac]["ip"], by_mac[jump.mac]["domain"]) == \
        ("jump01", "192.168.10.30", "deevnet.lan")
    assert by_mac[jump.mac]["descr"].startswith(opn.MARKER)

    writes = api.writes
    second = opn.sync(_client(url, cert), rs, dry_run=False)
    assert {c.action for c in second.changes} == {"unchanged"}
    assert api.writes == writes and api.reconfigures == 1, "a second run writes nothing and reconfigures nothing"


def test_a_changed_reservation_is_corrected_and_a_foreign_one_left_alone(fake: Any) -> None:
    api, url, cert = fake
    rs = _reservations()
    opn.sync(_client(url, cert), rs, dry_run=False)
    jump = next(r for r in rs if r.hostname == "jump01")
    uid = next(u for u, h in api.hosts.items() if h["hwaddr"] == jump.mac)
    api.hosts[uid]["ip"] = "192.168.10.99"  # someone changed it in the GUI
    printer = api.add_foreign(host="printer", domain="deevnet.lan", ip="192.168.10.250",
                              hwaddr="aa:bb:cc:dd:ee:ff", descr="office printer")

    plan = opn.sync(_client(url, cert), rs, dry_run=True)
    (update,) = [c for c in plan.changes if c.action != "unchanged"]
    assert update.action == "update" and update.diff == {"ip": ("192.168.10.99", "192.168.10.30")}
    assert api.hosts[uid]["ip"] == "192.168.10.99", "a dry run writes nothing"

    done = opn.sync(_client(url, cert), rs, dry_run=False)
    assert done.reconfigured and api.hosts[uid]["ip"] == "192.168.10.30"
    assert api.hosts[printer]["ip"] == "192.168.10.250" and api.hosts[printer]["descr"] == "office printer"


def test_a_foreign_entry_with_an_inventory_mac_is_a_conflict_not_a_takeover(fake: Any) -> None:
    api, url, cert = fake
    rs = _reservations()
    taken = api.add_foreign(host="old-jump", domain="deevnet.lan", ip="192.168.10.31",
                            hwaddr=rs[0].mac.upper(), descr="hand-made")
    report = opn.sync(_client(url, cert), rs, dry_run=False)
    conflicts = [c for c in report.changes if c.action == "conflict"]
    assert not report.ok and [(c.kind, c.key) for c in conflicts] == [("host", rs[0].mac)]
    assert "left alone" in conflicts[0].why
    assert api.hosts[taken]["host"] == "old-jump"
    assert len(api.hosts) == len(rs), "every other reservation was still made"


def test_a_reservation_gone_from_the_inventory_is_removed(fake: Any) -> None:
    api, url, cert = fake
    rs = _reservations()
    opn.sync(_client(url, cert), rs, dry_run=False)
    report = opn.sync(_client(url, cert), rs[1:], dry_run=False)
    assert [c.action for c in report.changes if c.action != "unchanged"] == ["delete"]
    assert rs[0].mac not in {h["hwaddr"] for h in api.hosts.values()}


def test_wrong_secret_and_unverified_tls_are_clear_errors(fake: Any, tmp_path: Path) -> None:
    api, url, cert = fake
    with pytest.raises(opn.OpnsenseError, match="HTTP 401: the API key is wrong"):
        opn.sync(_client(url, cert, secret="nope"), _reservations(), dry_run=True)  # noqa: S106 - a wrong one
    (tmp_path / "other").mkdir()
    other, _, _ = make_cert(str(tmp_path / "other"), name="other", hosts=("127.0.0.1",))
    with pytest.raises(FactoryError, match="TLS verification"):
        opn.OpnsenseClient(url, KEY, SECRET, ca_file=Path(other)).search(opn.HOSTS)
    with pytest.raises(opn.OpnsenseError, match="https only"):
        opn.OpnsenseClient(url.replace("https", "http"), KEY, SECRET)
    assert api.writes == 0


def test_the_fake_refuses_what_opnsense_refuses(fake: Any) -> None:
    api, url, cert = fake
    client = _client(url, cert)
    bad = opn.HostEntry("jump01", "deevnet.lan", "not-an-ip", "zz:zz", f"{opn.MARKER} x")
    with pytest.raises(opn.OpnsenseError, match="host.hwaddr"):
        client.add(opn.HOSTS, bad)
    bad_range = opn.RangeEntry("10.110.0.100", "10.110.0.199", "255.0.255.0", "subnet", "acme.deevnet.lan", "x")
    with pytest.raises(opn.OpnsenseError, match="range.subnet_mask.*range.domain_type"):
        client.add(opn.RANGES, bad_range)
    with pytest.raises(opn.OpnsenseError, match="HTTP 404"):
        client.call("POST", "dnsmasq/settings/add_lease")


def test_the_tasks_read_the_key_file_and_converge(fake: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from invoke.context import Context
    from invoke.exceptions import Exit

    from image_factory.tasks import opnsense as tasks

    api, url, cert = fake
    key_file = tmp_path / "apikey.txt"
    key_file.write_text(f"key={KEY}\nsecret={SECRET}\n")
    key_file.chmod(0o644)
    args = {"url": url, "key_file": str(key_file), "ca_file": cert, "json": True}
    with pytest.raises(Exit):  # group/other-readable: refused before any request
        tasks.sync(Context(), **args)
    assert capsys.readouterr().err.count("chmod 600") == 1 and api.requests == []
    key_file.chmod(0o600)
    with pytest.raises(Exit) as pending:
        tasks.plan(Context(), **args)
    assert pending.value.code == 2, "changes pending: Terraform's detailed exit code"
    planned = json.loads(capsys.readouterr().out)
    assert planned["dry_run"] and {c["action"] for c in planned["changes"]} == {"create"} and api.writes == 0
    tasks.sync(Context(), **args)
    done = json.loads(capsys.readouterr().out)
    assert done["reconfigured"] and api.writes == len(planned["changes"])
    tasks.sync(Context(), **args)
    again = json.loads(capsys.readouterr().out)
    assert again["changes"] == [] and not again["reconfigured"]
    tasks.sync(Context(), **args, dry_run=True)  # nothing to do: exit 0
    assert json.loads(capsys.readouterr().out)["changes"] == []
    assert SECRET not in capsys.readouterr().err


TENANTS = REPO_ROOT / "docs" / "examples" / "two-tenants.yml"


def test_tenant_ranges_converge_beside_the_hosts_and_a_foreign_range_is_left_alone(fake: Any) -> None:
    """The two-tenant site: one range per tenant, keyed by the tenant; a second run writes nothing; a changed
    range is corrected; a tenant removed from the inventory loses its range; a foreign overlapping range is a
    conflict, never taken over."""
    api, url, cert = fake
    site = load_site(TENANTS, REPO_ROOT / "packer/images.yml")
    foreign = api.add_foreign("range", start_addr="10.120.0.150", end_addr="10.120.0.160", description="lab")
    first = opn.sync(_client(url, cert), reservations(site), dry_run=False, tenants=site.tenants)
    assert [(c.action, c.key) for c in first.changes if c.kind == "range"] == [
        ("create", "acme"), ("conflict", "globex")]
    assert not first.ok and api.reconfigures == 1 and api.vlan_reconfigures == 0 and api.vlans == {}
    assert first.notes == ["tenant VLAN devices not managed: give --vlan-parent (the trunk to the tenant bridge)"]
    acme = next(r for r in api.ranges.values() if r["description"].startswith(opn.MARKER))
    assert (acme["start_addr"], acme["end_addr"], acme["subnet_mask"], acme["domain_type"], acme["domain"]) == (
        "10.110.0.100", "10.110.0.199", "255.255.255.0", "range", "acme.deevnet.lan")
    by_mac = {h["hwaddr"]: h for h in api.hosts.values()}
    assert (by_mac["02:de:21:11:01:00"]["ip"], by_mac["02:de:21:11:01:00"]["domain"]) == (
        "10.110.0.11", "acme.deevnet.lan")

    del api.ranges[foreign]
    second = opn.sync(_client(url, cert), reservations(site), dry_run=False, tenants=site.tenants)
    assert second.ok and [(c.action, c.key) for c in second.changes if c.action != "unchanged"] == [
        ("create", "globex")]
    writes = api.writes
    third = opn.sync(_client(url, cert), reservations(site), dry_run=False, tenants=site.tenants)
    assert third.writes == 0 and api.writes == writes

    uid = next(u for u, r in api.ranges.items() if r["domain"] == "acme.deevnet.lan")
    api.ranges[uid]["end_addr"] = "10.110.0.120"
    fixed = opn.sync(_client(url, cert), reservations(site), dry_run=False,
                     tenants={"acme": site.tenants["acme"]})
    changed = {(c.action, c.key): c.diff for c in fixed.changes if c.kind == "range" and c.action != "unchanged"}
    assert changed == {("update", "acme"): {"end_addr": ("10.110.0.120", "10.110.0.199")},
                       ("delete", "globex"): {}}
    assert {r["domain"] for r in api.ranges.values()} == {"acme.deevnet.lan"}


def test_tenant_vlan_devices_converge_on_the_trunk_and_a_foreign_one_is_left_alone(fake: Any) -> None:
    api, url, cert = fake
    site = load_site(TENANTS, REPO_ROOT / "packer/images.yml")
    foreign = api.add_foreign("vlan", **{"if": "vtnet1", "tag": "999", "descr": "uplink", "vlanif": "vlan099"})
    first = opn.sync(_client(url, cert), reservations(site), dry_run=False, tenants=site.tenants, vlan_parent="vtnet1")
    assert first.ok and [(c.action, c.key) for c in first.changes if c.kind == "vlan"] == [
        ("create", "acme"), ("create", "globex")]
    assert first.reconfigured == ["interfaces/vlan_settings/reconfigure", "dnsmasq/service/reconfigure"]
    ours = {v["tag"]: v for v in api.vlans.values() if v["descr"].startswith(opn.MARKER)}
    assert {tag: v["if"] for tag, v in ours.items()} == {"110": "vtnet1", "120": "vtnet1"}
    assert api.vlans[foreign]["descr"] == "uplink"

    again = opn.sync(_client(url, cert), reservations(site), dry_run=False, tenants=site.tenants, vlan_parent="vtnet1")
    assert again.writes == 0 and again.reconfigured == [] and api.vlan_reconfigures == 1

    # a foreign device holding a tenant's tag on the trunk is a conflict, never taken over
    uid = next(u for u, v in api.vlans.items() if v["tag"] == "120")
    del api.vlans[uid]
    api.add_foreign("vlan", **{"if": "vtnet1", "tag": "120", "descr": "someone's", "vlanif": "vlan07"})
    clash = opn.sync(_client(url, cert), reservations(site), dry_run=True, tenants=site.tenants, vlan_parent="vtnet1")
    assert not clash.ok and [(c.action, c.key) for c in clash.changes if c.kind == "vlan"] == [
        ("unchanged", "acme"), ("conflict", "globex")]
