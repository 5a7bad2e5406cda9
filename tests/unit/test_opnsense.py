"""opnsense.sync against the lab's loopback OPNsense API (lab/opnsense_fake.py: OPNsense 25.7+ Dnsmasq shapes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakepve.certs import make_cert

from image_factory.errors import FactoryError
from image_factory.handoffs import opnsense as opn
from image_factory.handoffs.dhcp import export, reservations
from image_factory.lab.opnsense_fake import FakeOpnsense, serve
from image_factory.settings import REPO_ROOT
from image_factory.site.inventory import load_site

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
    assert report.refused and api.writes == 0 and api.reconfigures == 0, "a refused run writes nothing at all"


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


def test_a_ca_file_that_cannot_be_loaded_is_named_before_any_request(tmp_path: Path) -> None:
    (tmp_path / "not-a-cert.pem").write_text("hello\n")
    for ca_file in (tmp_path / "missing.pem", tmp_path / "not-a-cert.pem"):
        with pytest.raises(opn.OpnsenseError, match=f"CA file {ca_file}: cannot be loaded"):
            opn.OpnsenseClient("https://127.0.0.1:1", KEY, SECRET, ca_file=ca_file)


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
    assert done["reconfigured"] and len(api.hosts) == len(planned["changes"]) and not _pending_markers(api)
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
    refused = opn.sync(_client(url, cert), reservations(site), dry_run=False, tenants=site.tenants)
    assert [(c.action, c.key) for c in refused.changes if c.kind == "range"] == [
        ("create", "acme"), ("conflict", "globex")]
    assert refused.refused and not refused.ok and api.writes == 0 and api.reconfigures == 0
    del api.ranges[foreign]
    first = opn.sync(_client(url, cert), reservations(site), dry_run=False, tenants=site.tenants)
    assert first.ok and api.reconfigures == 1 and api.vlan_reconfigures == 0 and api.vlans == {}
    assert first.notes == ["tenant VLAN devices not managed: give --vlan-parent (the trunk to the tenant bridge)"]
    acme = next(r for r in api.ranges.values() if r["description"].startswith(opn.MARKER))
    assert (acme["start_addr"], acme["end_addr"], acme["subnet_mask"], acme["domain_type"], acme["domain"]) == (
        "10.110.0.100", "10.110.0.199", "255.255.255.0", "range", "acme.deevnet.lan")
    by_mac = {h["hwaddr"]: h for h in api.hosts.values()}
    assert (by_mac["02:de:21:11:01:00"]["ip"], by_mac["02:de:21:11:01:00"]["domain"]) == (
        "10.110.0.11", "acme.deevnet.lan")

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


def _pending_markers(api: FakeOpnsense) -> list[str]:
    return [t["tag"] for t in api.tags.values() if t["tag"].startswith(opn.PENDING)]


def _tenant_site() -> Any:
    return load_site(TENANTS, REPO_ROOT / "packer/images.yml")


def _sync(url: str, cert: str, site: Any, *, dry_run: bool = False, **kw: Any) -> opn.SyncReport:
    return opn.sync(_client(url, cert), reservations(site), dry_run=dry_run, tenants=site.tenants,
                    vlan_parent="vtnet1", **kw)


WRITE_VERBS = ("/add_", "/set_", "/del_", "reconfigure")


def test_a_run_opnsense_would_refuse_part_way_writes_nothing_and_an_interrupted_one_is_applied_next(
        fake: Any) -> None:
    """The issue's case: a foreign DHCP host holds a tenant VM's address (OPNsense refuses the duplicate, as
    Dnsmasq.php does). The run refuses before its first write; once fixed, a run cut off after its writes leaves
    them marked pending in OPNsense, and the next run, with nothing left to write, applies them."""
    api, url, cert = fake
    site = _tenant_site()
    squatter = api.add_foreign(host="old-db", domain="acme.deevnet.lan", ip="10.110.0.12",
                               hwaddr="aa:bb:cc:00:00:12", descr="hand-made")
    # a tenant that left the inventory, its VLAN device still assigned as an interface
    gone = api.add_foreign("vlan", **{"if": "vtnet1", "tag": "130", "vlanif": "vlan03",
                                      "descr": f"{opn.MARKER} tenant initech: 10.130.0.0/24, gateway 10.130.0.1"})
    api.assign(gone, "INITECH")
    plan = _sync(url, cert, site, dry_run=True)
    refused = _sync(url, cert, site)
    for report in (plan, refused):
        (conflict,) = [c for c in report.changes if c.action == "conflict"]
        assert (conflict.kind, conflict.key) == ("host", "02:de:21:14:01:00")
        assert "does not own holds 10.110.0.12 (old-db (aa:bb:cc:00:00:12))" in conflict.why
        (blocked,) = [c for c in report.changes if c.action == "blocked"]
        assert (blocked.kind, blocked.key) == ("vlan", "initech")
        assert blocked.why.startswith("cannot delete: assigned to INITECH")
        assert report.refused and not report.ok
    assert api.writes == 0 and not [r for r in api.requests if any(v in r for v in WRITE_VERBS)]

    del api.hosts[squatter]  # the operator removed it; the next run is cut off after its last write
    todo = _sync(url, cert, site, dry_run=True)
    api.down_after_writes = todo.writes + 2  # one pending marker per service, then the objects
    cut = _sync(url, cert, site)
    assert not cut.failed and not cut.reconfigured and set(cut.reconfigure_failed) == {
        "interfaces/vlan_settings/reconfigure", "dnsmasq/service/reconfigure"}
    assert "HTTP 503: Service Unavailable" in cut.reconfigure_failed["dnsmasq/service/reconfigure"]
    assert len(api.hosts) == 4 and len(api.ranges) == 2 and len(api.vlans) == 3 and api.served == {}

    api.down_after_writes = None
    plan = _sync(url, cert, site, dry_run=True)
    assert plan.writes == 0 and plan.pending == ["dnsmasq/service/reconfigure", "interfaces/vlan_settings/reconfigure"]
    again = _sync(url, cert, site)
    assert again.writes == 0 and not again.failed and not again.reconfigure_failed
    assert again.reconfigured == ["dnsmasq/service/reconfigure", "interfaces/vlan_settings/reconfigure"]
    assert api.served == {"hosts": api.hosts, "ranges": api.ranges, "options": api.options, "vlans": api.vlans}
    assert not _pending_markers(api)
    quiet = _sync(url, cert, site)
    assert quiet.reconfigured == [] and api.reconfigures == 1, "once applied, nothing is pending"
    assert not quiet.ok and [c.key for c in quiet.changes if c.action == "blocked"] == ["initech"]
    assert gone in api.vlans, "an assigned device is kept, never a failure mid-run"


def test_a_write_that_fails_part_way_still_reconfigures_what_was_saved_and_says_both(fake: Any) -> None:
    api, url, cert = fake
    site = _tenant_site()
    api.faults["POST /api/dnsmasq/settings/add_host"] = (500, {
        "errorMessage": "Unexpected error, check log for details"})
    report = _sync(url, cert, site)
    assert report.failed == ("POST /api/dnsmasq/settings/add_host: HTTP 500: Unexpected error, check log for "
                             "details") and not report.ok
    assert report.reconfigured == ["interfaces/vlan_settings/reconfigure", "dnsmasq/service/reconfigure"]
    assert len(api.served["ranges"]) == 2 and len(api.served["vlans"]) == 2 and api.hosts == {}
    assert not _pending_markers(api), "what was saved is applied: nothing stays pending"
    again = _sync(url, cert, site)
    assert again.ok and again.writes == 4 and api.served["hosts"] == api.hosts and len(api.hosts) == 4


def test_two_reservations_swapping_addresses_is_refused_before_any_write(fake: Any) -> None:
    """OPNsense checks each saved host against the others: a swap is refused at its first set, so the plan
    refuses it."""
    api, url, cert = fake
    site = _tenant_site()
    _sync(url, cert, site)
    writes = api.writes
    web, db = (next(u for u, h in api.hosts.items() if h["host"] == n) for n in ("acme-web01", "acme-db01"))
    api.hosts[web]["ip"], api.hosts[db]["ip"] = "10.110.0.12", "10.110.0.11"
    report = _sync(url, cert, site)
    conflicts = {c.name: c.why for c in report.changes if c.action == "conflict"}
    assert set(conflicts) == {"acme-web01", "acme-db01"} and all("two runs" in why for why in conflicts.values())
    assert "10.110.0.12 is still held by the factory's reservation acme-web01 (02:de:21:11:01:00)" in conflicts[
        "acme-db01"]
    assert api.writes == writes and report.refused


def test_an_assigned_vlan_device_is_planned_as_kept_and_opnsenses_words_reach_the_user(fake: Any) -> None:
    api, url, cert = fake
    site = _tenant_site()
    _sync(url, cert, site)
    acme = next(u for u, v in api.vlans.items() if v["tag"] == "110")
    api.assign(acme, "ACME")
    client = _client(url, cert)
    with pytest.raises(opn.OpnsenseError, match=(
            r"del_item/.*: HTTP 500: This VLAN cannot be deleted because it is assigned as an interface\.")):
        client.delete(opn.VLANS, acme)
    api.faults["POST /api/dnsmasq/settings/add_tag"] = (500, {"errorMessage": "a &amp; b &lt;c&gt;"})
    with pytest.raises(opn.OpnsenseError, match="add_tag: HTTP 500: a & b <c>$"):  # api.php's htmlspecialchars
        client.mark_pending("x")

    only_globex = opn.sync(client, reservations(site), dry_run=False, tenants={"globex": site.tenants["globex"]},
                           vlan_parent="vtnet1")
    (blocked,) = [c for c in only_globex.changes if c.action == "blocked"]
    assert (blocked.kind, blocked.key) == ("vlan", "acme")
    assert blocked.why.startswith("cannot delete: assigned to ACME (")
    assert not only_globex.failed and not only_globex.ok
    assert acme in api.vlans and [r["domain"] for r in api.ranges.values()] == ["globex.deevnet.lan"]


def test_the_fake_refuses_a_dhcp_host_on_another_ones_address_as_opnsense_does(fake: Any) -> None:
    api, url, cert = fake
    client = _client(url, cert)
    api.add_foreign(host="a", ip="10.0.0.5", hwaddr="02:00:00:00:00:01")
    api.add_foreign(host="dns-only", ip="10.0.0.6")  # a host override (no MAC) may share an address
    with pytest.raises(opn.OpnsenseError, match="'10.0.0.5' is already used in another DHCP host entry"):
        client.add(opn.HOSTS, opn.HostEntry("b", "", "10.0.0.5", "02:00:00:00:00:02", "x"))
    client.add(opn.HOSTS, opn.HostEntry("c", "", "10.0.0.6", "02:00:00:00:00:03", "x"))


def test_the_tasks_refuse_a_site_mac_check_refuses_and_show_a_refusal_and_a_failure(
        fake: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from invoke.context import Context
    from invoke.exceptions import Exit

    from image_factory.tasks import opnsense as tasks

    api, url, cert = fake
    monkeypatch.setenv("OPNSENSE_API_KEY", KEY)
    monkeypatch.setenv("OPNSENSE_API_SECRET", SECRET)
    args = {"url": url, "ca_file": cert, "inventory": str(TENANTS), "vlan_parent": "vtnet1"}
    # a MAC whose role byte is another role's: the site model takes it, mac.check's namespace does not
    bad = tmp_path / "hosts.yml"
    bad.write_text(TENANTS.read_text().replace('"02:de:21:14:01:00"', '"02:de:21:11:02:00"'))
    with pytest.raises(Exit) as caught:
        tasks.plan(Context(), **{**args, "inventory": str(bad)})
    # a plan's bad input exits 1 (2 means "changes pending" for a plan, docs/cli.md)
    assert caught.value.code == 1 and "byte 3 (role) 11 means app" in capsys.readouterr().err
    assert api.requests == [], "refused before any connection"

    api.add_foreign(host="old-db", ip="10.110.0.12", hwaddr="aa:bb:cc:00:00:12", descr="hand-made")
    with pytest.raises(Exit) as caught:
        tasks.sync(Context(), **args)
    err = capsys.readouterr().err
    assert caught.value.code == 1 and "refused: nothing was written" in err and "holds 10.110.0.12" in err
    assert api.writes == 0

    api.hosts.clear()
    api.faults["POST /api/dnsmasq/settings/add_host"] = (500, {"errorMessage": "Unexpected error, check log"})
    with pytest.raises(Exit) as caught:
        tasks.sync(Context(), **args)
    err = " ".join(capsys.readouterr().err.split())
    assert caught.value.code == 1 and "write failed: POST /api/dnsmasq/settings/add_host: HTTP 500: Unexpected" in err
    assert ("applied what was saved before the failure: interfaces/vlan_settings/reconfigure, "
            "dnsmasq/service/reconfigure") in err


def test_fixed_reservations_get_their_tenants_domain_through_its_tag(fake: Any) -> None:
    """domain_type range names the domain inside the dynamic pool only; the tenant's tag, set by its range and
    hosts, carries a domain-name option (15) to its fixed reservations as well."""
    api, url, cert = fake
    site = _tenant_site()
    _sync(url, cert, site)
    tags = {t["tag"]: uid for uid, t in api.tags.items()}
    acme, globex = tags["[image-factory] tenant acme"], tags["[image-factory] tenant globex"]
    by_host = {h["host"]: h for h in api.hosts.values()}
    assert {name: h["set_tag"] for name, h in by_host.items()} == {
        "acme-web01": acme, "acme-db01": acme, "globex-web01": globex, "metrics01": ""}
    assert sorted((o["type"], o["option"], o["tag"], o["value"]) for o in api.options.values()) == sorted([
        ("set", "15", acme, "acme.deevnet.lan"), ("set", "15", globex, "globex.deevnet.lan")])
    assert {r["domain"]: r["set_tag"] for r in api.ranges.values()} == {
        "acme.deevnet.lan": acme, "globex.deevnet.lan": globex}

    # a tenant that leaves takes its tag last, once nothing refers to it (OPNsense's safe delete)
    leave = opn.sync(_client(url, cert), reservations(site), dry_run=False, tenants={"acme": site.tenants["acme"]},
                     vlan_parent="vtnet1")
    assert leave.ok and not leave.failed and globex not in api.tags
    assert next(h for h in api.hosts.values() if h["host"] == "globex-web01")["set_tag"] == ""


@pytest.mark.parametrize("inventory", [TENANTS, REPO_ROOT / "ansible/inventory"])
def test_an_imported_export_is_the_factorys_own_to_sync(fake: Any, inventory: Path) -> None:
    """mac.export --format opnsense carries sync's marker and tags: merged into config.xml, sync finds every
    entry its own and equal, so it plans no conflict and no write."""
    import xml.etree.ElementTree as ET

    api, url, cert = fake
    site = load_site(inventory, REPO_ROOT / "packer/images.yml")
    root = ET.fromstring(export(site, "opnsense"))  # noqa: S314 (our own output)
    for element, items in (("hosts", api.hosts), ("dhcp_ranges", api.ranges), ("dhcp_tags", api.tags),
                           ("dhcp_options", api.options)):
        for item in root.findall(f"./dnsmasq/{element}"):
            items[item.attrib["uuid"]] = {child.tag: child.text or "" for child in item}
    assert len(api.hosts) == len(reservations(site))
    report = opn.sync(_client(url, cert), reservations(site), dry_run=False, tenants=site.tenants)
    assert report.ok and {c.action for c in report.changes} == {"unchanged"}
    assert api.writes == 0 and api.reconfigures == 0


def _ipv6_site(tmp_path: Path) -> Any:
    """jump01 with a static IPv6 address (cloudinit.ip6), metrics01 on DHCPv6 with nics[0].address6."""
    import yaml

    from .example_site import flat_example

    doc = flat_example()
    mgmt = doc["all"]["children"]["mgmt"]["hosts"]
    mgmt["jump01"]["vm"]["cloudinit"]["ip6"] = {"ip": "2001:db8:10::30/64", "gw": "2001:db8:10::1"}
    mgmt["metrics01"]["vm"]["cloudinit"]["ip6"] = "dhcp"
    mgmt["metrics01"]["vm"]["nics"][0]["address6"] = "2001:db8:10::41"
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_site(tmp_path / "hosts.yml", REPO_ROOT / "packer/images.yml")


def test_ipv6_addresses_join_the_macs_reservation_and_need_an_ipv6_range(fake: Any, tmp_path: Path) -> None:
    """The Dnsmasq host's ip list takes a NIC's IPv6 address beside its IPv4 one (dnsmasq.conf renders
    dhcp-host=<mac>,<ipv4>,[<ipv6>]); the report names the addresses no IPv6 range serves until one does."""
    api, url, cert = fake
    rs = reservations(_ipv6_site(tmp_path))
    first = opn.sync(_client(url, cert), rs, dry_run=False)
    assert first.ok, first.to_dict()
    ips = {h["host"]: h["ip"] for h in api.hosts.values()}
    assert ips["jump01"] == "192.168.10.30,2001:db8:10::30" and ips["metrics01"] == "2001:db8:10::41"
    [note] = [n for n in first.notes if n.startswith("IPv6")]
    assert "jump01 2001:db8:10::30, metrics01 2001:db8:10::41" in note and "mode static" in note

    api.add_foreign("range", start_addr="2001:db8:10::", mode="static", description="mgmt v6, by hand")
    writes = api.writes
    second = opn.sync(_client(url, cert), rs, dry_run=False)
    assert {c.action for c in second.changes} == {"unchanged"} and api.writes == writes
    assert not [n for n in second.notes if n.startswith("IPv6")], "the range's /64 (the default) serves both"


def test_a_foreign_dhcp_host_on_an_inventory_ipv6_address_refuses_the_run(fake: Any, tmp_path: Path) -> None:
    api, url, cert = fake
    api.add_foreign(host="old", ip="2001:db8:10::41", hwaddr="aa:00:00:00:00:41", descr="hand-made")
    api.add_foreign(host="partial", ip="::30", hwaddr="aa:00:00:00:00:30", descr="a constructed range's host part")
    report = opn.sync(_client(url, cert), reservations(_ipv6_site(tmp_path)), dry_run=False)
    [conflict] = [c for c in report.changes if c.action == "conflict"]
    assert conflict.name == "metrics01" and "holds 2001:db8:10::41 (old (aa:00:00:00:00:41))" in conflict.why
    assert report.refused and api.writes == 0


def test_the_fake_takes_ipv6_as_the_dnsmasq_model_does(fake: Any) -> None:
    api, url, cert = fake
    client = _client(url, cert)
    with pytest.raises(opn.OpnsenseError, match="only a single address is allowed"):
        client.add(opn.HOSTS, opn.HostEntry("a", "", "10.0.0.5,10.0.0.6", "02:00:00:00:00:01", "x"))
    client.add(opn.HOSTS, opn.HostEntry("a", "", "10.0.0.5,2001:db8::5,2001:db8::6", "02:00:00:00:00:01", "x"))
    with pytest.raises(opn.OpnsenseError, match="'2001:db8::6' is already used in another DHCP host entry"):
        client.add(opn.HOSTS, opn.HostEntry("b", "", "2001:db8::6", "02:00:00:00:00:02", "x"))
    client.add(opn.HOSTS, opn.HostEntry("c", "", "::5", "02:00:00:00:00:03", "x"))
    client.add(opn.HOSTS, opn.HostEntry("d", "", "::5", "02:00:00:00:00:04", "x"))  # partial ones may repeat
