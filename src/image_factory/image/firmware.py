"""UEFI firmware for builds and image tests: OVMF from the distribution's package, as QEMU needs it.

A UEFI image boots q35 with OVMF's code read-only and a per-VM copy of a variable store (an installer writes
its boot entry there). With Secure Boot it boots OVMF's Secure Boot code (it needs SMM: ``-machine q35,
smm=on`` and a secure pflash) with a store enrolled here, with virt-firmware, with exactly the key set the
catalogue chose (``KEY_SETS``): the distributions' stock stores carry Microsoft's 2011 CAs only, which
expired in 2026 (tianocore/edk2#11281). With ``tpm`` a swtpm process per VM gives it a TPM 2.0.
"""

from __future__ import annotations

import contextlib
import datetime
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from image_factory import tools
from image_factory.errors import FactoryError
from image_factory.tools import OVMF_LOCATIONS, provided_by

# Secure Boot code (refuses to start without SMM, so a guest cannot write the variable store behind the
# firmware's back) and the empty store that goes with it: the keys are enrolled by ``enrolled_store``.
OVMF_SECURE_LOCATIONS: tuple[tuple[str, str], ...] = (
    ("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),  # Debian, Ubuntu: ovmf
    ("/usr/share/edk2/ovmf/OVMF_CODE.secboot.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),  # Fedora: edk2-ovmf
    ("/usr/share/edk2/x64/OVMF_CODE.secboot.4m.fd", "/usr/share/edk2/x64/OVMF_VARS.4m.fd"),  # Arch: edk2-ovmf
)
VARS_NAME = "efivars.fd"
# QEMU: the Secure Boot code's flash is writable only from SMM (what qemu-server sets for OVMF on q35).
SECURE_PFLASH = ["-global", "driver=cfi.pflash01,property=secure,value=on"]


class FirmwareError(FactoryError):
    pass


@dataclass(frozen=True)
class KeySet:
    """What a Secure Boot variable store enrols, as virt-firmware names its bundled certificates."""

    kek: tuple[str, ...] = ()
    db: tuple[str, ...] = ()
    distribution_db: bool = False  # the image family's own CA in db (DISTRIBUTION_CA)
    enrolled: bool = True  # False: no PK at all, the firmware stays in setup mode (nothing is enforced)


# The catalogue's `keys:` (inventory.SecureBootKeys). Microsoft signs shim with its UEFI CA ("3rd party"),
# Windows with its Windows CA; the KEK lets Microsoft update db/dbx. The 2023 option ROM CA is there because
# PVE's own 2023 store and virt-firmware's default enrol it (a passed-through card's option ROM).
KEY_SETS: dict[str, KeySet] = {
    "microsoft-2011+2023": KeySet(
        kek=("microsoft.com/ms-kek-2011", "microsoft.com/ms-kek-2023"),
        db=("microsoft.com/windows-2011", "microsoft.com/ms-uefi-2011", "microsoft.com/windows-2023",
            "microsoft.com/ms-uefi-2023", "microsoft.com/ms-uefi-rom-2023")),
    "microsoft-2023": KeySet(
        kek=("microsoft.com/ms-kek-2023",),
        db=("microsoft.com/windows-2023", "microsoft.com/ms-uefi-2023", "microsoft.com/ms-uefi-rom-2023")),
    "distribution-only": KeySet(distribution_db=True),
    "none": KeySet(enrolled=False),
}
# An image family's Secure Boot CA (the one that signs its GRUB and kernel), as virt-firmware ships it.
DISTRIBUTION_CA: dict[str, tuple[str, ...]] = {
    "debian": ("debian.org/debian-2016",),
    "fedora": ("fedoraproject.org/fedora-2020",),
}
PLATFORM_KEY_CN = "deevnet image factory platform key (private key discarded)"


def locate_ovmf(locations: tuple[tuple[str, str], ...] = OVMF_LOCATIONS) -> tuple[Path, Path]:
    for code, variables in locations:
        if Path(code).is_file() and Path(variables).is_file():
            return Path(code), Path(variables)
    raise FirmwareError(f"firmware: uefi needs OVMF ({provided_by('ovmf')}); looked for "
                        + ", ".join(code for code, _ in locations))


def private_vars(work_dir: Path, template: Path) -> Path:
    """A writable copy of the variable store for one VM: the installer's boot entry lands there."""
    work_dir.mkdir(parents=True, exist_ok=True)
    target = work_dir / VARS_NAME
    shutil.copyfile(template, target)
    target.chmod(0o600)
    return target


def qemu_args(code: Path, variables: Path) -> list[str]:
    """pflash drives for a q35 machine (the caller sets ``-machine q35``)."""
    return ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={variables}"]


def machine_args(machine: str, *, secure_boot: bool) -> list[str]:
    """``-machine`` (SMM on for Secure Boot code) and, with Secure Boot, the SMM-only flash."""
    return ["-machine", f"{machine},smm=on" if secure_boot else machine, *(SECURE_PFLASH if secure_boot else [])]


# ------------------------------------------------------------------------------------- Secure Boot


def _virt_firmware() -> tuple[object, object, object]:
    try:  # local: optional (its absence is a FirmwareError naming what provides it) and ~66 ms to import
        from virt.firmware.efi import certs, guids
        from virt.firmware.varstore import edk2
    except ImportError:
        raise FirmwareError(f"secure_boot needs virt-firmware to enrol the key set ({provided_by('virt-firmware')})"
                            ) from None
    return certs, guids, edk2


def certificate_pem(name: str) -> bytes:
    """One of virt-firmware's bundled certificates (e.g. microsoft.com/ms-uefi-2023) as PEM."""
    certs, _, _ = _virt_firmware()
    try:
        return bytes(certs.load_cert(name))  # type: ignore[attr-defined]
    except (FileNotFoundError, ValueError):
        raise FirmwareError(f"virt-firmware carries no certificate {name!r}: upgrade it (pip install -U "
                            "virt-firmware) or choose another key set") from None


def key_set_certificates(keys: str, family: str) -> dict[str, tuple[str, ...]]:
    """The certificates per variable (KEK, db) that ``keys`` enrols for an image of ``family``."""
    if keys not in KEY_SETS:
        raise FirmwareError(f"unknown Secure Boot key set {keys!r} (known: {', '.join(KEY_SETS)})")
    chosen = KEY_SETS[keys]
    db = chosen.db
    if chosen.distribution_db:
        if family not in DISTRIBUTION_CA:
            raise FirmwareError(f"keys: distribution-only: no Secure Boot CA is known for the {family} family "
                                f"(known: {', '.join(sorted(DISTRIBUTION_CA))})")
        db = db + DISTRIBUTION_CA[family]
    return {"KEK": chosen.kek, "db": db}


def _platform_key_pem() -> bytes:
    """A self-signed PK whose private key is never kept: nothing can change KEK or db after enrolment."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, PLATFORM_KEY_CN)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def enrolled_store(template: Path, target: Path, keys: str, family: str) -> list[dict[str, str]]:
    """Write ``target``: OVMF's empty store ``template`` with exactly the key set ``keys`` enrolled and Secure
    Boot on (or, for ``none``, left in setup mode); returns what it holds (``enrolment``)."""
    certificates = key_set_certificates(keys, family)
    _, guids, edk2 = _virt_firmware()
    target.parent.mkdir(parents=True, exist_ok=True)
    if not KEY_SETS[keys].enrolled:
        shutil.copyfile(template, target)
        target.chmod(0o600)
        return []
    pems = {var: [certificate_pem(name) for name in names] for var, names in certificates.items()}
    store = edk2.Edk2VarStore(str(template))  # type: ignore[attr-defined]
    varlist = store.get_varlist()
    for var in ("PK", "KEK", "db", "dbx"):
        if var in varlist:
            raise FirmwareError(f"{template}: the OVMF variable store template already holds {var}; the factory "
                                "enrols into OVMF's empty store only (OVMF_VARS_4M.fd)")
    owner = guids.parse_str(guids.OvmfEnrollDefaultKeys)  # type: ignore[attr-defined]
    microsoft = guids.parse_str(guids.MicrosoftVendor)  # type: ignore[attr-defined]
    varlist.create("PK").sigdb_add_cert_data(owner, _platform_key_pem())
    for var, blobs in pems.items():
        if blobs:
            entry = varlist.create(var)
            for name, pem in zip(certificates[var], blobs, strict=True):
                entry.sigdb_add_cert_data(microsoft if name.startswith("microsoft.com/") else owner, pem)
    varlist.add_dummy_dbx(guids.OvmfEnrollDefaultKeys)  # type: ignore[attr-defined]
    varlist.set_bool("SecureBootEnable", True)
    varlist.set_bool("CustomMode", False)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".vars-", delete=False) as tmp:
        pass
    try:
        store.write_varstore(tmp.name, varlist)
        Path(tmp.name).chmod(0o600)
        Path(tmp.name).replace(target)
    finally:
        Path(tmp.name).unlink(missing_ok=True)
    return enrolment(target)


def enrolment(store_path: Path) -> list[dict[str, str]]:
    """The certificates in a variable store's PK, KEK and db: variable, subject, sha256 (of the DER), not_after."""
    _, _, edk2 = _virt_firmware()
    varlist = edk2.Edk2VarStore(str(store_path)).get_varlist()  # type: ignore[attr-defined]
    found: list[dict[str, str]] = []
    for var in ("PK", "KEK", "db"):
        if var not in varlist:
            continue
        for siglist in varlist[var].sigdb:
            if siglist.x509 is None:
                continue
            found.append({"variable": var, "subject": siglist.x509.subject.rfc4514_string(),
                          "sha256": siglist.x509.fingerprint(hashes.SHA256()).hex(),
                          "not_after": siglist.x509.not_valid_after_utc.date().isoformat()})
    return found


@dataclass(frozen=True)
class BootFirmware:
    """How one VM boots: QEMU's machine and pflash arguments, its variable store and what that enrolled."""

    code: Path
    variables: Path  # this VM's own store (in its private work directory)
    machine: str
    secure_boot: bool
    enrolled: tuple[dict[str, str], ...] = ()

    def qemu_args(self) -> list[str]:
        return [*machine_args(self.machine, secure_boot=self.secure_boot), *qemu_args(self.code, self.variables)]


def prepare(work_dir: Path, *, machine: str, secure_boot: bool, keys: str | None, family: str) -> BootFirmware:
    """OVMF code and a private variable store in ``work_dir`` for one UEFI VM."""
    if not secure_boot:
        code, template = locate_ovmf()
        return BootFirmware(code, private_vars(work_dir, template), machine, False)
    code, template = locate_ovmf(OVMF_SECURE_LOCATIONS)
    enrolled = enrolled_store(template, work_dir / VARS_NAME, keys or "none", family)
    return BootFirmware(code, work_dir / VARS_NAME, machine, True, tuple(enrolled))


# ---------------------------------------------------------------------------------------------- vTPM


@dataclass
class Tpm:
    """A running swtpm (TPM 2.0) whose control socket QEMU connects to (``qemu_args``)."""

    proc: subprocess.Popen[bytes]
    socket: Path

    def qemu_args(self, device: str = "tpm-tis") -> list[str]:
        return ["-chardev", f"socket,id=chrtpm,path={self.socket}",
                "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", f"{device},tpmdev=tpm0"]


SWTPM_START_S = 10.0


@contextlib.contextmanager
def swtpm(state_dir: Path) -> Iterator[Tpm]:
    """swtpm for one VM, its state and socket in ``state_dir`` (0700, private); stopped and removed always."""
    exe = tools.find("swtpm")
    if exe is None:
        raise FirmwareError(f"tpm: true needs a TPM emulator: {tools.missing_message('swtpm')}")
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    socket = state_dir / "swtpm.sock"
    if len(str(socket)) > 107:
        raise FirmwareError(f"{socket}: a unix socket path must stay under 108 bytes")
    proc = subprocess.Popen([exe, "socket", "--tpm2", "--tpmstate", f"dir={state_dir}",
                             "--ctrl", f"type=unixio,path={socket}", "--log", f"file={state_dir / 'swtpm.log'}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + SWTPM_START_S
        while not socket.exists():
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise FirmwareError(f"swtpm exited at start (status {proc.returncode}): {err.strip()[-500:]}")
            if time.monotonic() > deadline:
                raise FirmwareError(f"swtpm did not open {socket} within {SWTPM_START_S:.0f}s")
            time.sleep(0.05)
        yield Tpm(proc, socket)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()
        shutil.rmtree(state_dir, ignore_errors=True)
