"""Access checks (tls, ssh's API side, token, privileges) against an in-process fakepve."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakepve.certs import make_cert

from image_factory import preflight as pf
from image_factory.errors import FactoryError

from .node import API_CHECKS, GRANTS, SECRET, TOKEN, grant, unit_site, writes

pytestmark = pytest.mark.unit


def test_missing_privilege_is_named_with_its_path_and_fix(node, env):
    lacking = dict(GRANTS, **{"/vms": tuple(p for p in pf.VM_PRIVILEGES if p != "VM.Clone")})
    grant(node, lacking)
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
    assert writes(node) == []


def test_privileges_per_storage_and_node_paths(node, env):
    grant(node, {"/vms": pf.VM_PRIVILEGES, "/storage/local-lvm": ("Datastore.AllocateSpace", "Datastore.Audit"),
                  "/sdn/zones/localnetwork/vmbr0": ("SDN.Use",), "/nodes/pve1": ("Sys.Audit",),
                  "/storage/local": ("Datastore.AllocateSpace", "Datastore.Audit")})
    r = pf.run_preflight(*env, checks=["privileges"]).result("hv-unit", "privileges")
    assert r.detail == f"token {TOKEN} lacks Datastore.AllocateTemplate on /storage/local"


def test_wrong_ca_fails_tls_and_skips_the_rest(node, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFLIGHT_UNIT_SECRET", SECRET)
    other_ca = make_cert(str(tmp_path), name="other", hosts=("127.0.0.1",))[0]
    before = len(node.requests)
    report = pf.run_preflight(*unit_site(tmp_path, node.url, ca=other_ca), checks=API_CHECKS)
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
    r = pf.run_preflight(*unit_site(tmp_path, node.url, fingerprint=fp), checks=["tls"]).result("hv-unit", "tls")
    assert not r.ok and "Fingerprints did not match" in r.detail
    assert "tls_fingerprint" in r.hint


def test_right_fingerprint_passes(node, fakepve_cafile, tmp_path, monkeypatch):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    monkeypatch.setenv("PREFLIGHT_UNIT_SECRET", SECRET)
    cert = x509.load_pem_x509_certificate(Path(fakepve_cafile).read_bytes())
    fp = ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))
    report = pf.run_preflight(*unit_site(tmp_path, node.url, fingerprint=fp), checks=["version"])
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


def test_unreachable_api_fails_tls_with_a_hint(fakepve_cafile, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFLIGHT_UNIT_SECRET", SECRET)
    report = pf.run_preflight(*unit_site(tmp_path, "https://127.0.0.1:1", ca=fakepve_cafile), checks=["token"])
    r = report.result("hv-unit", "tls")
    assert not r.ok and r.detail.startswith("cannot reach https://127.0.0.1:1")
    assert r.hint.startswith("check pve.api_url (https://127.0.0.1:1) and that pveproxy runs on pve1")
    assert report.result("hv-unit", "token").skipped


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
    grant(node, {**GRANTS, "/vms": pf.vm_privileges(9)})
    assert pf.run_preflight(*env, checks=["privileges"]).result("hv-unit", "privileges").ok


def test_the_tls_check_leaves_the_token_result_to_the_token_check(node, env, monkeypatch):
    """An unreadable secret: tls says it could not test (skip), token names the secret (FAIL); each from the probe."""
    monkeypatch.delenv("PREFLIGHT_UNIT_SECRET")
    probe = pf.HostProbe(env[1], env[1].hypervisors["hv-unit"], timeout=10)
    tls, token = pf.CHECKS["tls"].run(probe), pf.CHECKS["token"].run(probe)
    assert tls.skipped and tls.detail == "not run: token secret unavailable"
    assert not token.ok and not token.skipped and "PREFLIGHT_UNIT_SECRET is not set" in token.detail
    assert "pveum user token add" in token.hint

