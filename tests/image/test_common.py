"""Common to every template: what a clone needs to be reachable and manageable."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

# cloud-init's boot stages by unit name: before 24.3, and from 24.3 on (cloud-init.service became
# cloud-init-main + cloud-init-network). The image must enable the set its cloud-init has.
CLOUD_INIT_UNITS_OLD = ("cloud-init-local.service", "cloud-init.service", "cloud-config.service",
                        "cloud-final.service")
CLOUD_INIT_UNITS_24_3 = ("cloud-init-main.service", "cloud-init-local.service", "cloud-init-network.service",
                         "cloud-config.service", "cloud-final.service")


def cloud_init_units(host: Any) -> tuple[str, ...]:
    listed = host.check_output("systemctl list-unit-files --no-legend --no-pager --type=service 'cloud-*'")
    names = {line.split()[0] for line in listed.splitlines() if line.strip()}
    return CLOUD_INIT_UNITS_24_3 if "cloud-init-main.service" in names else CLOUD_INIT_UNITS_OLD


def test_cloud_init_enabled(host: Any) -> None:
    assert not host.file("/etc/cloud/cloud-init.disabled").exists
    units = cloud_init_units(host)
    enabled = host.run("systemctl is-enabled " + " ".join(units))
    assert enabled.stdout.split() == ["enabled"] * len(units), dict(zip(units, enabled.stdout.split(), strict=False))


def test_cloud_init_finished_without_errors(host: Any) -> None:
    # What `cloud-init status --long` reads, without its Python start (3 s under TCG): result.json
    # is written when the final stage ends, status.json holds each stage's errors.
    with host.sudo():
        # Polls like `status --wait`: keys reach the console shortly before the final stage ends.
        result = json.loads(host.check_output(
            "for i in $(seq 240); do [ -s /run/cloud-init/result.json ] && break; sleep 0.5; done; "
            "cat /run/cloud-init/result.json"))["v1"]
        status = json.loads(host.check_output("cat /run/cloud-init/status.json"))["v1"]
    assert result["errors"] == [], result
    assert not result.get("recoverable_errors"), result
    # The four stages a boot runs ("modules-init" is a legacy name that stays null).
    stages = {k: status.get(k) for k in ("init-local", "init", "modules-config", "modules-final")}
    assert all(isinstance(v, dict) and v.get("finished") for v in stages.values()), stages
    assert {k: v["errors"] for k, v in stages.items() if v["errors"]} == {}
    assert {k: v["errors"] for k, v in status.items() if isinstance(v, dict) and v.get("errors")} == {}


def test_boots_the_newest_installed_kernel(host: Any) -> None:
    """An update that brings a kernel must leave the boot menu on it: the template runs what it was
    updated to (and what this test boots), not the release's original kernel."""
    listed = host.check_output("find /boot -maxdepth 1 -name 'vmlinuz-*' -printf '%f\\n' | sort -V")
    kernels = [k.removeprefix("vmlinuz-") for k in listed.split() if "rescue" not in k]
    assert kernels, "no kernel image in /boot"
    assert host.check_output("uname -r").strip() == kernels[-1], kernels


def test_every_boot_entry_names_an_installed_kernel(host: Any) -> None:
    """No stale boot entry: every kernel a BLS entry (Fedora) or GRUB's generated menu (Debian, whose GRUB
    reads no BLS entries) boots is in /boot. A kernel removed without its entry would leave one."""
    with host.sudo():
        menus = host.run("cat /boot/loader/entries/*.conf /boot/grub/grub.cfg /boot/grub2/grub.cfg 2>/dev/null")
        present = set(host.check_output("ls -1 /boot").split())
    booted = {line.split()[1].rsplit("/", 1)[-1] for line in menus.stdout.splitlines()
              if line.strip().startswith(("linux ", "linux\t", "linux16 ")) and "$" not in line.split()[1]}
    assert booted, "no kernel in any boot menu"
    assert booted <= present, f"boot entries for kernels not in /boot: {sorted(booted - present)}"


def test_qemu_guest_agent_installed(host: Any) -> None:
    assert host.package("qemu-guest-agent").is_installed


def test_qemu_guest_agent_enabled_and_running(host: Any) -> None:
    # The full unit name: without it testinfra falls back to SysV rc links, and Debian's package also
    # ships /etc/init.d/qemu-guest-agent, which "passes" even when the agent binary is gone.
    svc = host.service("qemu-guest-agent.service")
    # Debian's unit is "static" (started by udev when the virtio port appears): is-enabled rc 0.
    assert svc.is_enabled
    assert svc.is_running
    # "active" alone can be an init script that exited 0: the agent process itself must run.
    assert host.process.filter(comm="qemu-ga"), "no qemu-ga process"


def test_qemu_guest_agent_answers(opt: Any) -> None:
    """The agent answers on the virtio-serial channel, as Proxmox (agent=1) would ask it."""
    path = opt("qga_socket")
    if not path:
        pytest.skip("needs --qga-socket (host side of org.qemu.guest_agent.0)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(path)
        # guest-sync flushes stale data and proves request/response pairing.
        s.sendall(b'{"execute":"guest-sync","arguments":{"id":4242}}\n')
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(4096)
            assert chunk, "guest agent channel closed"
            buf += chunk
        reply = json.loads(buf.split(b"\n")[0])
        assert reply == {"return": 4242}


def test_sshd_running(host: Any, family: str | None) -> None:
    if family is None:
        family = "debian" if host.system_info.distribution in ("debian", "ubuntu") else "fedora"
    unit = "ssh" if family == "debian" else "sshd"
    assert host.service(unit).is_running
    assert host.socket("tcp://0.0.0.0:22").is_listening or host.socket("tcp://:::22").is_listening


def test_sshd_password_login_off(host: Any) -> None:
    with host.sudo():
        effective = host.check_output("sshd -T")
    settings = dict(line.split(" ", 1) for line in effective.lower().splitlines() if " " in line)
    assert settings.get("passwordauthentication") == "no"


def test_sshd_host_keys_are_ed25519_and_ecdsa_only(host: Any) -> None:
    with host.sudo():
        effective = host.check_output("sshd -T")
        present = host.check_output("ls /etc/ssh").split()
    # HostKey accumulates over drop-ins, so a path may be listed twice.
    loaded = {line.split(" ", 1)[1] for line in effective.splitlines() if line.lower().startswith("hostkey ")}
    assert loaded == {"/etc/ssh/ssh_host_ecdsa_key", "/etc/ssh/ssh_host_ed25519_key"}
    assert "ssh_host_rsa_key" not in present, "an RSA host key was generated at first boot"


def test_python3_present(host: Any) -> None:
    assert host.exists("python3")
    assert host.run("python3 -c 'import sys; sys.exit(sys.version_info < (3, 8))'").rc == 0


def test_automation_user_passwordless_sudo(host: Any, opt: Any) -> None:
    name = opt("automation_user")
    user = host.user(name)
    assert user.exists, f"automation user {name} missing"
    with host.sudo():
        shadow = host.check_output("getent shadow %s", name).split(":")
        assert shadow[1].startswith(("!", "*")), "automation user has a usable password"
        check = host.run("sudo -n -l -U %s", name)
    assert check.rc == 0 and "NOPASSWD: ALL" in check.stdout, check.stdout + check.stderr


def _first_nic(host: Any) -> dict[str, Any]:
    links = json.loads(host.check_output("ip -j link show"))
    virtual = ("docker", "br", "veth", "virbr")
    nics = [lk for lk in links if lk.get("link_type") == "ether" and not lk["ifname"].startswith(virtual)]
    assert nics, "no ethernet interface"
    return sorted(nics, key=lambda lk: lk["ifindex"])[0]


def test_first_nic_dhcp_with_given_mac(host: Any, opt: Any) -> None:
    nic = _first_nic(host)
    mac = opt("expected_mac")
    if mac:
        assert nic["address"].lower() == mac.lower(), f"{nic['ifname']} has {nic['address']}, expected {mac}"
    addrs = json.loads(host.check_output("ip -j -4 addr show dev %s", nic["ifname"]))
    infos = [a for entry in addrs for a in entry.get("addr_info", [])]
    assert infos, f"{nic['ifname']} has no IPv4 address"
    # A DHCP lease has a finite lifetime ("dynamic"); a static address is "forever".
    assert any(a.get("dynamic") or a.get("valid_life_time", 4294967295) != 4294967295 for a in infos), infos
    route = json.loads(host.check_output("ip -j -4 route show default"))
    assert any(r.get("dev") == nic["ifname"] for r in route), f"no default route via {nic['ifname']}"


def test_serial_console_ttyS0(host: Any) -> None:
    cmdline = host.file("/proc/cmdline").content_string.split()
    assert any(arg.startswith("console=ttyS0") for arg in cmdline), cmdline
    assert host.service("serial-getty@ttyS0").is_running


@pytest.fixture(scope="module")
def firmware(opt: Any) -> str:
    kind = opt("firmware")
    if kind is None:
        pytest.skip("no --firmware given (the image test passes the manifest's)")
    return str(kind)


def test_booted_through_the_manifest_firmware(host: Any, firmware: str) -> None:
    """The kernel exposes /sys/firmware/efi only when UEFI started it: a uefi template that fell back to
    a BIOS path, or a bios one started by OVMF, is caught here."""
    assert host.file("/sys/firmware/efi").is_directory == (firmware == "uefi"), (
        f"the manifest says firmware {firmware}, the guest booted "
        f"{'through UEFI' if host.file('/sys/firmware/efi').exists else 'through a BIOS'}")
    if firmware == "uefi":
        efi_system_partition_mounted_by_uuid(host)


def efi_system_partition_mounted_by_uuid(host: Any) -> None:
    """A clone's kernel and bootloader updates reach the ESP only if /boot/efi is mounted, and it stays
    mounted in every clone only if fstab names it by its filesystem UUID (not a device name)."""
    mount = json.loads(host.check_output("findmnt -J -o SOURCE,FSTYPE,UUID /boot/efi"))["filesystems"][0]
    assert mount["fstype"] == "vfat", mount
    entries = [line.split() for line in host.file("/etc/fstab").content_string.splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    spec = [e[0] for e in entries if len(e) > 1 and e[1] == "/boot/efi"]
    assert spec == [f"UUID={mount['uuid']}"], f"/etc/fstab names /boot/efi as {spec}, the ESP is {mount}"
    with host.sudo():  # the ESP is mounted root-only (umask=0077)
        loader = host.file("/boot/efi/EFI/BOOT/BOOTX64.EFI").is_file
    assert loader, "no loader at the ESP's removable path EFI/BOOT/BOOTX64.EFI"
