"""preflight's access checks against the lab: TLS pins, SSH host keys, the token's privileges."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from fakepve.certs import make_cert

from image_factory import preflight as pf
from image_factory.lab.pytest_plugin import LabHandle
from image_factory.pve.sshlink import fingerprint

from .lab_nodes import Twin, assert_failure, lab_snapshot, recorder, with_hv

pytestmark = pytest.mark.lab


def test_wrong_ca(fresh_lab: LabHandle, tmp_path: Path):
    other_ca = make_cert(str(tmp_path), name="other-ca", hosts=(fresh_lab.config.host("pve-mgmt").address,))[0]
    site = with_hv(fresh_lab.site, "pve-mgmt", tls_ca_file=Path(other_ca))
    before = lab_snapshot(fresh_lab)
    sent, factory = recorder()
    report = pf.run_preflight(fresh_lab.settings, site, client_factory=factory)
    assert_failure(report, "pve-mgmt", "tls", "TLS verification of https://", "CERTIFICATE_VERIFY_FAILED",
                   hint="copy /etc/pve/pve-root-ca.pem from the node over a trusted channel to " + other_ca)
    assert report.result("pve-mgmt", "privileges").skipped  # nothing was asked over an unverified channel
    assert report.result("pve-tenant", "privileges").ok  # the other host is checked independently
    assert set(sent) <= {"GET"}
    assert lab_snapshot(fresh_lab) == before


def test_wrong_fingerprint(fresh_lab: LabHandle):
    site = with_hv(fresh_lab.site, "pve-tenant", tls_fingerprint=":".join(["5A"] * 32))
    report = pf.run_preflight(fresh_lab.settings, site, ["pve-tenant"])
    assert_failure(report, "pve-tenant", "tls", "Fingerprints did not match", hint="set pve.tls_fingerprint")


def test_changed_host_key(fresh_lab: LabHandle, rekeyed: str):
    before = lab_snapshot(fresh_lab)
    report = pf.run_preflight(fresh_lab.settings, fresh_lab.site)
    message = assert_failure(
        report, "pve-tenant", "ssh", "does not match the key pinned in the inventory", "Refusing to connect",
        fingerprint(*rekeyed.split()[:2]), hint="confirm the new key on its console",
    )
    assert "pve-tenant: ssh: SSH host key of 127.0." in message
    assert report.result("pve-tenant", "space").skipped  # no command was sent to that host
    assert report.result("pve-tenant", "privileges").ok
    assert report.result("pve-mgmt", "ssh").ok
    assert lab_snapshot(fresh_lab) == before


def test_changed_pin(fresh_lab: LabHandle):
    raw = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    ssh = fresh_lab.hv("pve-mgmt").ssh.model_copy(update={"host_key": raw})
    report = pf.run_preflight(fresh_lab.settings, with_hv(fresh_lab.site, "pve-mgmt", ssh=ssh), ["pve-mgmt"])
    assert_failure(report, "pve-mgmt", "ssh", f"pinned {fingerprint(*raw.split()[:2])}",
                   hint="put it in pve.ssh.host_key")


def test_token_lacking_a_privilege(twin: Twin):
    """The ImageFactory role lacks VM.Config.Cloudinit: neither the user nor its token hold it."""
    acl = twin.pve.acl
    assert acl is not None
    for who in list(acl):
        acl[who] = [(path, {p for p in privs if p != "VM.Config.Cloudinit"}) for path, privs in acl[who]]
    before = twin.state()
    report = pf.run_preflight(twin.settings, twin.site, [twin.host])
    message = assert_failure(
        report, twin.host, "privileges", "token factory@pve!image-factory lacks VM.Config.Cloudinit on /vms",
        hint="pveum acl modify /vms --users factory@pve --tokens 'factory@pve!image-factory' --roles ImageFactory",
    )
    assert "pveum role modify ImageFactory --privs " in message
    assert twin.writes() == [] and twin.state() == before


def test_privilege_missing_from_the_token_acl_only(twin: Twin):
    """PVE reports a privilege-separated token's effective rights: a grant on the user alone does not count."""
    acl = twin.pve.acl
    assert acl is not None
    token = twin.site.hypervisors[twin.host].token_id
    acl[token] = [(path, {p for p in privs if p != "VM.Clone"}) for path, privs in acl[token]]
    assert not twin.pve.allowed(token, "/vms/9001", "VM.Clone")  # the lab itself would refuse the clone
    report = pf.run_preflight(twin.settings, twin.site, [twin.host], checks=["privileges"])
    assert_failure(report, twin.host, "privileges", "lacks VM.Clone on /vms", hint="pveum acl modify /vms")


def test_pve9_host_upgraded_with_the_84_role_names_what_is_missing(twin: Twin):
    """An 8 -> 9 upgrade without re-running the playbook: PVE 9 dropped VM.Monitor from the stored role and
    nothing gave the VM.GuestAgent.* privileges. Preflight names them with a fix valid on 9; nothing changes."""
    assert twin.pve.version.startswith("9.")
    token = twin.site.hypervisors[twin.host].token_id
    acl = twin.pve.acl
    assert acl is not None
    for who in (token, token.split("!")[0]):
        acl[who] = [(path, {p for p in privs if not p.startswith("VM.GuestAgent.")}) for path, privs in acl[who]]
    before = twin.state()
    report = pf.run_preflight(twin.settings, twin.site, [twin.host], checks=["version", "privileges"])
    assert report.result(twin.host, "version").ok
    message = assert_failure(
        report, twin.host, "privileges", "lacks VM.GuestAgent.Audit, VM.GuestAgent.FileRead on /vms",
        hint=f"pveum role modify ImageFactory --privs {','.join(pf.required_privileges(9))}")
    assert "VM.Monitor" not in message
    assert twin.writes() == [] and twin.state() == before

