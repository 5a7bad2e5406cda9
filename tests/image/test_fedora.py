"""Fedora-only: SELinux, firewalld, dnf. Chosen by the catalogue's test_suites for the fedora family."""

from __future__ import annotations

import configparser
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _fedora_only(host: Any, family: str | None) -> None:
    fam = family or ("fedora" if host.system_info.distribution == "fedora" else host.system_info.distribution)
    if fam != "fedora":
        pytest.skip(f"fedora suite on a {fam} host")


def test_selinux_enforcing(host: Any) -> None:
    assert host.check_output("getenforce").strip() == "Enforcing"
    config = host.file("/etc/selinux/config").content_string
    assert "SELINUX=enforcing" in [line.strip() for line in config.splitlines()]


def test_firewalld_allows_ssh(host: Any) -> None:
    assert host.service("firewalld").is_enabled
    assert host.service("firewalld").is_running
    with host.sudo():
        services = host.check_output("firewall-cmd --list-services").split()
    assert "ssh" in services


def _ini(text: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.read_string(text)
    return cp


def test_dnf_configuration_sane(host: Any) -> None:
    dnf = _ini(host.file("/etc/dnf/dnf.conf").content_string)
    main = dnf["main"] if dnf.has_section("main") else {}
    assert main.get("gpgcheck", "1").strip().lower() in ("1", "true", "yes"), "dnf.conf: gpgcheck off"
    assert main.get("sslverify", "1").strip().lower() in ("1", "true", "yes"), "dnf.conf: sslverify off"
    problems = []
    repo_files = host.check_output("ls -1 /etc/yum.repos.d/").split()
    assert repo_files, "no repositories configured"
    for name in repo_files:
        if not name.endswith(".repo"):
            continue
        cp = _ini(host.file(f"/etc/yum.repos.d/{name}").content_string)
        for section in cp.sections():
            repo = cp[section]
            if repo.get("enabled", "1").strip() not in ("1", "true", "yes"):
                continue
            if repo.get("gpgcheck", "1").strip() not in ("1", "true", "yes"):
                problems.append(f"{name}[{section}]: gpgcheck off")
            if repo.get("sslverify", "1").strip() not in ("1", "true", "yes"):
                problems.append(f"{name}[{section}]: sslverify off")
    assert problems == []
    assert host.run("rpm -q dnf || rpm -q dnf5").rc == 0
