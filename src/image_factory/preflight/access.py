"""Access checks: the API over verified TLS, the SSH host key and login, the token, and its privileges.

The privilege catalogue (:data:`REQUIRED_PRIVILEGES`, per PVE major) is the ImageFactory role:
ansible/roles/pve_factory/defaults/main.yml holds the same lists (a test compares them).
"""

from __future__ import annotations

from typing import Any

from image_factory.errors import FactoryError, RemoteError, TlsVerificationFailed
from image_factory.preflight.model import (
    CHECK_TLS,
    CHECK_TOKEN,
    FACTORY_ROLE,
    PLAYBOOK,
    Outcome,
    bridges_for,
    failed,
    generic_hint,
    not_run,
    passed,
    split_list,
    token_user,
)
from image_factory.preflight.probe import HostProbe
from image_factory.pve.client import ApiError
from image_factory.pve.sshlink import HostKeyMismatch
from image_factory.site.inventory import Hypervisor, Site

SDN_ZONE = "localnetwork"

VM_BASE_PRIVILEGES: tuple[str, ...] = (
    "VM.Allocate", "VM.Clone", "VM.Config.Disk", "VM.Config.CDROM", "VM.Config.Cloudinit",
    "VM.Config.Network", "VM.Config.Options", "VM.Config.HWType", "VM.Config.Memory", "VM.Config.CPU",
    "VM.PowerMgmt", "VM.Audit",
)
# Guest-agent privileges by PVE major (docs/pve-facts.md): deploy's readiness wait
# (agent/network-get-interfaces) and the guest host-key read (agent/file-read). PVE 8 checks VM.Monitor
# for every agent call; PVE 9 removed VM.Monitor (`pveum` refuses the name) and checks
# VM.GuestAgent.Audit for read-only commands and VM.GuestAgent.FileRead for file-read.
AGENT_PRIVILEGES: dict[int, tuple[str, ...]] = {
    8: ("VM.Monitor",),
    9: ("VM.GuestAgent.Audit", "VM.GuestAgent.FileRead"),
}
LATEST_MAJOR = max(AGENT_PRIVILEGES)
VM_PRIVILEGES: tuple[str, ...] = (*VM_BASE_PRIVILEGES, *AGENT_PRIVILEGES[8])  # PVE 8.4, kept for callers
STORAGE_PRIVILEGES: tuple[str, ...] = ("Datastore.AllocateSpace", "Datastore.Audit")
IMPORT_STORAGE_PRIVILEGES: tuple[str, ...] = (
    "Datastore.AllocateSpace", "Datastore.AllocateTemplate", "Datastore.Audit",
)
SDN_PRIVILEGES: tuple[str, ...] = ("SDN.Use",)
NODE_PRIVILEGES: tuple[str, ...] = ("Sys.Audit",)
# Every privilege publish and deploy use (docs/pve-facts.md, "Access"): the ImageFactory role, per
# PVE major. ansible/roles/pve_factory/defaults/main.yml holds the same lists (a test compares them).


def major_of(major: int) -> int:
    """The privilege catalogue a PVE major uses: 9's for anything newer (until a new catalogue appears)."""
    return min(max(major, min(AGENT_PRIVILEGES)), LATEST_MAJOR)


def vm_privileges(major: int) -> tuple[str, ...]:
    return (*VM_BASE_PRIVILEGES, *AGENT_PRIVILEGES[major_of(major)])


def required_privileges(major: int) -> tuple[str, ...]:
    return (*vm_privileges(major), "Datastore.AllocateSpace", "Datastore.AllocateTemplate", "Datastore.Audit",
            *SDN_PRIVILEGES, *NODE_PRIVILEGES)


REQUIRED_PRIVILEGES: tuple[str, ...] = required_privileges(8)


def required_acl(site: Site, hv: Hypervisor, major: int = 8) -> dict[str, tuple[str, ...]]:
    """ACL path -> privileges the token must hold there for this host (running PVE ``major``)."""
    need: dict[str, list[str]] = {"/vms": list(vm_privileges(major))}
    st = hv.storage
    for sid in (st.images, st.cloudinit):
        need.setdefault(f"/storage/{sid}", [])
        need[f"/storage/{sid}"] += [p for p in STORAGE_PRIVILEGES if p not in need[f"/storage/{sid}"]]
    imp = f"/storage/{st.import_}"
    need.setdefault(imp, [])
    need[imp] += [p for p in IMPORT_STORAGE_PRIVILEGES if p not in need[imp]]
    for bridge in bridges_for(site, hv):
        need[f"/sdn/zones/{SDN_ZONE}/{bridge}"] = list(SDN_PRIVILEGES)
    need[f"/nodes/{hv.node}"] = list(NODE_PRIVILEGES)
    return {path: tuple(privs) for path, privs in need.items()}


def effective_privileges(answer: Any, path: str) -> set[str]:
    """Privileges held on ``path`` from a ``GET /access/permissions?path=...`` answer.

    PVE answers ``{path: {privilege: propagate}}`` with the effective privileges on exactly that
    path (the value is the propagate flag, not whether it is held). An answer that lists ACL
    entries above the path instead is read as PVE would apply them: propagated privileges only.
    """
    held: set[str] = set()
    if not isinstance(answer, dict):
        return held
    for acl_path, privs in answer.items():
        acl_path = str(acl_path).rstrip("/") or "/"
        if isinstance(privs, dict):
            entries = {str(k): bool(v) for k, v in privs.items()}
        else:
            entries = dict.fromkeys(split_list(privs), True)
        if acl_path == path:
            held.update(entries)
        elif acl_path == "/" or path.startswith(acl_path + "/"):
            held.update(k for k, propagate in entries.items() if propagate)
    return held


# ------------------------------------------------------------------------------------- tls


def check_tls(probe: HostProbe) -> Outcome:
    """The client is built (its CA file or pin read, its secret read) and GET /version verifies the certificate.
    An unreadable secret leaves TLS untested: the token check reports it."""
    hv = probe.hv
    how = f"CA file {hv.tls_ca_file}" if hv.tls_ca_file else f"pinned fingerprint {hv.tls_fingerprint}"
    try:
        _ = probe.client  # reads the CA file or pin and the token secret
    except RemoteError as exc:  # e.g. the CA file does not exist
        return failed(exc.message, tls_hint(hv))
    except FactoryError:  # the token secret cannot be read: TLS is untested, the token is the fault
        return Outcome(False, "not run: token secret unavailable", skipped=True)
    try:
        _ = probe.version  # the first request: the TLS handshake
    except ApiError:  # TLS held; the token check reports the refusal
        pass
    except TlsVerificationFailed as exc:
        return failed(exc.message, tls_hint(hv))
    except RemoteError as exc:
        return failed(exc.message, f"check pve.api_url ({hv.api_url}) and that pveproxy runs on {hv.node} "
                                   "(`systemctl status pveproxy`) and is reachable from here")
    return passed(f"{hv.api_url} verified with {how}")


def tls_hint(hv: Hypervisor) -> str:
    if hv.tls_ca_file:
        return (
            f"if {hv.node}'s certificate was renewed legitimately, copy /etc/pve/pve-root-ca.pem from the node "
            f"over a trusted channel to {hv.tls_ca_file}; otherwise find out what answers on {hv.api_url}"
        )
    return (
        f"if {hv.node}'s certificate was renewed legitimately, pin the new one: on the node run "
        f"`openssl x509 -noout -fingerprint -sha256 -in /etc/pve/local/pve-ssl.pem` and set "
        f"pve.tls_fingerprint; otherwise find out what answers on {hv.api_url}"
    )


# ------------------------------------------------------------------------------------- ssh


def check_ssh(probe: HostProbe) -> Outcome:
    """The pinned host key matches and the factory key logs in (deploy too: it takes its host lock over SSH)."""
    hv = probe.hv
    ep = hv.ssh
    try:
        _ = probe.link  # connects: the pinned host key, then the factory key's login
    except HostKeyMismatch as exc:
        return failed(exc.message,
            f"if {hv.node} was reinstalled or its keys rotated, confirm the new key on its console "
            f"(`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`) and put it in pve.ssh.host_key; "
            f"otherwise do not connect: something else answers on {ep.host}:{ep.port}",
        )
    except RemoteError as exc:
        return failed(exc.message,
            f"check pve.ssh (host, port, user {ep.user}, key_file) and that the factory's public key is in "
            f"~{ep.user}/.ssh/authorized_keys on {hv.node} (ansible-playbook {PLAYBOOK} -l {hv.name})",
        )
    return passed(f"{ep.user}@{ep.host}:{ep.port} host key matches the pinned {ep.host_key.split()[0]}")


# ------------------------------------------------------------------------------------- token


def check_token(probe: HostProbe) -> Outcome:
    """The token authenticates: its secret is readable and GET /version does not refuse it. Where TLS itself
    failed, the token is untested (the tls check reports why)."""
    hv = probe.hv
    try:
        _ = probe.client, probe.version  # the secret read, then the first request with it
    except ApiError as exc:
        return token_refused(hv, exc)
    except RemoteError:
        return not_run([CHECK_TLS])
    except FactoryError as exc:  # the secret cannot be read: nothing was sent
        return failed(str(exc), f"put the secret of token {hv.token_id} in the {hv.token_secret_source} (it is "
                                "shown once by `pveum user token add`)")
    return passed(f"{hv.token_id} authenticates")


def token_refused(hv: Hypervisor, exc: ApiError) -> Outcome:
    if exc.status == 401:
        return failed(f"token {hv.token_id} is refused: {exc.pve_message}",
            f"check the token exists (`pveum user token list {token_user(hv.token_id)}` on {hv.node}) and "
            f"that the secret in the {hv.token_secret_source} is its secret; "
            f"or create it: ansible-playbook {PLAYBOOK} -l {hv.name}",
        )
    return failed(f"GET /version with token {hv.token_id}: {exc}", generic_hint(hv, exc, CHECK_TOKEN))


# ------------------------------------------------------------------------------------- privileges


def check_privileges(probe: HostProbe) -> Outcome:
    """The token's effective privileges (GET /access/permissions per path) cover :func:`required_acl`."""
    hv = probe.hv
    major = probe.major
    missing: dict[str, list[str]] = {}
    for path, privs in required_acl(probe.site, hv, major).items():
        held = effective_privileges(probe.permissions(path), path)
        lack = [p for p in privs if p not in held]
        if lack:
            missing[path] = lack
    wanted = required_privileges(major)
    if not missing:
        return passed(f"{hv.token_id} holds all {len(wanted)} privileges of PVE {major_of(major)} where needed")
    detail = f"token {hv.token_id} lacks " + "; ".join(f"{', '.join(p)} on {path}" for path, p in missing.items())
    user = token_user(hv.token_id)
    cmds = "; ".join(
        f"pveum acl modify {path} --users {user} --tokens '{hv.token_id}' --roles {FACTORY_ROLE}"
        for path in missing
    )
    return failed(detail,
        f"ansible-playbook {PLAYBOOK} -l {hv.name}, or on {hv.node} (PVE {major_of(major)} privilege names): "
        f"pveum role modify {FACTORY_ROLE} --privs {','.join(wanted)}; {cmds}",
    )
