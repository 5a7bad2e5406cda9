"""Packer and qemu-img as the build runs them (image/packerrun.py): its machine-readable stream, a build VM's
panic, the compaction. The whole build with a stand-in packer: test_build.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from image_factory.image import buildevents, packerrun

pytestmark = pytest.mark.unit


def test_parse_machine_readable() -> None:
    assert packerrun.parse_machine_readable("1700000000,qemu.image,ui,say,a%!(PACKER_COMMA) b\\nc\n") == (
        "qemu.image", "ui", ["say", "a, b\nc"])
    assert packerrun.parse_machine_readable("1700000000,,error-count,1") == ("", "error-count", ["1"])
    assert packerrun.parse_machine_readable("not machine readable") is None


def test_a_build_vm_kernel_panic_stops_packer_at_once(tmp_path: Path) -> None:
    """A stand-in packer whose VM console reports a panic: stopped within seconds, not at Packer's SSH timeout."""
    serial = tmp_path / "work" / "serial.log"
    serial.parent.mkdir()
    fake = tmp_path / "packer"
    fake.write_text("#!/bin/sh\necho '1,,ui,say,==> qemu.image: Waiting for SSH to become available...'\n"
                    f"sleep 1; printf '[ 26.3] Oops: int3\\n[ 26.4] Kernel panic - not syncing: x\\n' > {serial}\n"
                    "exec sleep 120\n")
    fake.chmod(0o755)
    started = time.monotonic()
    panicked = "(?s)kernel panicked.*re-run the build.*Kernel panic - not syncing"
    with pytest.raises(buildevents.BuildError, match=panicked):
        packerrun.run_packer([str(fake)], cwd=tmp_path, log_path=tmp_path / "build.log", timeout_s=300,
                             sink=buildevents.EventSink(), serial_log=serial)
    assert time.monotonic() - started < 30
    assert "the build VM's kernel panicked" in (tmp_path / "build.log").read_text()


def _packer_panicking_first(tmp_path: Path, then: str) -> tuple[Path, Path]:
    """A stand-in packer whose first build VM panics; later runs do ``then`` (shell)."""
    work = tmp_path / "work"
    (work / "output").mkdir(parents=True)
    runs = tmp_path / "runs"
    fake = tmp_path / "packer"
    fake.write_text(f"#!/bin/sh\necho run >> {runs}\n"
                    f"if [ $(wc -l < {runs}) -eq 1 ]; then\n"
                    f"  printf '[ 26.4] Kernel panic - not syncing: x\\n' > {work}/serial.log; exec sleep 120\nfi\n"
                    f"test -e {work}/output && {{ echo 'Output directory exists'; exit 1; }}\n{then}\n")
    fake.chmod(0o755)
    return fake, work


@pytest.mark.parametrize(
    ("accel", "then", "outcome"),
    [
        ("tcg", "echo '1,,ui,say,==> qemu.image: done'", "built on the second attempt"),
        ("tcg", "printf '[ 26.4] Kernel panic - not syncing: x\\n' > $(dirname $0)/work/serial.log; exec sleep 120",
         "a second panic fails"),
        ("tcg", "exit 3", "another failure on the second attempt is not retried again"),
        ("kvm", "echo never reached", "a panic under KVM is the build's result"),
    ],
)
def test_a_build_vm_panic_under_tcg_is_built_once_more_and_reported(tmp_path: Path, accel: str, then: str,
                                                                    outcome: str) -> None:
    fake, work = _packer_panicking_first(tmp_path, then)
    log = tmp_path / "build.log"
    sink = buildevents.EventSink()

    def run() -> packerrun._Run:
        return packerrun.run_packer_once_more_on_tcg_panic(
            [str(fake)], accel=accel, work=work, sink=sink, cwd=tmp_path, log_path=log, timeout_s=300)

    def statuses() -> list[tuple[str, str]]:  # the build's own word on the run, beside packer's output
        return [(ev.kind, ev.message) for ev in sink.events if ev.kind == "status"]

    if outcome == "built on the second attempt":
        run()
        assert (tmp_path / "runs").read_text().count("run") == 2
        assert len(statuses()) == 1
        assert "kernel panicked" in statuses()[0][1] and "building once more" in statuses()[0][1]
        assert "the build VM's kernel panicked" in (tmp_path / "build.panicked.log").read_text()
        assert "Kernel panic" in (tmp_path / "serial.panicked.log").read_text()
        assert "kernel panicked" not in log.read_text()
        return
    expected = buildevents.BuildVmPanicked if "panic" in outcome else buildevents.BuildError
    with pytest.raises(expected) as caught:
        run()
    if outcome.startswith("another failure"):
        assert not isinstance(caught.value, buildevents.BuildVmPanicked) and "exit 3" in str(caught.value)
    runs = (tmp_path / "runs").read_text().count("run")
    assert runs == (1 if accel == "kvm" else 2)
    assert len(statuses()) == (0 if accel == "kvm" else 1)


def test_a_compressed_artifact_is_zstd_and_holds_the_same_disk(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as fh:
        fh.write(b"factory " * 512 * 1024)  # 4 MiB that compresses
        fh.truncate(16 * 1024 * 1024)
    packed = tmp_path / "disk.qcow2"
    packerrun.compact(raw, packed, compress=True)
    info = json.loads(subprocess.check_output(["qemu-img", "info", "--output=json", str(packed)]))
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    assert packed.stat().st_size < 1024 * 1024
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(raw), str(packed)], check=True)


def test_a_qemu_left_by_packer_is_killed_and_packer_is_reaped_only_after(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Packer's group is swept while packer is still an unreaped zombie, so its group id names only its own
    processes; afterwards packer is reaped and nothing of the group is left."""
    pidfile = tmp_path / "qemu.pid"
    fake = tmp_path / "packer"
    # the stray "QEMU" keeps no pipe open (packer's stdout would hold the run until it ended)
    fake.write_text(f"#!/bin/sh\nsleep 300 >/dev/null 2>&1 &\necho $! > {pidfile}\n"
                    "echo '1,,ui,say,Build finished'\nexit 0\n")
    fake.chmod(0o755)
    seen: list[str] = []
    real_killpg = packerrun.os.killpg

    def killpg(pgid: int, sig: int) -> None:
        state = Path(f"/proc/{pgid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        seen.append(state)  # the leader (packer) is a zombie here, never a stranger or gone
        real_killpg(pgid, sig)

    monkeypatch.setattr(packerrun.os, "killpg", killpg)
    run = packerrun.run_packer([str(fake)], cwd=tmp_path, log_path=tmp_path / "build.log", timeout_s=60,
                               sink=buildevents.EventSink())
    assert run is not None and seen == ["Z"]
    assert _gone(int(pidfile.read_text()))


def test_a_packer_that_ignores_ctrl_c_is_stopped_at_its_timeout_by_term_then_kill(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A packer hung past its timeout that ignores SIGINT and SIGTERM (with a child that does too) is not waited
    for forever: the watch escalates to SIGKILL on the whole group, and the run ends as a timeout."""
    monkeypatch.setattr(packerrun, "STOP_SIGNALS",
                        ((signal.SIGINT, 0.5), (signal.SIGTERM, 0.5), (signal.SIGKILL, 30)))
    pidfile = tmp_path / "child.pid"
    fake = tmp_path / "packer"
    fake.write_text(f"#!/bin/sh\ntrap '' INT TERM\nsleep 3600 &\necho $! > {pidfile}\n"
                    "echo '1,,ui,say,==> qemu.image: Waiting for SSH to become available...'\n"
                    "i=0; while [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done\n")  # gives up by itself at 120 s
    fake.chmod(0o755)
    started = time.monotonic()
    with pytest.raises(buildevents.BuildError, match="build timeout: packer ran longer than 1 s"):
        packerrun.run_packer([str(fake)], cwd=tmp_path, log_path=tmp_path / "build.log", timeout_s=1,
                             sink=buildevents.EventSink())
    assert time.monotonic() - started < 100  # stopped by SIGKILL, not at the fake's own end
    assert "sent SIGINT, SIGTERM, SIGKILL to its process group" in (tmp_path / "build.log").read_text()
    assert _gone(int(pidfile.read_text()))


def _gone(pid: int) -> bool:
    """The process ended (a zombie counts: its parent, packer, is gone and init reaps it in its own time)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_ctrl_c_while_packer_starts_stops_it_once_it_is_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C arriving inside Popen (before the run holds packer) is raised once it does, and packer is stopped,
    not orphaned."""
    fake = tmp_path / "packer"
    fake.write_text("#!/bin/sh\nexec sleep 120\n")
    fake.chmod(0o755)
    started: list[subprocess.Popen[str]] = []
    real_start = packerrun._start_packer

    def start_then_ctrl_c(*args: object) -> subprocess.Popen[str]:
        proc = real_start(*args)  # type: ignore[arg-type]
        started.append(proc)
        os.kill(os.getpid(), signal.SIGINT)  # as if typed while Popen was still returning
        return proc

    monkeypatch.setattr(packerrun, "_start_packer", start_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        packerrun.run_packer([str(fake)], cwd=tmp_path, log_path=tmp_path / "build.log", timeout_s=60,
                             sink=buildevents.EventSink())
    assert started and started[0].returncode is not None  # stopped and reaped
    assert "interrupted" in (tmp_path / "build.log").read_text()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_run_that_ignores_ctrl_c_keeps_ignoring_it_while_packer_starts(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Started in the background or under nohup, SIGINT is ignored: the deferral must not turn it into a stop."""
    fake = tmp_path / "packer"
    fake.write_text("#!/bin/sh\necho '1,,ui,say,Build finished'\nexit 0\n")
    fake.chmod(0o755)
    real_start = packerrun._start_packer

    def start_then_ctrl_c(*args: object) -> subprocess.Popen[str]:
        proc = real_start(*args)  # type: ignore[arg-type]
        os.kill(os.getpid(), signal.SIGINT)
        return proc

    monkeypatch.setattr(packerrun, "_start_packer", start_then_ctrl_c)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run = packerrun.run_packer([str(fake)], cwd=tmp_path, log_path=tmp_path / "build.log", timeout_s=60,
                                   sink=buildevents.EventSink())
        assert run is not None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
