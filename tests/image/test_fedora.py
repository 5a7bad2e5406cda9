"""Fedora-only: SELinux, firewalld, dnf. Chosen by the catalogue's test_suites for the fedora family."""

from __future__ import annotations

import configparser
import re
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
    # dnf5 (Fedora 45) reads packaged repo files from /usr/share/dnf5/repos.d, overridden by same-named
    # files in /etc/distro.repos.d and /etc/yum.repos.d; dnf4 only the latter. Which repos are enabled
    # is dnf's own answer (`dnf repolist --enabled`); each of them must check signatures and TLS.
    listing = host.check_output("dnf -q repolist --enabled")
    enabled_ids = {line.split()[0] for line in listing.splitlines()[1:] if line.strip()}
    assert enabled_ids, "dnf reports no enabled repository"
    files: dict[str, str] = {}
    for directory in ("/usr/share/dnf5/repos.d", "/etc/distro.repos.d", "/etc/yum.repos.d"):
        for name in host.run(f"ls -1 {directory} 2>/dev/null").stdout.split():
            if name.endswith(".repo"):
                files[name] = f"{directory}/{name}"  # later directories override earlier ones
    seen: set[str] = set()
    for name, path in sorted(files.items()):
        cp = _ini(host.file(path).content_string)
        for section in cp.sections():
            repo = cp[section]
            if section not in enabled_ids:
                continue
            seen.add(section)
            if repo.get("gpgcheck", "1").strip() not in ("1", "true", "yes"):
                problems.append(f"{name}[{section}]: gpgcheck off")
            if repo.get("sslverify", "1").strip() not in ("1", "true", "yes"):
                problems.append(f"{name}[{section}]: sslverify off")
    assert problems == []
    assert seen == enabled_ids, f"enabled repos without a readable definition: {enabled_ids - seen}"
    assert host.run("rpm -q dnf || rpm -q dnf5").rc == 0


def test_ansible_can_drive_dnf(host: Any) -> None:
    """Ansible's dnf module uses dnf5 through these bindings on Fedora 41 and later."""
    assert host.run("rpm -q python3-libdnf5").rc == 0


def _boot_state(host: Any) -> tuple[str, list[str], str | None]:
    """(the entry token, the BLS entry files, grubenv's saved_entry)."""
    with host.sudo():
        token = host.file("/etc/kernel/entry-token").content_string.strip()
        entries = sorted(host.check_output("ls -1 /boot/loader/entries").split())
        env = host.check_output("grub2-editenv - list")
    saved = [line.split("=", 1)[1] for line in env.splitlines() if line.startswith("saved_entry=")]
    return token, entries, saved[0] if saved else None


def test_boot_entries_share_one_fixed_token(host: Any) -> None:
    """Every BLS entry is named after one fixed ID that kernel-install reads before the machine-id (so a
    clone's kernel updates name and remove entries the same way); no build-time rescue entry; grubenv's
    saved_entry names the running kernel's entry."""
    token, entries, saved = _boot_state(host)
    assert re.fullmatch(r"[0-9a-f]{32}", token), token
    with host.sudo():
        info = host.file("/etc/machine-info").content_string.splitlines()
        machine_id = host.file("/etc/machine-id").content_string.strip()
    assert f"KERNEL_INSTALL_MACHINE_ID={token}" in info, info
    assert token != machine_id  # the clone's own machine-id is new; the token is the template's
    assert entries and all(e.startswith(f"{token}-") for e in entries), entries
    assert not [e for e in entries if "rescue" in e], entries
    assert saved == f"{token}-{host.check_output('uname -r').strip()}", (saved, entries)


def test_a_kernel_added_and_removed_leaves_no_stale_entry(host: Any) -> None:
    """kernel-install with Fedora's own grub plugin (what a kernel package's scriptlets run) adds the entry
    under the token and removes exactly it again. The running kernel's image stands in for a second kernel:
    only the boot-entry plugin runs, so no initramfs is built for it."""
    token, before, saved = _boot_state(host)
    running = host.check_output("uname -r").strip()
    fake = "0.0.1-1.factorytest.fc.x86_64"
    plugin = "KERNEL_INSTALL_PLUGINS=/usr/lib/kernel/install.d/20-grub.install"
    with host.sudo():
        try:
            host.check_output(f"{plugin} kernel-install add {fake} /lib/modules/{running}/vmlinuz")
            during = sorted(host.check_output("ls -1 /boot/loader/entries").split())
            host.check_output(f"{plugin} kernel-install remove {fake}")
            after = sorted(host.check_output("ls -1 /boot/loader/entries").split())
        finally:
            host.run(f"{plugin} kernel-install remove {fake}")
            if saved:
                host.run(f"grub2-editenv - set saved_entry={saved}")
    assert during == sorted([*before, f"{token}-{fake}.conf"]), during
    assert after == before
    assert not host.file(f"/boot/vmlinuz-{fake}").exists


def test_running_kernel_is_the_newest_installed(host: Any) -> None:
    """The build rebooted into the kernel its updates brought before sealing."""
    newest = host.check_output("rpm -q --qf '%{VERSION}-%{RELEASE}.%{ARCH}\\n' kernel-core | sort -V | tail -n 1")
    assert newest.strip() == host.check_output("uname -r").strip()
