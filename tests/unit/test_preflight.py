"""preflight against an in-process fakepve (real HTTPS, real token auth, real ACL answers).

The SSH-based checks (ssh, space) need a real sshd: they are covered in tests/lab/test_preflight.py.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from fakepve.certs import make_cert

from image_factory import preflight as pf
from image_factory.errors import FactoryError, ValidationFailed
from image_factory.image.manifest import save
from image_factory.lab import factories
from image_factory.settings import Settings
from image_factory.site.inventory import load_site

pytestmark = pytest.mark.unit

TOKEN = "factory@pve!image-factory"  # noqa: S105 - a token id
SECRET = "0b7f4a3e-unit-test-secret"  # noqa: S105 - test fixture
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBIKjPbOcAwqThWzRa5Ex/b92J/o3wlQ7KdlVFOwg5BD"
GRANTS = {
    "/vms": pf.VM_PRIVILEGES,
    "/storage": ("Datastore.AllocateSpace", "Datastore.AllocateTemplate", "Datastore.Audit"),
    "/sdn/zones/localnetwork": ("SDN.Use",),
    "/": ("Sys.Audit",),
}
API_CHECKS = tuple(c for c in pf.DEPLOY_CHECKS if c != "ssh")  # everything but ssh and space


def _grant(pve, grants):
    pve.acl = {}
    for path, privs in grants.items():
        for who in (TOKEN, TOKEN.split("!")[0]):
            pve.grant(who, path, *privs)


@pytest.fixture
def node(fakepve):
    """A fakepve shaped like a prepared PVE 8.4 node (the state hypervisor.yml leaves)."""
    fakepve.version, fakepve.release_version = "8.4.1", "8.4"
    fakepve.apitokens[TOKEN] = SECRET
    _grant(fakepve, GRANTS)
    fakepve.storages["local"]["content"] = "iso,vztmpl,backup,import"
    fakepve.add_vm(9001, "tpl-fedora-44-x", node="pve1", template=True, config={"tags": "image-factory;fedora"})
    fakepve.add_vm(500, "unrelated", node="pve1")  # outside both ranges: none of the factory's business
    return fakepve


def _site(tmp_path: Path, url: str, *, ca: str | None = None, fingerprint: str | None = None, bridge: str = "vmbr0"):
    tls = f"tls_ca_file: {ca}" if ca else f'tls_fingerprint: "{fingerprint}"'
    inv = tmp_path / "hosts.yml"
    inv.write_text(textwrap.dedent(f"""\
        all:
          children:
            hypervisors:
              hosts:
                hv-unit:
                  pve:
                    role: mgmt
                    node: pve1
                    api_url: {url}
                    token_id: "{TOKEN}"
                    token_secret_env: PREFLIGHT_UNIT_SECRET
                    {tls}
                    ssh: {{host: 127.0.0.1, port: 1, host_key: "{HOST_KEY}"}}
                    bridge: {bridge}
                    template_vmids: {{first: 9000, last: 9099}}
                    vm_vmids: {{first: 1000, last: 1999}}
            mgmt:
              hosts:
                unit-vm:
                  vm: {{vmid: 1001, image: tiny, role: unit, nics: [{{mac: "02:de:10:09:01:00"}}]}}
        """))
    images = tmp_path / "images.yml"
    images.write_text(textwrap.dedent("""\
        images:
          tiny:
            family: debian
            release: 12
            mode: cloud
            disk_size: 2G
            source: {url: fixtures/tiny.qcow2, checksum: none}
        """))
    settings = Settings.from_mapping({"inventory": str(inv), "images": str(images), "builds_dir": str(tmp_path / "b")})
    return settings, load_site(inv, images)


@pytest.fixture
def env(node, fakepve_cafile, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFLIGHT_UNIT_SECRET", SECRET)
    return _site(tmp_path, node.url, ca=fakepve_cafile)


def _writes(pve) -> list[tuple[str, str]]:
    return [(m, p) for m, p, _ in pve.requests if m != "GET"]


def test_prepared_node_passes_every_api_check(node, env):
    report = pf.run_preflight(*env, checks=API_CHECKS)
    assert report.ok, report.to_dict()
    assert [r.name for r in report.hosts["hv-unit"]] == list(API_CHECKS)
    assert "PVE 8.4.1" in report.result("hv-unit", "version").detail
    assert "(1 owned)" in report.result("hv-unit", "vmids").detail
    report.raise_for_failures()  # no exception
    assert _writes(node) == []
    assert any(p.endswith("/access/permissions") for _, p, _ in node.requests)


def test_missing_privilege_is_named_with_its_path_and_fix(node, env):
    lacking = dict(GRANTS, **{"/vms": tuple(p for p in pf.VM_PRIVILEGES if p != "VM.Clone")})
    _grant(node, lacking)
    report = pf.run_preflight(*env, checks=API_CHECKS)
    r = report.result("hv-unit", "privileges")
    assert not r.ok and not report.ok
    assert r.detail == f"token {TOKEN} lacks VM.Clone on /vms"
    assert f"pveum acl modify /vms --users factory@pve --tokens '{TOKEN}' --roles ImageFactory" in r.hint
    with pytest.raises(pf.PreflightFailed) as info:
        report.raise_for_failures()
    assert isinstance(info.value, FactoryError)
    assert "hv-unit: privileges: token factory@pve!image-factory lacks VM.Clone on /vms" in str(info.value)
    assert "fix: ansible-playbook ansible/playbooks/hypervisor.yml -l hv-unit" in str(info.value)
    assert _writes(node) == []


def test_privileges_per_storage_and_node_paths(node, env):
    _grant(node, {"/vms": pf.VM_PRIVILEGES, "/storage/local-lvm": ("Datastore.AllocateSpace", "Datastore.Audit"),
                  "/sdn/zones/localnetwork/vmbr0": ("SDN.Use",), "/nodes/pve1": ("Sys.Audit",),
                  "/storage/local": ("Datastore.AllocateSpace", "Datastore.Audit")})
    r = pf.run_preflight(*env, checks=["privileges"]).result("hv-unit", "privileges")
    assert r.detail == f"token {TOKEN} lacks Datastore.AllocateTemplate on /storage/local"


def test_import_content_disabled(node, env):
    node.storages["local"]["content"] = "iso,vztmpl,backup"
    r = pf.run_preflight(*env, checks=API_CHECKS).result("hv-unit", "storage")
    assert not r.ok
    assert "storage 'local' lacks content type import (has: iso,vztmpl,backup)" in r.detail
    assert r.hint == "pvesm set local --content iso,vztmpl,backup,import"
    assert _writes(node) == []


def test_missing_storage(node, env):
    del node.storages["local-lvm"]
    r = pf.run_preflight(*env, checks=["storage"]).result("hv-unit", "storage")
    assert "storage 'local-lvm' not found on node pve1" in r.detail


def test_old_pve_version(node, env):
    node.version, node.release_version = "7.4-3", "7.4"
    report = pf.run_preflight(*env, checks=API_CHECKS)
    r = report.result("hv-unit", "version")
    assert not r.ok
    assert r.detail == "PVE 7.4-3 on pve1 is older than 8.4: `import` uploads need 8.4 or newer"
    assert "upgrade pve1" in r.hint
    # the other checks still ran: one failure does not hide the others
    assert report.result("hv-unit", "privileges").ok


def test_wrong_ca_fails_tls_and_skips_the_rest(node, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFLIGHT_UNIT_SECRET", SECRET)
    other_ca = make_cert(str(tmp_path), name="other", hosts=("127.0.0.1",))[0]
    before = len(node.requests)
    report = pf.run_preflight(*_site(tmp_path, node.url, ca=other_ca), checks=API_CHECKS)
    r = report.result("hv-unit", "tls")
    assert not r.ok and "TLS verification of" in r.detail and "CERTIFICATE_VERIFY_FAILED" in r.detail
    assert "pve-root-ca.pem" in r.hint
    token = report.result("hv-unit", "token")
    assert token.skipped and token.status == "skip"
    assert [x.name for _, x in report.failures()] == ["tls"]
    assert len(node.requests) == before  # no request reached the API


def test_wrong_fingerprint(node, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFLIGHT_UNIT_SECRET", SECRET)
    fp = ":".join(["AB"] * 32)
    r = pf.run_preflight(*_site(tmp_path, node.url, fingerprint=fp), checks=["tls"]).result("hv-unit", "tls")
    assert not r.ok and "Fingerprints did not match" in r.detail
    assert "tls_fingerprint" in r.hint


def test_right_fingerprint_passes(node, fakepve_cafile, tmp_path, monkeypatch):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    monkeypatch.setenv("PREFLIGHT_UNIT_SECRET", SECRET)
    cert = x509.load_pem_x509_certificate(Path(fakepve_cafile).read_bytes())
    fp = ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))
    report = pf.run_preflight(*_site(tmp_path, node.url, fingerprint=fp), checks=["version"])
    assert report.ok, report.to_dict()
    assert "pinned fingerprint" in report.result("hv-unit", "tls").detail


def test_bad_token_secret(node, env, monkeypatch):
    monkeypatch.setenv("PREFLIGHT_UNIT_SECRET", "not-the-secret")
    report = pf.run_preflight(*env, checks=API_CHECKS)
    assert report.result("hv-unit", "tls").ok
    r = report.result("hv-unit", "token")
    assert not r.ok and r.detail == f"token {TOKEN} is refused: authentication failure"
    assert "pveum user token list factory@pve" in r.hint
    assert report.result("hv-unit", "privileges").skipped


def test_unset_secret_is_a_token_failure_without_contacting_the_node(node, env, monkeypatch):
    monkeypatch.delenv("PREFLIGHT_UNIT_SECRET")
    before = len(node.requests)
    r = pf.run_preflight(*env, checks=["token"]).result("hv-unit", "token")
    assert not r.ok and "PREFLIGHT_UNIT_SECRET is not set" in r.detail
    assert len(node.requests) == before


def test_missing_bridge(node, fakepve_cafile, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFLIGHT_UNIT_SECRET", SECRET)
    r = pf.run_preflight(*_site(tmp_path, node.url, ca=fakepve_cafile, bridge="vmbr9"),
                         checks=["bridge"]).result("hv-unit", "bridge")
    assert not r.ok and r.detail == "bridge vmbr9 does not exist on pve1 (has: vmbr0)"
    assert "ifreload -a" in r.hint


def test_foreign_guest_in_a_range(node, env):
    node.add_vm(1500, "someone-elses", node="pve1", config={"tags": "prod"})
    r = pf.run_preflight(*env, checks=["vmids"]).result("hv-unit", "vmids")
    assert not r.ok
    assert r.detail == "VM 1500 (someone-elses) in vm_vmids is not tagged image-factory"
    assert "pve.template_vmids / pve.vm_vmids" in r.hint


def test_inventory_mac_on_another_vm_is_named_with_host_vmid_and_nic(node, env):
    ok = pf.run_preflight(*env, checks=["macs"]).result("hv-unit", "macs")
    assert ok.ok, ok.detail
    node.add_vm(501, "hand-made", node="pve1", config={"net1": "e1000=02:DE:10:09:01:00,bridge=vmbr0"})
    r = pf.run_preflight(*env, checks=["macs"]).result("hv-unit", "macs")
    assert not r.ok
    assert r.detail == "unit-vm nics[0] 02:de:10:09:01:00 is already used by hv-unit VMID 501 (hand-made) net1"
    assert "mac.generate" in r.hint


def test_unknown_hypervisor_and_check_are_refused_before_any_request(node, env):
    before = len(node.requests)
    with pytest.raises(ValidationFailed, match="no such hypervisor"):
        pf.run_preflight(*env, ["nope"])
    with pytest.raises(ValueError, match="unknown preflight check"):
        pf.run_preflight(*env, checks=["tls", "nonsense"])
    assert len(node.requests) == before


def test_to_dict_is_json_and_complete(node, env):
    node.storages["local"]["content"] = "iso"
    d = pf.run_preflight(*env, checks=API_CHECKS).to_dict()
    json.dumps(d)
    assert d["ok"] is False and d["hosts"]["hv-unit"]["ok"] is False
    storage = next(c for c in d["hosts"]["hv-unit"]["checks"] if c["name"] == "storage")
    assert storage["status"] == "FAIL" and storage["hint"] == "pvesm set local --content iso,import"


# ------------------------------------------------------------------------------ pure functions


def test_expand_checks_adds_prerequisites_in_order():
    assert pf.expand_checks(["space"]) == ("tls", "ssh", "token", "space")
    assert pf.expand_checks(None) == pf.ALL_CHECKS
    assert set(pf.DEPLOY_CHECKS) < set(pf.PUBLISH_CHECKS) == set(pf.ALL_CHECKS)
    # deploy holds its host lock over SSH, so it checks SSH; it uploads nothing
    assert "ssh" in pf.DEPLOY_CHECKS and "space" not in pf.DEPLOY_CHECKS


def test_a_new_check_is_one_declaration(node, env, monkeypatch):
    """Declared once (name, prerequisites, step), it runs after what it needs, and a failure of what it needs
    skips it; every other check is untouched."""
    monkeypatch.setattr("image_factory.preflight.registry.CHECKS", dict(pf.CHECKS))
    seen: list[str] = []

    @pf.check("ntp")
    def check_ntp(probe: pf.HostProbe) -> pf.Outcome:
        seen.append(probe.hv.name)
        assert probe.client is not None  # its prerequisites (tls, token) ran first and passed
        return pf.failed("clock is 90 s off", "run chronyc makestep")

    assert pf.expand_checks(["ntp"]) == ("tls", "token", "ntp")
    report = pf.run_preflight(*env, checks=["ntp"])
    assert seen == ["hv-unit"] and [r.name for r in report.hosts["hv-unit"]] == ["tls", "token", "ntp"]
    assert report.failures()[0][1] == pf.CheckResult("ntp", False, "clock is 90 s off", "run chronyc makestep")
    with pytest.raises(ValueError, match="declared twice"):
        pf.check("ntp")(check_ntp)


def test_parse_version():
    assert pf.parse_version("8.4.1") == (8, 4, 1)
    assert pf.parse_version("7.4-3") == (7, 4, 3)
    assert pf.parse_version("9.0") == (9, 0, 0)
    assert pf.parse_version("garbage") is None


def test_effective_privileges_reads_both_answer_shapes():
    # PVE with ?path=: exactly that path, already effective; the value is the propagate flag
    assert pf.effective_privileges({"/vms": {"VM.Audit": 1, "VM.Clone": 0}}, "/vms") == {"VM.Audit", "VM.Clone"}
    # ACL entries above the path: union of what propagates; unrelated paths ignored
    answer = {"/": {"Sys.Audit": 1}, "/storage": {"Datastore.Audit": 1, "Datastore.Allocate": 0},
              "/storage/other": {"X": 1}}
    assert pf.effective_privileges(answer, "/storage/local") == {"Sys.Audit", "Datastore.Audit"}
    assert pf.effective_privileges({"/vmsx": {"VM.Audit": 1}}, "/vms") == set()


def test_required_privileges_are_exactly_the_documented_list():
    assert sorted(pf.REQUIRED_PRIVILEGES) == sorted([
        "VM.Allocate", "VM.Clone", "VM.Config.Disk", "VM.Config.CDROM", "VM.Config.Cloudinit",
        "VM.Config.Network", "VM.Config.Options", "VM.Config.HWType", "VM.Config.Memory", "VM.Config.CPU",
        "VM.PowerMgmt", "VM.Audit", "Datastore.AllocateSpace", "Datastore.AllocateTemplate", "Datastore.Audit",
        "SDN.Use", "Sys.Audit",
        "VM.Monitor",  # beyond pve-facts' list: PVE 8.4 checks it for guest-agent calls (deploy readiness)
    ])


def test_largest_artifact_prefers_manifests_over_catalogue(env):
    settings, site = env
    need = pf.largest_artifact(settings, site)
    assert need.bytes == 2 * 1024**3 and "no build yet" in need.source
    m = factories.manifest("tiny", virtual_size=2 * 1024**3, disk_size=123456789)
    save(settings.builds_dir / "tiny", m)
    need = pf.largest_artifact(settings, site)
    assert need.bytes == 123456789 and "build b1" in need.source


def test_report_table_has_one_row_per_host_and_check():
    report = pf.PreflightReport(
        hosts={"a": [pf.CheckResult("tls", True, "fine")],
               "b": [pf.CheckResult("tls", False, "bad", "do x"), pf.CheckResult("token", False, "", "", True)]},
        checks=("tls", "token"),
    )
    table = pf.render_table(report)
    assert table.row_count == 3
    assert not report.ok and [(h, r.name) for h, r in report.failures()] == [("b", "tls")]


def test_unreachable_api_fails_tls_with_a_hint(fakepve_cafile, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFLIGHT_UNIT_SECRET", SECRET)
    report = pf.run_preflight(*_site(tmp_path, "https://127.0.0.1:1", ca=fakepve_cafile), checks=["token"])
    r = report.result("hv-unit", "tls")
    assert not r.ok and r.detail.startswith("cannot reach https://127.0.0.1:1")
    assert r.hint.startswith("check pve.api_url (https://127.0.0.1:1) and that pveproxy runs on pve1")
    assert report.result("hv-unit", "token").skipped


def test_api_error_and_odd_answer_fail_only_their_check(node, env):
    from image_factory.pve.client import PveClient

    class Odd(PveClient):
        def call(self, method, path, /, **params):
            if path == "/cluster/resources":
                return ["not-a-guest"]
            return super().call(method, path, **params)

    node.fail("GET", "/nodes/pve1/network", status=500, message="ifupdown2 exploded")
    report = pf.run_preflight(*env, checks=API_CHECKS, client_factory=lambda hv: Odd(hv, timeout=10))
    bridge = report.result("hv-unit", "bridge")
    assert not bridge.ok and bridge.detail == "GET /nodes/pve1/network: HTTP 500: ifupdown2 exploded"
    assert "pveproxy runs" in bridge.hint
    vmids = report.result("hv-unit", "vmids")
    assert not vmids.ok and vmids.detail.startswith("unexpected AttributeError")
    assert [r.name for _, r in report.failures()] == ["bridge", "vmids"]


def test_pve9_node_holding_the_84_role_names_what_is_missing_with_a_fix_valid_on_9(node, env):
    node.version, node.release_version = "9.1.4", "9.1"
    r = pf.run_preflight(*env, checks=["version", "privileges"])
    version = r.result("hv-unit", "version")
    assert version.ok and "end of life" not in version.detail
    priv = r.result("hv-unit", "privileges")
    assert not priv.ok
    assert "VM.GuestAgent.Audit, VM.GuestAgent.FileRead on /vms" in priv.detail and "PVE 9" in priv.hint
    assert f"pveum role modify ImageFactory --privs {','.join(pf.required_privileges(9))}" in priv.hint
    assert "VM.Monitor" not in priv.hint  # pveum on 9 refuses the name
    _grant(node, {**GRANTS, "/vms": pf.vm_privileges(9)})
    assert pf.run_preflight(*env, checks=["privileges"]).result("hv-unit", "privileges").ok


def test_pve8_is_reported_as_end_of_life(node, env):
    r = pf.run_preflight(*env, checks=["version"]).result("hv-unit", "version")
    assert r.ok and "reached its end of life in August 2026" in r.detail and "pve8to9" in r.detail


@pytest.mark.parametrize(("iface", "detail"), [
    ({"type": "bridge", "bridge_vlan_aware": 1, "bridge_vids": "2-4094"}, None),
    ({"type": "bridge", "bridge_vlan_aware": 1}, None),  # no bridge_vids: PVE's default for a VLAN-aware bridge
    ({"type": "OVSBridge"}, None),
    ({"type": "bridge"},
     "bridge vmbr1 is not VLAN-aware, but vlan 99 (jump01 nic1), vlan 300 (a nic0, b nic0) use VLAN tags"),
    ({"type": "bridge", "bridge_vlan_aware": 1, "bridge_vids": "99"},
     "bridge vmbr1 carries VLANs 99, not vlan 300 (a nic0, b nic0)"),
    ({"type": "bridge", "bridge_vlan_aware": 1, "bridge_vids": "99 x"},
     "bridge vmbr1: bridge_vids '99 x' does not parse"),
])
def test_vlan_problems_name_bridge_vlan_and_nics(iface, detail):
    problems = pf.vlan_problems("vmbr1", iface, {99: ["jump01 nic1"], 300: ["a nic0", "b nic0"]})
    assert (problems == []) if detail is None else problems[0].startswith(detail)


@pytest.mark.parametrize(("options", "policy"), [
    ({"allowed-tags": []}, ("free", set(), set())),  # Sys.Audit and nothing set: PVE's defaults
    ({"user-tag-access": {"user-allow": "free"}}, ("free", set(), set())),
    ({"user-tag-access": {"user-allow": "list", "user-allow-list": ["A", "b"]}, "registered-tags": ["prod"]},
     ("list", {"a", "b"}, {"prod"})),
    ({"user-tag-access": {"user-allow": "existing"}}, ("existing", set(), set())),
])
def test_tag_policy_reads_pve_managers_shapes(options, policy):
    assert pf.tag_policy(options) == policy


@pytest.mark.parametrize(("options", "named"), [
    ({"user-tag-access": "user-allow=free"}, "user-tag-access is 'user-allow=free', not an object"),
    ({"registered-tags": "a;b"}, "registered-tags is 'a;b', not an array"),
    ({"user-tag-access": {"user-allow": "list", "user-allow-list": "a;b"}}, "user-allow-list is 'a;b'"),
])
def test_tag_policy_of_another_shape_is_named(options, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        pf.tag_policy(options)


def test_a_refused_tag_says_how_to_fix_it():
    from image_factory.pve.client import explain

    message = "unable to create VM 9001 - Permission check failed (/, Sys.Modify for modifying tag 'b-1')"
    text = explain(message)
    assert text.startswith(message) and "tag 'b-1'" in text and "--user-tag-access user-allow=free" in text
    assert explain("VM is locked (backup)") == "VM is locked (backup)"


def test_tags_check_warns_where_the_policy_cannot_be_read(node, env):
    """Without Sys.Audit on / the answer holds no policy: unknown, a warning (the run goes on), never "free"."""
    from image_factory.pve.client import PveClient

    class Pve(PveClient):  # fakepve refuses get_options without Sys.Audit; PVE answers (the lab does too)
        def call(self, method, path, /, **params):
            if path == "/cluster/options":
                return {"allowed-tags": ["image-factory"]}
            return super().call(method, path, **params)

    _grant(node, {p: v for p, v in GRANTS.items() if p != "/"})
    report = pf.run_preflight(*env, checks=["tags"], client_factory=lambda hv: Pve(hv, timeout=10))
    r = report.result("hv-unit", "tags")
    assert report.ok and r.status == "WARN" and "unknown (needs Sys.Audit on /)" in r.detail
    assert "user-allow=free" not in r.detail and "pvesh get /cluster/options" in r.hint
    assert report.to_dict()["hosts"]["hv-unit"]["checks"][-1]["status"] == "WARN"


def test_firmware_check_refuses_keys_the_hosts_pve_cannot_enrol_and_passes_on_9_2(node, env, tmp_path):
    settings, site = env
    images = Path(settings.images)
    images.write_text(images.read_text() + textwrap.indent(textwrap.dedent("""\
        tiny-sb:
          family: debian
          release: 12
          mode: cloud
          firmware: uefi
          secure_boot: true
          keys: microsoft-2011+2023
          tpm: true
          source: {url: fixtures/tiny.qcow2, checksum: none}
        """), "  "))
    site = load_site(Path(settings.inventory), images)
    report = pf.run_preflight(settings, site, checks=["firmware"])
    r = report.result("hv-unit", "firmware")
    assert not r.ok and r.detail.startswith("tiny-sb: keys: microsoft-2011+2023 needs Microsoft's 2023 UEFI CAs")
    assert "PVE 8.4.1 cannot do" in r.detail and "upgrade the host to PVE 9.1.19" in r.detail
    assert "change the entry's keys in the catalogue" in r.hint and _writes(node) == []
    node.version, node.release_version = "9.2.5", "9.2"
    r = pf.run_preflight(settings, site, checks=["firmware"]).result("hv-unit", "firmware")
    assert r.ok and "tiny-sb (uefi,machine=q35,secure_boot=yes,keys=microsoft-2011+2023,tpm=v2.0)" in r.detail
    assert pf.run_preflight(settings, site, checks=["firmware"], images=["tiny"]).result("hv-unit", "firmware").ok
