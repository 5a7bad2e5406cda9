"""OVMF variable stores enrolled per Secure Boot key set (read back with virt-firmware's own tool), swtpm's
life per VM, and the test VM's QEMU accepting Secure Boot code with SMM and the TPM."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from image_factory.image import firmware, testguest
from image_factory.platform import Platform
from image_factory.settings import Settings

EMPTY_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
STOCK_MS_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
needs_ovmf = pytest.mark.skipif(not EMPTY_VARS.is_file(), reason="needs Debian's ovmf (./dev setup installs it)")


def _listing(store: Path) -> dict[str, list[str]]:
    """Subject CNs per signature database, as virt-fw-vars (virt-firmware's CLI) prints a store."""
    out = subprocess.run([str(Path(sys.executable).parent / "virt-fw-vars"), "-i", str(store), "-p", "-v"],
                         capture_output=True, text=True, check=True).stdout
    seen: dict[str, list[str]] = {}
    current = ""
    for line in out.splitlines():
        if line.startswith("name="):
            current = line.split()[0].removeprefix("name=")
        elif line.strip().startswith("subject CN="):
            seen.setdefault(current, []).append(line.strip().removeprefix("subject CN="))
        elif line.strip().startswith("bool:"):
            seen.setdefault("flags", []).append(f"{current} {line.strip()}")
    return seen


def _cn(pem: bytes) -> str:
    return str(x509.load_pem_x509_certificate(pem).subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


@needs_ovmf
@pytest.mark.parametrize(("keys", "family", "kek", "db"), [
    ("microsoft-2011+2023", "debian",
     ["Microsoft Corporation KEK CA 2011", "Microsoft Corporation KEK 2K CA 2023"],
     ["Microsoft Windows Production PCA 2011", "Microsoft Corporation UEFI CA 2011", "Windows UEFI CA 2023",
      "Microsoft UEFI CA 2023", "Microsoft Option ROM UEFI CA 2023"]),
    ("microsoft-2023", "fedora", ["Microsoft Corporation KEK 2K CA 2023"],
     ["Windows UEFI CA 2023", "Microsoft UEFI CA 2023", "Microsoft Option ROM UEFI CA 2023"]),
    ("distribution-only", "debian", None, ["Debian Secure Boot CA"]),
    ("distribution-only", "fedora", None, ["fedoraca"]),  # Fedora's CA is named so
])
def test_a_key_set_enrols_exactly_its_certificates(tmp_path: Path, keys: str, family: str,
                                                   kek: list[str] | None, db: list[str]) -> None:
    store = tmp_path / "efivars.fd"
    recorded = firmware.enrolled_store(EMPTY_VARS, store, keys, family)
    listed = _listing(store)
    assert listed.get("KEK") == kek and listed["db"] == db
    assert listed["PK"] == [firmware.PLATFORM_KEY_CN]
    assert "SecureBootEnable bool: ON" in listed["flags"] and "CustomMode bool: off" in listed["flags"]
    assert oct(store.stat().st_mode & 0o777) == "0o600" and store.stat().st_size == EMPTY_VARS.stat().st_size
    # the record (manifest, build log) is what the store holds, fingerprints of the shipped certificates
    assert [(e["variable"], e["subject"].split(",")[0]) for e in recorded] == (
        [("PK", f"CN={firmware.PLATFORM_KEY_CN}")] + [("KEK", f"CN={n}") for n in kek or []]
        + [("db", f"CN={n}") for n in db])
    names = firmware.key_set_certificates(keys, family)["db"]
    shipped = {_cn(firmware.certificate_pem(n)): x509.load_pem_x509_certificate(firmware.certificate_pem(n))
               for n in names}
    from cryptography.hazmat.primitives import hashes
    assert [e["sha256"] for e in recorded if e["variable"] == "db"] == [
        shipped[cn].fingerprint(hashes.SHA256()).hex() for cn in db]


@needs_ovmf
def test_no_keys_leaves_the_firmware_in_setup_mode(tmp_path: Path) -> None:
    store = tmp_path / "efivars.fd"
    assert firmware.enrolled_store(EMPTY_VARS, store, "none", "debian") == []
    assert store.read_bytes() == EMPTY_VARS.read_bytes()
    assert not {"PK", "KEK", "db"} & set(_listing(store))


@needs_ovmf
def test_a_store_template_with_keys_already_is_refused(tmp_path: Path) -> None:
    """Enrolling into Debian's Microsoft store would add to its expired 2011 set: only the empty one is used."""
    if not STOCK_MS_VARS.is_file():
        pytest.skip("no OVMF_VARS_4M.ms.fd")
    with pytest.raises(firmware.FirmwareError, match="already holds PK"):
        firmware.enrolled_store(STOCK_MS_VARS, tmp_path / "efivars.fd", "microsoft-2023", "debian")
    assert not (tmp_path / "efivars.fd").exists()


def test_unknown_key_set_or_family_is_named() -> None:
    with pytest.raises(firmware.FirmwareError, match="unknown Secure Boot key set 'microsoft-2024'"):
        firmware.key_set_certificates("microsoft-2024", "debian")
    with pytest.raises(firmware.FirmwareError, match="no Secure Boot CA is known for the alpine family"):
        firmware.key_set_certificates("distribution-only", "alpine")


def test_without_virt_firmware_secure_boot_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "virt.firmware.efi", None)
    with pytest.raises(firmware.FirmwareError, match=r"virt-firmware, in the \[build\] extra"):
        firmware.enrolled_store(EMPTY_VARS, tmp_path / "efivars.fd", "microsoft-2023", "debian")


needs_swtpm = pytest.mark.skipif(shutil.which("swtpm") is None, reason="needs swtpm (./dev setup installs it)")


@needs_swtpm
def test_swtpm_runs_for_one_vm_and_is_gone_after(tmp_path: Path) -> None:
    state = tmp_path / "tpm"
    with firmware.swtpm(state) as tpm:
        assert tpm.proc.poll() is None and tpm.socket.is_socket()
        assert oct(state.stat().st_mode & 0o777) == "0o700"
        assert f"path={tpm.socket}" in " ".join(tpm.qemu_args())
    assert tpm.proc.poll() is not None and not state.exists()


def test_swtpm_missing_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(firmware.FirmwareError, match="apt-get install swtpm"), firmware.swtpm(tmp_path / "tpm"):
        pass


@needs_ovmf
@needs_swtpm
def test_the_test_vm_starts_secure_boot_code_with_smm_and_a_tpm(tmp_path: Path) -> None:
    """QEMU accepts the Secure Boot code (it aborts without SMM), the enrolled store and the swtpm TPM, as the
    image test starts a Secure Boot + vTPM template; stopping the guest stops its swtpm. No boot is waited for."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs qemu-system-x86")
    disk = tmp_path / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "builds"), "accelerator": "tcg"})
    platform = Platform("uefi", True, "microsoft-2011+2023", True, "q35", "debian")
    guest = testguest.boot_guest(settings, disk, "qcow2", workdir_parent=tmp_path, hostname="sb", platform=platform)
    try:
        assert guest.alive() and guest.qmp_socket is not None
        assert [c for c in _cmdlines_naming(guest.sockdir) if c[0].endswith("swtpm")], "no swtpm for the guest"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(guest.qmp_socket))
            reader = s.makefile("rb")
            assert "QMP" in json.loads(reader.readline())
            s.sendall(b'{"execute":"qmp_capabilities"}\n{"execute":"query-tpm"}\n{"execute":"query-block"}\n')
            assert json.loads(reader.readline()) == {"return": {}}
            [tpm] = json.loads(reader.readline())["return"]
            files = [str((b.get("inserted") or {}).get("file", "")) for b in json.loads(reader.readline())["return"]]
        assert tpm["model"] == "tpm-tis" and tpm["options"]["type"] == "emulator"
        assert any(f.endswith("OVMF_CODE_4M.secboot.fd") for f in files), files
        assert "Microsoft UEFI CA 2023" in _listing(guest.workdir / "efivars.fd")["db"]
    finally:
        guest.stop()
    assert not guest.sockdir.exists() and _cmdlines_naming(guest.sockdir) == []


def _cmdlines_naming(path: Path) -> list[list[str]]:
    """The command lines of this machine's processes that name ``path`` (the guest's qemu and swtpm)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(str(path).encode() in a for a in argv):
            found.append([a.decode(errors="replace") for a in argv if a])
    return found
