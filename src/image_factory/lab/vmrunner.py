"""A started lab VM runs for real: qemu (TCG unless KVM works) on the VM's disk files.

What PVE would do at ``qm start`` and the lab reproduces:
- each ``netN`` becomes a NIC with its configured MAC (user-mode networking); the first NIC's
  guest port 22 is forwarded from the VM's lab address ``127.(100+slot).(vmid/256).(vmid%256)``
  port 22, so the guest's SSH is reachable from the host at an address of its own;
- the cloud-init drive (``ide2: <store>:vm-<id>-cloudinit``) is regenerated from the VM's
  cloud-init settings as a NoCloud seed (PVE's default ``citype`` for Linux): ciuser, sshkeys
  (URL-decoded), ipconfigN, nameserver, searchdomain, ciupgrade, hostname = VM name, network
  config matched by MAC;
- ``agent: enabled=1`` adds the virtio-serial port ``org.qemu.guest_agent.0``; the lab's API
  relays guest-agent commands to the real agent in the guest through it;
- memory is the configured one capped at the lab's ``vm_memory_cap``; one vCPU;
- ``bios: ovmf`` boots OVMF with ``efidisk0`` as its variable store, as qemu-server's OVMF.pm does: the
  Secure Boot code (SMM) on q35 with a 4m store, the plain code otherwise; ``tpmstate0`` starts an swtpm
  (TPM 2.0 for ``version=v2.0``) on the state volume, attached as a TIS device.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from image_factory.image.qemuvm import QemuError, accel_args, make_seed_iso
from image_factory.lab.config import vm_address

__all__ = ["LaunchError", "VmProcess", "launch", "nics_of", "vm_address", "seed_files"]

NET_MODELS = {"virtio": "virtio-net-pci", "e1000": "e1000", "vmxnet3": "vmxnet3", "rtl8139": "rtl8139",
              "e1000e": "e1000e"}


class LaunchError(Exception):
    pass


def _props(value: str) -> tuple[str | None, dict[str, str]]:
    """(the bare value, the keyed ones) of a stored property string: PVE takes the bare value (its default key's)
    in any position and keeps machine and agent as written (docs/pve-facts.md, "Property strings by version")."""
    first, props = None, {}
    for part in str(value).split(","):
        key, eq, val = part.partition("=")
        if eq:
            props[key] = val
        elif part and first is None:
            first = part
    return first, props


def agent_enabled(config: dict[str, Any]) -> bool:
    """``agent``'s enabled (its default key, so possibly bare and in any position), read as
    PVE::JSONSchema::parse_boolean reads a boolean."""
    bare, agent = _props(str(config.get("agent", "0")))
    return str(agent.get("enabled", bare)).lower() in ("1", "true", "yes", "on")


def nics_of(config: dict[str, Any]) -> list[tuple[str, str]]:
    """[(netN, MAC)] in device order, from `virtio=BC:24:11:..,bridge=vmbr0` values."""
    out = []
    for key in sorted((k for k in config if k.startswith("net") and k[3:].isdigit()), key=lambda k: int(k[3:])):
        for part in str(config[key]).split(","):
            name, _, val = part.partition("=")
            if name in NET_MODELS or name in ("e1000-82540em", "i82551", "ne2k_pci", "pcnet"):
                out.append((key, val))
                break
            if name == "macaddr":
                out.append((key, val))
                break
    return out


def _nic_model(value: str) -> str:
    for part in str(value).split(","):
        name = part.partition("=")[0]
        if name in NET_MODELS:
            return NET_MODELS[name]
    return "virtio-net-pci"


@dataclass
class IpConfig:
    dhcp: bool = True
    address: str | None = None  # CIDR
    gateway: str | None = None
    ip6: str | None = None  # auto, dhcp or a CIDR, as ipconfigN's ip6=
    gateway6: str | None = None


def _ipconfig(value: str | None) -> IpConfig:
    if not value:
        return IpConfig()
    _, props = _props("x," + value)
    ip = props.get("ip", "dhcp")
    ip6, gw6 = props.get("ip6"), props.get("gw6")
    if ip == "dhcp":
        return IpConfig(ip6=ip6, gateway6=gw6)
    return IpConfig(dhcp=False, address=ip, gateway=props.get("gw"), ip6=ip6, gateway6=gw6)


def _ip6_subnet(ipc: IpConfig) -> list[str]:
    """qemu-server's nocloud network v1 for ip6= (Cloudinit.pm): dhcp6, ipv6_slaac, or static6 with its gateway."""
    if ipc.ip6 is None:
        return []
    if ipc.ip6 in ("dhcp", "auto"):
        return [f"      - type: {'dhcp6' if ipc.ip6 == 'dhcp' else 'ipv6_slaac'}"]
    lines = ["      - type: static6", f"        address: '{ipc.ip6}'"]
    return lines + ([f"        gateway: '{ipc.gateway6}'"] if ipc.gateway6 else [])


def seed_files(name: str, config: dict[str, Any], vendor_data: str | None = None) -> dict[str, str]:
    """The NoCloud seed PVE's cloud-init drive holds: user-data, meta-data, network-config (v1), and the
    ``cicustom`` vendor snippet as vendor-data (its contents given; qemu-server's instance-id hashes user-data and
    network-config only, so a changed snippet alone is the same instance to cloud-init)."""
    user = config.get("ciuser") or "root"
    keys = urllib.parse.unquote(str(config.get("sshkeys") or ""))
    search = config.get("searchdomain")
    lines = ["#cloud-config", f"hostname: {name}", "manage_etc_hosts: true"]
    if search:
        lines.append(f"fqdn: {name}.{search}")
    lines.append(f"user: {json.dumps(str(user))}")
    key_lines = [k.strip() for k in keys.splitlines() if k.strip()]
    if key_lines:
        lines.append("ssh_authorized_keys:")
        lines += [f"  - {json.dumps(k)}" for k in key_lines]
    lines += ["chpasswd:", "  expire: False", "users:", "  - default"]
    lines.append(f"package_upgrade: {'true' if str(config.get('ciupgrade', '1')) in ('1', 'true') else 'false'}")
    user_data = "\n".join(lines) + "\n"

    net = ["version: 1", "config:"]
    for n, (key, mac) in enumerate(nics_of(config)):
        idx = key[3:]
        ipc = _ipconfig(config.get(f"ipconfig{idx}"))
        net += ["    - type: physical", f"      name: eth{n}", f"      mac_address: '{mac.lower()}'",
                "      subnets:"]
        if ipc.dhcp:
            net.append("      - type: dhcp4")
        else:
            assert ipc.address is not None
            iface = ipaddress.ip_interface(ipc.address)
            net += ["      - type: static", f"        address: '{iface.ip}'", f"        netmask: '{iface.netmask}'"]
            if ipc.gateway:
                net.append(f"        gateway: '{ipc.gateway}'")
        net += _ip6_subnet(ipc)
    if config.get("nameserver") or search:
        net.append("    - type: nameserver")
        if config.get("nameserver"):
            net += ["      address:"] + [f"      - '{a}'" for a in str(config["nameserver"]).split()]
        if search:
            net += ["      search:"] + [f"      - '{s}'" for s in str(search).split()]
    network = "\n".join(net) + "\n"
    instance = hashlib.sha1((user_data + network).encode(), usedforsecurity=False).hexdigest()
    meta = f"instance-id: {instance}\nlocal-hostname: {name}\n"
    files = {"user-data": user_data, "meta-data": meta, "network-config": network}
    if vendor_data is not None:
        files["vendor-data"] = vendor_data
    return files


def _write_seed(files: dict[str, str], dest: Path, fmt: str) -> None:
    with tempfile.TemporaryDirectory(prefix="lab-seed-") as tmp:
        try:
            iso = make_seed_iso(Path(tmp), files)
        except QemuError as exc:
            raise LaunchError(f"cannot make the cloud-init seed: {exc}") from None
        if fmt == "raw":
            os.replace(iso, dest)
        else:
            proc = subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, str(iso), str(dest)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise LaunchError(f"cannot write the cloud-init drive {dest}: {proc.stderr.strip()}")


def _image_format(path: Path) -> str:
    if path.suffix in (".qcow2", ".vmdk", ".raw"):
        return path.suffix[1:]
    # an LVM-thin volume has no suffix: raw, except a linked clone, which the lab keeps as a qcow2 overlay
    with contextlib.suppress(OSError), path.open("rb") as f:
        if f.read(4) == b"QFI\xfb":
            return "qcow2"
    return "raw"


@dataclass
class VmProcess:
    vmid: int
    name: str
    pid: int
    address: str
    nics: list[tuple[str, str]]
    qga: Path | None
    qmp: Path
    record: Path
    serial_log: Path
    argv: list[str] = field(default_factory=list)
    _proc: subprocess.Popen[bytes] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _swtpm: subprocess.Popen[bytes] | None = None

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "ssh_host": self.address, "ssh_port": 22,
                "macs": [mac.lower() for _k, mac in self.nics], "serial_log": str(self.serial_log),
                "qga": str(self.qga) if self.qga else None}

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self, grace: float = 3.0) -> None:
        """Kill the qemu (like `qm stop`: no guest shutdown)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
        if self._swtpm is not None and self._swtpm.poll() is None:  # --terminate ends it with QEMU; in case not
            self._swtpm.kill()
            self._swtpm.wait(timeout=5)
        self._cleanup()

    def _cleanup(self) -> None:
        for p in (self.record, self.qmp, self.qga):
            if p is not None:
                p.unlink(missing_ok=True)

    def qmp_command(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """One QMP command; raises OSError with QEMU's error."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(self.qmp))
            f = s.makefile("rwb")
            f.readline()
            f.write(json.dumps({"execute": "qmp_capabilities"}).encode() + b"\n")
            f.flush()
            f.readline()
            msg: dict[str, Any] = {"execute": command}
            if arguments:
                msg["arguments"] = arguments
            f.write(json.dumps(msg).encode() + b"\n")
            f.flush()
            while True:
                answer = json.loads(f.readline() or b"{}")
                if "event" in answer:
                    continue
                if "error" in answer:
                    raise OSError(answer["error"].get("desc", "QMP error"))
                return answer.get("return")

    def powerdown(self, timeout: float) -> bool:
        """ACPI power button through QMP; True if the guest powered off within timeout seconds."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(str(self.qmp))
                f = s.makefile("rwb")
                f.readline()
                for cmd in ({"execute": "qmp_capabilities"}, {"execute": "system_powerdown"}):
                    f.write(json.dumps(cmd).encode() + b"\n")
                    f.flush()
                    f.readline()
        except OSError:
            return not self.alive()
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not self.alive():
            self.stop()
            return True
        return False

    def agent(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 3.0) -> Any:
        """One guest-agent command through the virtio-serial socket; raises OSError/TimeoutError."""
        if self.qga is None:
            raise OSError("no guest agent channel")
        with self._lock, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.qga))
            sync_id = int.from_bytes(os.urandom(3), "big")
            s.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited",
                                            "arguments": {"id": sync_id}}).encode() + b"\n")
            buf = b""
            deadline = time.monotonic() + timeout
            # Skip anything before the 0xFF sentinel, then read the sync answer.
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError("guest agent did not answer guest-sync")
                chunk = s.recv(65536)
                if not chunk:
                    raise OSError("guest agent channel closed")
                buf += chunk
                if b"\xff" in buf:
                    buf = buf.rsplit(b"\xff", 1)[1]
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    with contextlib.suppress(ValueError):
                        if json.loads(line).get("return") == sync_id:
                            break
                else:
                    continue
                break
            msg: dict[str, Any] = {"execute": command}
            if arguments:
                msg["arguments"] = arguments
            s.sendall(json.dumps(msg).encode() + b"\n")
            while b"\n" not in buf:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"guest agent did not answer {command}")
                chunk = s.recv(65536)
                if not chunk:
                    raise OSError("guest agent channel closed")
                buf += chunk
            answer = json.loads(buf.split(b"\n", 1)[0])
            if "error" in answer:
                raise OSError(answer["error"].get("desc", "guest agent error"))
            return answer.get("return")

    def guest_up(self) -> bool:
        """True once the guest agent answers (the guest has booted that far)."""
        if self.qga is None:
            return self.ssh_banner()
        try:
            self.agent("guest-ping", timeout=2.0)
            return True
        except (OSError, TimeoutError, ValueError):
            return False

    def ssh_banner(self) -> bool:
        try:
            with socket.create_connection((self.address, 22), timeout=2) as s:
                return s.recv(4).startswith(b"SSH-")
        except OSError:
            return False


FIRMWARE_DRIVES = ("efidisk0", "tpmstate0")  # not block devices of the guest: see firmware_args
OVMF_DIR = Path("/usr/share/OVMF")  # Debian's ovmf: the same files pve-edk2-firmware ships


def firmware_args(config: dict[str, Any], disks: dict[str, tuple[str, dict[str, str], Path | None]], vmid: int,
                  vms_dir: Path, log_dir: Path, node: str) -> tuple[list[str], subprocess.Popen[bytes] | None]:
    """QEMU arguments for the VM's machine, OVMF and TPM, and the swtpm started for it (or None)."""
    argv: list[str] = []
    bare_type, machine = _props(str(config.get("machine") or "pc"))
    q35 = "q35" in (machine.get("type") or bare_type or "pc")
    efi = disks.get("efidisk0")
    efi_props = efi[1] if efi else {}
    secure = q35 and efi_props.get("efitype") == "4m"
    if q35:
        argv += ["-machine", "q35,smm=on" if secure else "q35"]
    if str(config.get("bios") or "seabios") == "ovmf":
        code = OVMF_DIR / ("OVMF_CODE_4M.secboot.fd" if secure else "OVMF_CODE_4M.fd")
        if efi is None or efi[2] is None or not efi[2].exists():
            raise LaunchError("the lab boots OVMF only with an efidisk0 volume")
        if secure:
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
        argv += ["-drive", f"if=pflash,unit=0,format=raw,readonly=on,file={code}",
                 "-drive", f"if=pflash,unit=1,format={_image_format(efi[2])},file={efi[2]}"]
    tpm = disks.get("tpmstate0")
    if tpm is None or tpm[2] is None:
        return argv, None
    sock = vms_dir / f"{vmid}.swtpm"
    sock.unlink(missing_ok=True)
    # swtpm reads raw state only (PVE exports a qcow2 volume through FUSE): a qcow2 volume keeps its state beside
    state = (f"backend-uri=file://{tpm[2]}" if _image_format(tpm[2]) == "raw"
             else f"dir={vms_dir / f'{vmid}-tpm'}")
    if state.startswith("dir="):
        (vms_dir / f"{vmid}-tpm").mkdir(exist_ok=True)
    version = ["--tpm2"] if tpm[1].get("version") == "v2.0" else []
    swtpm = subprocess.Popen(
        ["swtpm", "socket", "--tpmstate", state, "--ctrl", f"type=unixio,path={sock}", "--terminate",
         "--log", f"file={log_dir / f'{node}-vm{vmid}-swtpm.log'},level=1", *version],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 10
    while not sock.exists() and swtpm.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not sock.exists():
        swtpm.kill()
        raise LaunchError(f"swtpm did not start for VM {vmid} (see {log_dir}/{node}-vm{vmid}-swtpm.log)")
    argv += ["-chardev", f"socket,id=tpmchar,path={sock}", "-tpmdev", "emulator,id=tpmdev,chardev=tpmchar",
             "-device", "tpm-tis,tpmdev=tpmdev"]
    return argv, swtpm


def _int_option(config: dict[str, Any], key: str) -> int:
    try:
        return max(1, int(str(config.get(key, 1))))
    except ValueError:
        return 1


def _disk_args(name: str, config: dict[str, Any], disks: dict[str, tuple[str, dict[str, str], Path | None]],
               order: list[str], vendor_data: str | None) -> list[str]:
    """The guest's block devices, each on the bus its key names; a cloud-init volume gets its seed first."""
    argv: list[str] = []
    for key, (volume, props, path) in sorted(disks.items()):
        cdrom = props.get("media") == "cdrom"
        if volume in ("none", "cdrom") or path is None or key in FIRMWARE_DRIVES:
            continue
        if "cloudinit" in volume:
            _write_seed(seed_files(name, config, vendor_data), path, _image_format(path))
        if not path.exists():
            raise LaunchError(f"volume '{volume}' does not exist")
        fmt = _image_format(path)
        drive_id = f"drive-{key}"
        bootindex = f",bootindex={order.index(key) + 1}" if key in order else ""
        media = ",media=cdrom,readonly=on" if cdrom else ""
        argv += ["-drive", f"file={path},if=none,id={drive_id},format={fmt}{media}"]
        if key.startswith("scsi"):
            dev = "scsi-cd" if cdrom else "scsi-hd"
            argv += ["-device", f"{dev},bus=scsihw0.0,scsi-id={int(key[4:])},drive={drive_id}{bootindex}"]
        elif key.startswith("virtio"):
            argv += ["-device", f"virtio-blk-pci,drive={drive_id}{bootindex}"]
        elif key.startswith("sata"):
            argv += ["-device", f"ide-{'cd' if cdrom else 'hd'},drive={drive_id}{bootindex}"]
        else:  # ideN: the legacy IDE buses
            n = int(key[3:])
            argv += ["-device", f"ide-{'cd' if cdrom else 'hd'},bus=ide.{n // 2},unit={n % 2},drive={drive_id}"
                     f"{bootindex}"]
    return argv


def _nic_args(config: dict[str, Any], nics: list[tuple[str, str]], order: list[str], address: str) -> list[str]:
    """User-mode networks: the first NIC's port 22 forwarded from the VM's lab address, the others restricted; a
    static ipconfig puts the guest's address and gateway into the network qemu emulates."""
    argv: list[str] = []
    for n, (key, mac) in enumerate(nics):
        idx = key[3:]
        ipc = _ipconfig(config.get(f"ipconfig{idx}"))
        netdev = f"user,id={key}"
        guest = ""
        if not ipc.dhcp and ipc.address:
            iface = ipaddress.ip_interface(ipc.address)
            host = ipc.gateway or str(next(h for h in iface.network.hosts() if h != iface.ip))
            netdev += f",net={iface.network},host={host}"
            guest = str(iface.ip)
        if n == 0:
            netdev += f",hostfwd=tcp:{address}:22-{guest}:22"
        else:
            netdev += ",restrict=on"
        argv += ["-netdev", netdev,
                 "-device", f"{_nic_model(config[key])},netdev={key},mac={mac.lower()}"
                            f"{f',bootindex={order.index(key) + 1}' if key in order else ''}"]
    return argv


def _start_qemu(argv: list[str], qemu_log: Path, qmp: Path,
                swtpm: subprocess.Popen[bytes] | None) -> subprocess.Popen[bytes]:
    """Start qemu and wait (10 s at most) for its QMP socket; a qemu that exits takes its swtpm with it."""
    with qemu_log.open("ab") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if swtpm is not None:
                swtpm.kill()
                swtpm.wait(timeout=5)
            tail = qemu_log.read_text(errors="replace").strip().splitlines()[-3:]
            raise LaunchError(f"start failed: QEMU exited with code {proc.returncode}: {' '.join(tail)}")
        if qmp.exists():
            break
        time.sleep(0.05)
    return proc


def launch(*, vmid: int, name: str, config: dict[str, Any], disks: dict[str, tuple[str, dict[str, str], Path | None]],
           address: str, vms_dir: Path, log_dir: Path, memory_cap: int, node: str,
           accelerator: str = "auto", vendor_data: str | None = None) -> VmProcess:
    vms_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    memory = min(int(str(config.get("memory", 512)).split("=")[-1]), memory_cap)
    # As PVE does: cores x sockets vCPUs, but never more than this machine has (TCG runs one host
    # thread per vCPU).
    vcpus = min(_int_option(config, "cores") * _int_option(config, "sockets"), os.cpu_count() or 1)
    qmp = vms_dir / f"{vmid}.qmp"
    qga = vms_dir / f"{vmid}.qga" if agent_enabled(config) else None
    serial_log = log_dir / f"{node}-vm{vmid}-serial.log"
    argv = ["qemu-system-x86_64", "-name", f"lab-{node}-vm{vmid},process=lab-{node}-vm{vmid}",
            *accel_args(accelerator), "-m", str(memory), "-smp", str(vcpus), "-nodefaults", "-no-user-config",
            "-display", "none", "-vga", "none", "-serial", f"file:{serial_log}",
            "-qmp", f"unix:{qmp},server=on,wait=off",
            "-device", "virtio-scsi-pci,id=scsihw0"]
    boot = str(config.get("boot", ""))
    order = boot[len("order="):].split(";") if boot.startswith("order=") else []
    argv += _disk_args(name, config, disks, order, vendor_data)
    extra, swtpm = firmware_args(config, disks, vmid, vms_dir, log_dir, node)
    argv += extra
    nics = nics_of(config)
    argv += _nic_args(config, nics, order, address)
    if qga is not None:
        qga.unlink(missing_ok=True)
        argv += ["-chardev", f"socket,id=qga0,path={qga},server=on,wait=off",
                 "-device", "virtio-serial-pci,id=qga-serial",
                 "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
    proc = _start_qemu(argv, log_dir / f"{node}-vm{vmid}-qemu.log", qmp, swtpm)
    record = vms_dir / f"{vmid}.json"
    vmp = VmProcess(vmid=vmid, name=name, pid=proc.pid, address=address, nics=nics, qga=qga, qmp=qmp,
                    record=record, serial_log=serial_log, argv=argv, _proc=proc, _swtpm=swtpm)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({"vmid": vmid, "name": name, "node": node, **vmp.describe()}, indent=2) + "\n")
    tmp.replace(record)
    return vmp
