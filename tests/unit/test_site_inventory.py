"""The site inventory is read as Ansible reads it: YAML and INI, group_vars/ and host_vars/ with Ansible's
precedence, inline and whole-file vault with Ansible's vault password setting; every error names the file the
value came from. ansible-inventory itself is the reference."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from image_factory.console import mask
from image_factory.errors import Problem, ValidationFailed
from image_factory.settings import REPO_ROOT
from image_factory.site import inventory_source
from image_factory.site.inventory import load_site
from image_factory.site.secrets import read_secret

from .example_site import EXAMPLE_DIR, flat_example

pytestmark = pytest.mark.unit

CATALOGUE = REPO_ROOT / "packer/images.yml"
TWO_TENANTS = REPO_ROOT / "docs/examples/two-tenants.yml"
SECRET = "5f0c1a2b-3d4e-4f60-8a9b-0c1d2e3f4a5b"  # noqa: S105 - a test token secret


@pytest.fixture(autouse=True)
def _no_vault_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test states its own vault password setting; none leaks in from the machine."""
    for name in ("ANSIBLE_VAULT_PASSWORD_FILE", "ANSIBLE_VAULT_IDENTITY_LIST"):
        monkeypatch.delenv(name, raising=False)


def write_yaml(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def split_site(root: Path, doc: dict[str, Any]) -> Path:
    """``doc`` (a one-file inventory) as hosts.yml with only groups and hosts, every group's vars in
    group_vars/<group>.yml and every host's vars in host_vars/<host>.yml."""
    skeleton: dict[str, Any] = {"all": {"children": {}}}
    for group, body in doc["all"]["children"].items():
        if body.get("vars"):
            write_yaml(root / "group_vars" / f"{group}.yml", body["vars"])
        skeleton["all"]["children"][group] = {"hosts": {h: None for h in body.get("hosts") or {}}}
        for host, host_vars in (body.get("hosts") or {}).items():
            write_yaml(root / "host_vars" / f"{host}.yml", host_vars)
    write_yaml(root / "hosts.yml", skeleton)
    return root


def vault_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, password: str = "correct horse") -> Any:  # noqa: S107
    """A 0600 vault password file named by ANSIBLE_VAULT_PASSWORD_FILE; returns ansible's VaultLib for it."""
    from ansible.parsing.vault import VaultLib, VaultSecret

    path = tmp_path / "vault-password"
    path.write_text(password + "\n")
    path.chmod(0o600)
    monkeypatch.setenv("ANSIBLE_VAULT_PASSWORD_FILE", str(path))
    return VaultLib([("default", VaultSecret(password.encode()))])


def inline_vault(vault: Any, text: str) -> str:
    ciphertext = vault.encrypt(text).decode()
    return "!vault |\n" + "".join(f"    {line}\n" for line in ciphertext.splitlines())


def vaulted_token_site(tmp_path: Path, vault: Any) -> Path:
    """The example site with pve-tenant's token secret as an inline !vault value in its host_vars file."""
    root = tmp_path / "site"
    shutil.copytree(EXAMPLE_DIR, root)
    host_vars = root / "host_vars" / "pve-tenant.yml"
    text = host_vars.read_text().replace("  token_secret_env: PVE_TENANT_TOKEN_SECRET\n",
                                         "  token_secret: " + inline_vault(vault, SECRET).replace("\n    ", "\n      "))
    assert "token_secret: !vault" in text
    host_vars.write_text(text)
    return root


def problems_of(inventory: Path, images: Path = CATALOGUE) -> list[Problem]:
    with pytest.raises(ValidationFailed) as err:
        load_site(inventory, images)
    return err.value.problems


# ------------------------------------------------------------------------------------ formats, precedence


def test_an_ini_inventory_with_yaml_host_vars_is_the_same_site(tmp_path: Path) -> None:
    example = load_site(EXAMPLE_DIR, CATALOGUE)
    root = split_site(tmp_path / "ini", flat_example())
    (root / "hosts.yml").unlink()
    ini = ["[hypervisors]", "pve-mgmt ansible_host=pve-mgmt.deevnet.lan", "pve-tenant", ""]
    for group in ("mgmt", "tenant"):
        ini += [f"[{group}]", *sorted(h for h, v in example.vms.items() if v.plane == group), ""]
    (root / "hosts.ini").write_text("\n".join(ini))
    site = load_site(root, CATALOGUE)
    assert site.hypervisors == example.hypervisors
    assert site.vms == example.vms
    assert site.vm_sources["metrics01"] == str(root / "host_vars" / "metrics01.yml")


def test_group_vars_and_host_vars_follow_ansibles_precedence_and_errors_name_their_file(tmp_path: Path) -> None:
    root = split_site(tmp_path / "site", flat_example())
    # host_vars/ as a directory of files; the group's own `vm` is replaced whole by the host's (no merging)
    vm_file = root / "host_vars" / "metrics01" / "vm.yml"
    write_yaml(vm_file, yaml.safe_load((root / "host_vars" / "metrics01.yml").read_text()))
    (root / "host_vars" / "metrics01.yml").unlink()
    write_yaml(root / "group_vars" / "mgmt.yml", {"ansible_user": "ansible", "vm": {"cores": 64}})
    # a host variable in the inventory file loses to the host_vars/ file
    doc = yaml.safe_load((root / "hosts.yml").read_text())
    doc["all"]["children"]["mgmt"]["hosts"]["logs01"] = {"vm": {"cores": 3}}
    write_yaml(root / "hosts.yml", doc)
    site = load_site(root, CATALOGUE)
    assert site.vms["metrics01"].cores == 2 and site.vms["logs01"].cores == 2
    assert site.vm_sources["metrics01"] == str(vm_file)

    broken = yaml.safe_load(vm_file.read_text())
    broken["vm"]["memory"] = "lots"
    write_yaml(vm_file, broken)
    bad_role = root / "host_vars" / "pve-mgmt.yml"
    pve = yaml.safe_load(bad_role.read_text())
    pve["pve"]["bridge"] = "vmbr0,tag=5"
    write_yaml(bad_role, pve)
    found = {(p.file, p.entry, p.key) for p in problems_of(root)}
    assert (str(vm_file), "metrics01", "vm.memory") in found
    assert (str(bad_role), "pve-mgmt", "pve.bridge") in found


def test_tenants_in_group_vars_tenant_yml_are_read_and_named_in_errors(tmp_path: Path) -> None:
    root = split_site(tmp_path / "site", yaml.safe_load(TWO_TENANTS.read_text()))
    tenants_file = root / "group_vars" / "tenant.yml"
    assert "tenants" in yaml.safe_load(tenants_file.read_text())
    site = load_site(root, CATALOGUE)
    assert site.tenants == load_site(TWO_TENANTS, CATALOGUE).tenants and site.tenants
    data = yaml.safe_load(tenants_file.read_text())
    first = next(iter(data["tenants"]))
    data["tenants"][first]["vlan"] = 1
    write_yaml(tenants_file, data)
    problems = problems_of(root)
    assert (str(tenants_file), f"tenant {first}", "vlan") in {(p.file, p.entry, p.key) for p in problems}


def test_the_factory_reads_what_ansible_inventory_lists(tmp_path: Path) -> None:
    """ansible-inventory --list and the factory agree on every host's groups, pve and vm (the example site, and
    a split variant with an INI file and directories of vars)."""
    tool = Path(sys.executable).parent / "ansible-inventory"
    sites = [EXAMPLE_DIR, split_site(tmp_path / "split", yaml.safe_load(TWO_TENANTS.read_text()))]
    for site in sites:
        listed = json.loads(subprocess.run(
            [str(tool), "-i", str(site), "--list"], capture_output=True, text=True, check=True, cwd=tmp_path,
            env={"PATH": f"{tool.parent}:/usr/bin:/bin", "ANSIBLE_NOCOLOR": "1", "HOME": str(tmp_path)},
        ).stdout)
        problems: list[Problem] = []
        read = inventory_source.read(site, problems, host_keys=("pve", "vm"), group_keys=("tenants",))
        assert problems == []
        hostvars = listed["_meta"]["hostvars"]
        assert set(read.hosts) == set(hostvars)
        for name, host in read.hosts.items():
            assert host.vars == {k: v for k, v in hostvars[name].items() if k in ("pve", "vm")}, name
            member_of = {g for g, body in listed.items() if name in (body.get("hosts") or [])}
            assert member_of <= host.groups, name
        assert read.groups["tenant"].get("tenants") == (
            hostvars[next(iter(listed["tenant"]["hosts"]))].get("tenants"))


# ------------------------------------------------------------------------------------------------- vault


def test_an_inline_vaulted_token_secret_is_decrypted_and_masked(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = vaulted_token_site(tmp_path, vault_password(tmp_path, monkeypatch))
    hv = load_site(root, CATALOGUE).hypervisors["pve-tenant"]
    assert hv.token_secret is not None and hv.token_secret_env is None
    assert SECRET not in repr(hv) and SECRET not in json.dumps(hv.model_dump(mode="json"))
    assert mask(f"token {SECRET} refused") == "token ******** refused"
    assert read_secret(env=None, file=None, what="x", vaulted=hv.token_secret.get_secret_value()) == SECRET
    assert "vault-encrypted pve.token_secret" in hv.token_secret_source


def test_a_vaulted_value_without_a_vault_password_names_file_host_key_and_the_setting(tmp_path: Path,
                                                                                      monkeypatch: pytest.MonkeyPatch
                                                                                      ) -> None:
    root = vaulted_token_site(tmp_path, vault_password(tmp_path, monkeypatch))
    monkeypatch.delenv("ANSIBLE_VAULT_PASSWORD_FILE")
    [problem] = problems_of(root)
    assert (problem.file, problem.entry, problem.key) == (
        str(root / "host_vars" / "pve-tenant.yml"), "pve-tenant", "pve.token_secret")
    assert problem.message.startswith("is vault-encrypted and no vault password is configured: set "
                                      "ANSIBLE_VAULT_PASSWORD_FILE (or vault_password_file in ansible.cfg)")


def test_a_wrong_or_world_readable_vault_password_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = vaulted_token_site(tmp_path, vault_password(tmp_path, monkeypatch))
    (tmp_path / "other").mkdir()
    vault_password(tmp_path / "other", monkeypatch, "wrong")
    [problem] = problems_of(root)
    assert problem.key == "pve.token_secret" and "cannot be decrypted" in problem.message
    vault_password(tmp_path, monkeypatch)
    (tmp_path / "vault-password").chmod(0o644)
    [problem] = problems_of(root)
    assert f"is readable by group/others (mode 0644); run: chmod 600 {tmp_path / 'vault-password'}" in problem.message


def test_a_whole_vaulted_host_vars_file_holds_the_token_secret_and_needs_the_password(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vault = vault_password(tmp_path, monkeypatch)
    root = tmp_path / "site"
    shutil.copytree(EXAMPLE_DIR, root)
    plain = root / "host_vars" / "pve-tenant.yml"
    data = yaml.safe_load(plain.read_text())
    del data["pve"]["token_secret_env"]
    data["pve"]["token_secret"] = SECRET
    secret_file = root / "host_vars" / "pve-tenant" / "vault.yml"
    secret_file.parent.mkdir()
    secret_file.write_bytes(vault.encrypt(yaml.safe_dump(data)))
    plain.unlink()
    hv = load_site(root, CATALOGUE).hypervisors["pve-tenant"]
    assert hv.token_secret is not None and hv.token_secret.get_secret_value() == SECRET
    monkeypatch.delenv("ANSIBLE_VAULT_PASSWORD_FILE")
    problems = problems_of(root)
    [problem] = [p for p in problems if p.file == str(secret_file)]
    assert problem.message.startswith("is vault-encrypted and no vault password is configured")
    assert all(SECRET not in str(p) for p in problems)


def test_a_plaintext_token_secret_in_host_vars_is_refused_without_echoing_it(tmp_path: Path) -> None:
    root = tmp_path / "site"
    shutil.copytree(EXAMPLE_DIR, root)
    host_vars = root / "host_vars" / "pve-tenant.yml"
    host_vars.write_text(host_vars.read_text().replace("token_secret_env: PVE_TENANT_TOKEN_SECRET",
                                                       f"token_secret: {SECRET}"))
    problems = problems_of(root)
    [problem] = [p for p in problems if p.entry == "pve-tenant"]
    assert (problem.file, problem.key) == (str(host_vars), "pve.token_secret")
    assert problem.message.startswith("is plaintext") and all(SECRET not in str(p) for p in problems)


# ------------------------------------------------------------------------------------- nothing is run


def test_an_inventory_script_is_not_run_and_is_named(tmp_path: Path) -> None:
    root = tmp_path / "site"
    shutil.copytree(EXAMPLE_DIR, root)
    marker = tmp_path / "ran"
    script = root / "dynamic.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\necho '{{}}'\n")
    script.chmod(0o755)
    problems = problems_of(root)
    assert not marker.exists()
    assert [p.file for p in problems] == [str(script)] and "not readable as an Ansible inventory" in problems[0].message


def test_a_missing_inventory_and_a_broken_group_vars_file_are_named(tmp_path: Path) -> None:
    assert problems_of(tmp_path / "nope") == [Problem(str(tmp_path / "nope"), "", "", "file not found")]
    root = tmp_path / "site"
    shutil.copytree(EXAMPLE_DIR, root)
    (root / "group_vars" / "mgmt.yml").write_text("ansible_user: [unclosed\n")
    [problem] = problems_of(root)
    assert problem.file == str(root / "group_vars" / "mgmt.yml") and problem.key.startswith("line "), problem
    assert "YAML parsing failed" in problem.message


def test_a_yaml_1_1_integer_form_in_group_vars_is_refused_as_in_an_inventory_file(tmp_path: Path) -> None:
    """ansible-core reads `vlan: 0156` as 110 (YAML 1.1); the written form is read back from the value's origin, so a
    tenant's VLAN in group_vars/tenant.yml is refused exactly as in one inventory file."""
    root = split_site(tmp_path / "site", yaml.safe_load(TWO_TENANTS.read_text()))
    tenants_file = root / "group_vars" / "tenant.yml"
    text = tenants_file.read_text()
    assert "vlan: 110\n" in text
    tenants_file.write_text(text.replace("vlan: 110\n", "vlan: 0156\n", 1))
    problems = problems_of(root)
    hits = [p for p in problems if p.file == str(tenants_file) and p.key == "vlan"]
    assert hits and "0156 is not a plain integer" in hits[0].message, problems
