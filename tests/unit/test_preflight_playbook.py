"""ansible/playbooks/hypervisor.yml (role pve_factory): ansible-lint, check mode, idempotence.

No PVE host exists here: the play runs against a local-connection host whose `pveum`, `pvesm` and
`pvesh` are the shim in pve_cli_shim.py (JSON state file, every call logged, writes refused in the
read-only runs). ansible-playbook and ansible-lint are real.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from image_factory import preflight as pf
from image_factory.settings import REPO_ROOT

pytestmark = pytest.mark.unit

VENV_BIN = Path(sys.executable).parent
PLAYBOOK = REPO_ROOT / "ansible" / "playbooks" / "hypervisor.yml"
ROLE = REPO_ROOT / "ansible" / "roles" / "pve_factory"
SHIM = Path(__file__).with_name("pve_cli_shim.py")
CALLBACKS = Path(__file__).with_name("ansible_plugins") / "callback"
TOKEN_ID = "factory@pve!image-factory"  # noqa: S105 - a token id, not a secret
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKfXoTQ8mJ2n8jvU4vG0p6Y1sWq3bZr5nH7cLd9eFa2M factory@deevnet"
OTHER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPH+w1NVDoY3fpPF3ghuUJHVm9JGJjOWgHw65xshZYh2 admin@laptop"
ACL_PATHS = ["/vms", "/storage/local-lvm", "/storage/local", "/sdn/zones/localnetwork", "/nodes/pve-test"]

FRESH = {  # a PVE 8.4 node as installed: root only, local without import content
    "users": [{"userid": "root@pam", "enable": 1, "expire": 0, "tokens": []}],
    "roles": [{"roleid": "Administrator", "privs": "Sys.Modify,VM.Allocate", "special": 1},
              {"roleid": "PVEAuditor", "privs": "Sys.Audit,VM.Audit", "special": 1}],
    "acl": [{"path": "/", "roleid": "Administrator", "type": "user", "ugid": "root@pam", "propagate": 1}],
    "storage": {"local": {"type": "dir", "path": "/var/lib/vz", "content": "iso,vztmpl,backup"},
                "local-lvm": {"type": "lvmthin", "content": "images,rootdir"}},
}


class Node:
    """The shimmed node: its bin dir, state file and call log."""

    def __init__(self, tmp: Path, state: dict[str, Any]):
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.bin.mkdir()
        for prog in ("pveum", "pvesm", "pvesh", "pveversion"):
            exe = self.bin / prog
            exe.write_text(f"#!/bin/sh\nexec {sys.executable} {SHIM} {prog} \"$@\"\n")
            exe.chmod(0o755)
        self.state_file = tmp / "state.json"
        self.state_file.write_text(json.dumps(state, indent=1, sort_keys=True))
        self.log = tmp / "calls.log"
        self.log.touch()
        self.keys = tmp / "home" / "root" / ".ssh" / "authorized_keys"
        self.keys.parent.mkdir(parents=True)
        self.keys.write_text(OTHER_KEY + "\n")
        self.secrets = tmp / "secrets"
        self.inventory = tmp / "hosts.yml"
        self.inventory.write_text(json.dumps({"all": {"children": {"hypervisors": {"hosts": {"hv-test": {
            "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
            "pve": {"role": "mgmt", "node": "pve-test", "api_url": "https://127.0.0.1:8006", "token_id": TOKEN_ID,
                    "token_secret_env": "X", "tls_fingerprint": ":".join(["AA"] * 32),
                    "ssh": {"host": "127.0.0.1", "user": "root", "host_key": PUBKEY.rsplit(" ", 1)[0]},
                    "storage": {"images": "local-lvm", "import": "local", "cloudinit": "local-lvm"},
                    "bridge": "vmbr0", "template_vmids": {"first": 9000, "last": 9099},
                    "vm_vmids": {"first": 1000, "last": 1999}},
        }}}}}}))

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text())

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def writes(self) -> list[list[str]]:
        reads = (["pveum", "user", "list"], ["pveum", "role", "list"], ["pveum", "acl", "list"], ["pvesh", "get"],
                 ["pveversion"])
        return [c for c in self.calls() if not any(c[: len(r)] == r for r in reads)]

    def play(self, *extra: str, readonly: bool) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
        self.log.write_text("")
        env = {
            "PATH": f"{self.bin}:{VENV_BIN}:/usr/bin:/bin", "HOME": str(self.tmp / "home"),
            "FAKE_PVE_STATE": str(self.state_file), "FAKE_PVE_LOG": str(self.log),
            "FAKE_PVE_READONLY": "1" if readonly else "0",
            "ANSIBLE_STDOUT_CALLBACK": "record_json", "ANSIBLE_CALLBACK_PLUGINS": str(CALLBACKS),
            "ANSIBLE_LOCAL_TEMP": str(self.tmp / "atmp"),
            "ANSIBLE_REMOTE_TEMP": str(self.tmp / "atmp"), "ANSIBLE_NOCOLOR": "1", "LANG": "C.UTF-8",
        }
        extra_vars = {"pve_factory_ssh_pubkey": PUBKEY, "pve_factory_authorized_keys": str(self.keys),
                      "pve_factory_token_secret_dir": str(self.secrets)}
        proc = subprocess.run(
            [str(VENV_BIN / "ansible-playbook"), "-i", str(self.inventory), str(PLAYBOOK), "-l", "hv-test,localhost",
             "-e", json.dumps(extra_vars), *extra],
            capture_output=True, text=True, env=env, cwd=self.tmp, timeout=300,
        )
        start = proc.stdout.find("{")
        assert start >= 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout[start:]), proc


def _task(result: dict[str, Any], name: str) -> dict[str, Any]:
    for play in result["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"].split(" : ")[-1] == name:
                return dict(task["hosts"].get("hv-test", {}))
    raise AssertionError(f"no task {name!r}")


def _plan(result: dict[str, Any]) -> list[str]:
    return list(_task(result, "Show the changes to make")["msg"])


def _expected_fresh_plan() -> list[str]:
    privs = ",".join(pf.REQUIRED_PRIVILEGES)
    return [
        f"pveum role add ImageFactory --privs {privs}",
        "pveum user add factory@pve --comment 'deevnet image factory (publish and deploy)'",
        "pveum user token add factory@pve image-factory --privsep 1",
        *[f"pveum acl modify {p} --users factory@pve --roles ImageFactory" for p in ACL_PATHS],
        *[f"pveum acl modify {p} --tokens '{TOKEN_ID}' --roles ImageFactory" for p in ACL_PATHS],
        "pvesm set local --content iso,vztmpl,backup,import",
    ]


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path, FRESH)


def test_role_privileges_match_preflight_and_each_version_knows_them():
    import yaml

    from image_factory.lab.privileges import invalid

    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    assert defaults["pve_factory_role"] == pf.FACTORY_ROLE
    for major, version in ((8, "8.4.1"), (9, "9.1.4")):
        privs = [*defaults["pve_factory_privileges_common"], *defaults["pve_factory_privileges_agent"][major],
                 *defaults["pve_factory_privileges_storage_and_node"]]
        assert privs == list(pf.required_privileges(major))
        assert invalid(privs, version) == [], f"PVE {version} does not know {invalid(privs, version)}"
    assert invalid(list(pf.required_privileges(8)), "9.1.4") == ["VM.Monitor"]
    assert invalid(list(pf.required_privileges(9)), "8.4.1") == ["VM.GuestAgent.Audit", "VM.GuestAgent.FileRead"]


def test_check_mode_reports_every_change_and_changes_nothing(node: Node):
    before_state, before_keys = node.state_file.read_bytes(), node.keys.read_bytes()
    result, proc = node.play("--check", readonly=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert _plan(result) == _expected_fresh_plan()
    assert result["stats"]["hv-test"]["changed"] >= 2  # the plan and the SSH key
    assert _task(result, "Authorize the factory's SSH key for the upload user")["changed"] is True
    assert node.writes() == []
    assert len(node.calls()) == 5  # the five reads
    assert node.state_file.read_bytes() == before_state
    assert node.keys.read_bytes() == before_keys
    assert not node.secrets.exists()
    known = (node.tmp / "home" / ".cache" / "deevnet-image-factory" / "known_hosts").read_text()
    assert [line for line in known.splitlines() if line.strip()] == ["127.0.0.1 " + PUBKEY.rsplit(" ", 1)[0]]


def test_apply_converges_and_second_run_changes_nothing(node: Node):
    result, proc = node.play(readonly=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert [" ".join(c) for c in node.writes()] == [
        line.replace("'", "") for line in _expected_fresh_plan()[:2]
    ] + [
        "pveum user token add factory@pve image-factory --privsep 1 --comment deevnet image factory (publish and "
        "deploy) --output-format json",
        *[line.replace("'", "") for line in _expected_fresh_plan()[3:]],
    ]
    state = node.state()
    role = next(r for r in state["roles"] if r["roleid"] == "ImageFactory")
    assert sorted(role["privs"].split(",")) == sorted(pf.REQUIRED_PRIVILEGES)
    user = next(u for u in state["users"] if u["userid"] == "factory@pve")
    assert user["tokens"] == [{"tokenid": "image-factory", "privsep": 1, "expire": 0}]
    for kind, ugid in (("user", "factory@pve"), ("token", TOKEN_ID)):
        assert sorted(a["path"] for a in state["acl"] if a["type"] == kind and a["ugid"] == ugid) == sorted(ACL_PATHS)
    assert state["storage"]["local"]["content"] == "iso,vztmpl,backup,import"
    assert state["storage"]["local-lvm"] == FRESH["storage"]["local-lvm"]  # untouched
    assert node.keys.read_text().splitlines() == [OTHER_KEY, PUBKEY]
    secret = node.secrets / "hv-test.token"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_text().strip()) == 36
    assert secret.read_text().strip() not in proc.stdout  # no_log kept it out of the output

    again, proc2 = node.play(readonly=True)  # a write now would fail the run
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr
    assert again["stats"]["hv-test"]["changed"] == 0 and _plan(again) == []
    assert node.keys.read_text().splitlines() == [OTHER_KEY, PUBKEY]
    check, proc3 = node.play("--check", readonly=True)
    assert proc3.returncode == 0 and check["stats"]["hv-test"]["changed"] == 0


def test_check_mode_plans_only_the_drift(tmp_path: Path):
    converged = json.loads(json.dumps(FRESH))
    converged["roles"].append({"roleid": "ImageFactory", "special": 0,
                               "privs": ",".join([*pf.REQUIRED_PRIVILEGES, "Sys.Modify"])})
    converged["users"].append({"userid": "factory@pve", "enable": 1, "expire": 0,
                               "tokens": [{"tokenid": "image-factory", "privsep": 0, "expire": 0}]})
    converged["acl"] += [{"path": p, "roleid": "ImageFactory", "type": t, "ugid": u, "propagate": 1}
                         for p in ACL_PATHS if p != "/nodes/pve-test"
                         for t, u in (("user", "factory@pve"), ("token", TOKEN_ID))]
    converged["storage"]["local"]["content"] = "import,iso"
    node = Node(tmp_path, converged)
    node.keys.write_text(PUBKEY.rsplit(" ", 1)[0] + " renamed-comment\n")  # same key, other comment
    result, proc = node.play("--check", readonly=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert _plan(result) == [
        f"pveum role modify ImageFactory --privs {','.join(pf.REQUIRED_PRIVILEGES)}",
        "pveum user token modify factory@pve image-factory --privsep 1",
        "pveum acl modify /nodes/pve-test --users factory@pve --roles ImageFactory",
        f"pveum acl modify /nodes/pve-test --tokens '{TOKEN_ID}' --roles ImageFactory",
    ]
    assert node.writes() == []


def test_ansible_lint_passes_offline_with_the_production_profile():
    # the collection deevnet.image_factory (its galaxy.yml and playbook mgmt_vms, which mgmt-vms.yml imports) is
    # found where ansible-playbook finds it, beside the playbooks
    collections = REPO_ROOT / "ansible" / "playbooks" / "collections"
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}", NO_COLOR="1",
               ANSIBLE_COLLECTIONS_PATH=str(collections))
    proc = subprocess.run(
        [str(VENV_BIN / "ansible-lint"), "--offline", str(PLAYBOOK.relative_to(REPO_ROOT)),
         str(ROLE.relative_to(REPO_ROOT)), "ansible/playbooks/mgmt-vms.yml",
         str((collections / "ansible_collections" / "deevnet" / "image_factory").relative_to(REPO_ROOT))],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Profile 'production' was required, and it passed" in out
    assert "Failed to find" not in out, out  # an import_playbook ansible-lint could not follow is not linted


def _with_version(state: dict[str, Any], version: str) -> dict[str, Any]:
    out = json.loads(json.dumps(state))
    out["version"] = version
    return out


def test_fresh_pve9_node_gets_the_pve9_privileges(tmp_path: Path):
    node = Node(tmp_path, _with_version(FRESH, "9.1.4"))
    result, proc = node.play(readonly=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    role = next(r for r in node.state()["roles"] if r["roleid"] == "ImageFactory")
    assert sorted(role["privs"].split(",")) == sorted(pf.required_privileges(9))
    assert "VM.Monitor" not in role["privs"]


def test_upgraded_node_replaces_the_stale_role(tmp_path: Path):
    """After 8 -> 9, PVE 9 has silently dropped VM.Monitor from the stored role: the play replaces it."""
    upgraded = _with_version(FRESH, "9.1.4")
    upgraded["roles"].append({"roleid": "ImageFactory", "special": 0,
                              "privs": ",".join(p for p in pf.required_privileges(8) if p != "VM.Monitor")})
    node = Node(tmp_path, upgraded)
    result, proc = node.play("--check", readonly=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert f"pveum role modify ImageFactory --privs {','.join(pf.required_privileges(9))}" in _plan(result)


def test_the_8_list_is_refused_by_a_pve9_node(tmp_path: Path):
    """The catalogue check is real: what an 8-only playbook would do fails on 9 with PVE's message."""
    node = Node(tmp_path, _with_version(FRESH, "9.1.4"))
    env = {**os.environ, "FAKE_PVE_STATE": str(node.state_file), "FAKE_PVE_LOG": str(node.log)}
    proc = subprocess.run([str(node.bin / "pveum"), "role", "add", "ImageFactory", "--privs",
                           ",".join(pf.required_privileges(8))], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "invalid privilege 'VM.Monitor'" in proc.stderr
