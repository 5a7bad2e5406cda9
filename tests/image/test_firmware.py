"""The firmware suite (run for every UEFI image; the image test passes the manifest's Secure Boot state and
TPM): the guest booted under UEFI in the Secure Boot state its key set gives, through the signed chain
(firmware -> shim -> GRUB -> kernel), and sees the TPM 2.0 its template carries."""

from __future__ import annotations

from typing import Any

import pytest

EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
SHIM_LOCK = "605dab50-e046-4300-abb6-3dd810dd8b23"


@pytest.fixture(scope="module")
def secure_boot(opt: Any) -> str:
    state = opt("secure_boot")
    if state is None:
        pytest.skip("no --secure-boot given (the image test passes the manifest's)")
    return str(state)


@pytest.fixture(scope="module")
def tpm(opt: Any) -> bool:
    present = opt("tpm")
    if present is None:
        pytest.skip("no --tpm given (the image test passes the manifest's)")
    return present == "yes"


def efi_variable(host: Any, name: str, guid: str = EFI_GLOBAL) -> bytes | None:
    """An EFI variable's value (efivarfs: four bytes of attributes, then the data), None if it is not set."""
    path = f"/sys/firmware/efi/efivars/{name}-{guid}"
    if not host.file(path).exists:
        return None
    return bytes(host.file(path).content)[4:]


def kernel_log(host: Any) -> str:
    with host.sudo():
        return str(host.check_output("journalctl -k -b 0 --no-pager -o cat"))


def esp_mounted(host: Any) -> None:
    """/boot/efi holds the ESP once the boot has settled. An ESP mounted ``nofail`` (the Debian fixture's fstab, as
    in many cloud images) is not ordered before the targets sshd waits for (systemd.mount(5)), so the check first
    waits (bounded) for systemd to finish starting up. Under TCG on a loaded machine systemd's wait for the ESP's
    device (x-systemd.device-timeout, 90 s by default) can run out before udev has named it: the mount then
    failed with result 'dependency' (seen in the lab at a load of 10 on two cores). Then the check starts fstab's
    mount itself, as an admin would: fstab's entry must mount the ESP."""
    host.run("timeout 300 systemctl is-system-running --wait")
    if host.run("findmnt -n /boot/efi").rc == 0:
        return
    with host.sudo():
        started = host.run("timeout 120 systemctl start boot-efi.mount")
        if started.rc != 0 or host.run("findmnt -n /boot/efi").rc != 0:
            status = host.run("systemctl status boot-efi.mount --no-pager; journalctl -b --no-pager | "
                              "grep -i -E 'boot-efi|by-uuid|vfat|FAT-fs' | tail -n 20").stdout
            raise AssertionError(f"fstab's /boot/efi does not mount the ESP:\n{started.stderr}\n{status}")


def test_booted_under_uefi(host: Any, secure_boot: str) -> None:
    assert host.file("/sys/firmware/efi").is_directory, "the firmware suite runs for UEFI images only"


def test_secure_boot_state_is_the_manifests(host: Any, secure_boot: str) -> None:
    """SecureBoot (EFI global variable) is 1 only if the firmware enforced signatures for this boot."""
    value = efi_variable(host, "SecureBoot")
    setup_mode = efi_variable(host, "SetupMode")
    state = "enabled" if value == b"\x01" else "disabled"
    assert state == secure_boot, (f"Secure Boot {state} (SecureBoot={value!r}, SetupMode={setup_mode!r}), the "
                                  f"manifest's key set says {secure_boot}")


def test_kernel_enforces_what_the_firmware_says(host: Any, secure_boot: str) -> None:
    """The kernel saw Secure Boot and locked itself down (integrity): it was booted by a verified chain,
    or it sees no Secure Boot at all."""
    log = kernel_log(host)
    with host.sudo():
        lockdown = str(host.file("/sys/kernel/security/lockdown").content_string)
    if secure_boot == "enabled":
        assert "Secure boot enabled" in log, "the kernel log has no 'Secure boot enabled'"
        assert "[integrity]" in lockdown or "[confidentiality]" in lockdown, f"lockdown: {lockdown.strip()}"
    else:
        assert "Secure boot enabled" not in log
        assert "[none]" in lockdown, f"lockdown: {lockdown.strip()} without Secure Boot"


def test_booted_through_shim(host: Any, secure_boot: str) -> None:
    """shim ran (it publishes its MOK tables to the kernel), and the ESP's removable-path loader is it: the
    firmware verified shim against db, shim verified GRUB and GRUB had the kernel verified through shim."""
    mok = "/sys/firmware/efi/mok-variables"
    shim_ran = host.file(mok).is_directory and bool(host.check_output(f"ls {mok}").split())
    assert shim_ran or efi_variable(host, "MokListRT", SHIM_LOCK) is not None, "no trace of shim in this boot"
    esp_mounted(host)
    with host.sudo():
        loader = host.check_output("grep -c -a 'UEFI shim,shim' /boot/efi/EFI/BOOT/BOOTX64.EFI || true")
    assert loader.strip() not in ("", "0"), "EFI/BOOT/BOOTX64.EFI is not shim"


def test_tpm_is_the_templates(host: Any, tpm: bool) -> None:
    """A vTPM template's VM has a TPM 2.0 with the kernel's resource manager; one without has none."""
    if not tpm:
        assert not host.file("/sys/class/tpm/tpm0").exists, "a TPM the manifest does not have"
        return
    assert host.file("/dev/tpmrm0").exists, "no /dev/tpmrm0"
    major = host.file("/sys/class/tpm/tpm0/tpm_version_major").content_string.strip()
    assert major == "2", f"TPM version {major}, not 2.0"
