"""Packer and qemu-img as the build runs them: ``packer version`` (cached), ``packer build -machine-readable``
in its own process group with live progress and a full log, and the disk's compaction.

Ctrl-C, a timeout or a build VM whose kernel panicked stops packer and QEMU (SIGINT to the group, then
SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from image_factory.files import write_atomic
from image_factory.image import qemuvm, render
from image_factory.image.buildevents import BuildError, BuildVmPanicked, EventSink
from image_factory.settings import Settings
from image_factory.site.inventory import Image

TAIL_LINES = 25


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def require(tool: str) -> str:
    """On PATH only: packer and QEMU come from the system, and a test's stand-in on PATH must win."""
    path = shutil.which(tool)
    if path is None:
        raise render.tool_missing(tool)
    return path

def cached_packer_version(settings: Settings, *, remember: bool = True) -> tuple[int, int, int]:
    """``packer version``, remembered per packer binary (path, size, mtime) in builds/.packer-version.json."""
    exe = require("packer")
    st = Path(exe).stat()
    key = f"{os.path.realpath(exe)}:{st.st_size}:{st.st_mtime_ns}"
    cache = settings.builds_dir / ".packer-version.json"
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        if data.get("key") == key:
            v = data["version"]
            return (int(v[0]), int(v[1]), int(v[2]))
    except (FileNotFoundError, ValueError, KeyError, IndexError, TypeError):
        pass
    version = render.packer_version()
    if not remember:
        return version
    with contextlib.suppress(OSError):
        settings.builds_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(cache, json.dumps({"key": key, "version": list(version)}))
    return version


def parse_machine_readable(line: str) -> tuple[str, str, list[str]] | None:
    """``timestamp,target,type,data...`` -> (target, type, data); commas in data are escaped."""
    parts = line.rstrip("\r\n").split(",")
    if len(parts) < 3 or not parts[0].isdigit():
        return None
    data = [p.replace("%!(PACKER_COMMA)", ",").replace("\\n", "\n").replace("\\r", "\r") for p in parts[3:]]
    return parts[1], parts[2], data


_STEP_RE = re.compile(r"^==> [\w.\-]+: (.*)$")
# Ansible and guest failures worth quoting in the error message (the packer errors alone only say
# "Non-zero exit status").
_NOTABLE_RE = re.compile(r"fatal: |\[ERROR\]|FAILED!|^\s*[\w.\-]+:\s+msg: |UNREACHABLE|No space left")


@dataclass
class _Run:
    log: IO[str]
    sink: EventSink
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    errors: list[str] = field(default_factory=list)
    notable: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    artifacts: list[str] = field(default_factory=list)

    def emit(self, kind: str, message: str) -> None:
        self.sink.emit(kind, message)

    def feed(self, raw: str) -> None:
        parsed = parse_machine_readable(raw)
        elapsed = self.sink.elapsed()
        if parsed is None:
            text = raw.rstrip("\n")
            if text:
                self.log.write(f"[{elapsed:7.1f}s] {text}\n")
                self.tail.append(text)
            return
        _target, kind, data = parsed
        if kind == "ui" and len(data) >= 2:
            level, text = data[0], ",".join(data[1:])
            for ln in text.splitlines() or [""]:
                self.log.write(f"[{elapsed:7.1f}s] {ln}\n")
                if ln.strip():
                    self.tail.append(ln)
                if _NOTABLE_RE.search(ln):
                    self.notable.append(re.sub(r"^\s*[\w.\-]+: ", "", ln.strip()))
            m = _STEP_RE.match(text.strip())
            if level == "error":
                self.errors.append(text.strip())
                self.emit("error", text.strip())
            elif m:
                self.emit("step", m.group(1))
            else:
                self.emit("message", text.strip())
        elif kind == "error" and data:
            msg = ",".join(data).strip()
            self.errors.append(msg)
            self.log.write(f"[{elapsed:7.1f}s] ERROR: {msg}\n")
            self.emit("error", msg)
        elif kind == "artifact" and len(data) >= 4 and data[1] == "file":
            # <target>,artifact,<n>,file,<i>,<path>
            self.artifacts.append(data[3])
            self.log.write(f"[{elapsed:7.1f}s] artifact file: {data[3]}\n")
            self.emit("artifact", data[3])
        self.log.flush()


# How packer is stopped: SIGINT first (packer stops its VM and cleans up), then SIGTERM, then SIGKILL, each to
# the whole process group after the one before had its grace (seconds) to work.
STOP_SIGNALS: tuple[tuple[signal.Signals, float], ...] = (
    (signal.SIGINT, 60), (signal.SIGTERM, 15), (signal.SIGKILL, 15))


def _stop_group(proc: subprocess.Popen[str], log: IO[str]) -> None:
    """Stop the whole process group, one STOP_SIGNALS step after the other until packer has exited."""
    for sig, wait in STOP_SIGNALS:
        if _exited_unreaped(proc, 0):
            break
        log.write(f"stopping packer: sending {sig.name} to its process group\n")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        _exited_unreaped(proc, wait)
    _sweep_group(proc)


def _exited_unreaped(proc: subprocess.Popen[str], timeout: float | None = None) -> bool:
    """Whether packer has exited (waiting up to `timeout` s, None: until it does), leaving it unreaped: while it is
    a zombie its pid, which is its group's id, cannot pass to another process, so a killpg reaches only its group
    (reaped, the pid may be a new session leader's: a lab server was once killed so)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    flags = os.WEXITED | os.WNOWAIT | (0 if deadline is None else os.WNOHANG)
    while proc.returncode is None:
        try:
            if os.waitid(os.P_PID, proc.pid, flags) is not None:
                return True
        except ChildProcessError:  # reaped elsewhere: poll() records it, and no killpg may follow
            proc.poll()
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _sweep_group(proc: subprocess.Popen[str]) -> None:
    """QEMU may outlive packer for a moment: kill what is left of the group while packer's zombie still holds its
    id, then reap packer."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def packer_cache_dir(cwd: Path) -> Path:
    """Where Packer keeps downloads across builds: $PACKER_CACHE_DIR, else builds/.packer_cache."""
    return Path(os.environ.get("PACKER_CACHE_DIR") or cwd.parent / ".packer_cache")


def install_iso_path(cwd: Path, image: Image) -> Path:
    """The install ISO's place in Packer's cache when the template must name it (UEFI on Packer 1.6); Packer
    downloads it again only when its checksum no longer matches."""
    return packer_cache_dir(cwd) / f"{image.name}-install.iso"


class _Watch:
    """The stops a packer run can come to besides its own end: the timeout, or the build VM's kernel panicking
    (its console, watched every 2 s: a dead guest never answers, so stop at once rather than at Packer's SSH
    timeout). Either stops packer's process group as _stop_group does (a packer that ignores SIGINT, or hangs in
    its cleanup, gets SIGTERM and then SIGKILL), from the watch's own thread, since the run's thread is blocked
    reading packer's output until the group has gone."""

    def __init__(self, proc: subprocess.Popen[str], timeout_s: float, serial_log: Path | None) -> None:
        self.proc = proc
        self.serial_log = serial_log
        self.timed_out = threading.Event()
        self.panicked = threading.Event()
        self._done = threading.Event()
        self._signalling = threading.Lock()  # no signal once the run is over: packer may be reaped then
        self.sent: list[str] = []  # the signals the watch sent, for the build log
        self._stopping = False
        self._timer = threading.Timer(timeout_s, self._stop, (self.timed_out,))
        self._timer.daemon = True

    def __enter__(self) -> _Watch:
        self._timer.start()
        threading.Thread(target=self._watch_console, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._signalling:
            self._timer.cancel()
            self._done.set()

    def _stop(self, why: threading.Event) -> None:
        with self._signalling:
            if self._done.is_set():
                return
            why.set()
            first, self._stopping = not self._stopping, True
        if not first:  # the timer and the console watch may both stop it: one escalation, with packer's full grace
            return
        for sig, grace in STOP_SIGNALS:
            with self._signalling:
                if self._done.is_set():
                    return
                self.sent.append(sig.name)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
            if self._done.wait(grace):
                return

    def _watch_console(self) -> None:
        while self.serial_log is not None and not self._done.wait(2.0):
            if qemuvm.console_panicked(self.serial_log):
                self._stop(self.panicked)
                return


def _start_packer(cmd: list[str], cwd: Path, log: IO[str], extra_env: dict[str, str] | None) -> subprocess.Popen[str]:
    log.write(f"# {now()} packer build in {cwd}\n")
    # Packer hands its own environment on to ansible-playbook: the strategy travels that way.
    env = {**render.tool_env(), **(extra_env or {})}
    env.setdefault("PACKER_CACHE_DIR", str(packer_cache_dir(cwd)))
    for key in sorted(extra_env or {}):
        log.write(f"# {key}={env[key]}\n")
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
    )


def _raise_if_stopped(watch: _Watch, log: IO[str], log_path: Path, timeout_s: float) -> None:
    serial_log = watch.serial_log
    if watch.sent:
        log.write(f"stopping packer: sent {', '.join(watch.sent)} to its process group\n")
    if watch.panicked.is_set():
        _stop_group(watch.proc, log)
        log.write(f"# {now()} the build VM's kernel panicked\n")
        tail = "\n".join(f"  {ln}" for ln in serial_log.read_text(errors="replace").splitlines()[-8:]) \
            if serial_log else ""
        raise BuildVmPanicked(f"the build VM's kernel panicked, so the build was stopped (under TCG, a QEMU race "
                              f"in code patching: re-run the build). Its console ended:\n{tail}\nfull log: {log_path}")
    if watch.timed_out.is_set():
        _stop_group(watch.proc, log)
        log.write(f"# {now()} timed out after {timeout_s:.0f} s\n")
        raise BuildError(f"build timeout: packer ran longer than {timeout_s:.0f} s and was stopped; "
                         f"full log: {log_path}")


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[list[int]]:
    """Ctrl-C while Popen starts packer would leave packer running with nobody to stop it (Popen never returns
    it): the signal is noted, and the caller raises it once it holds the process. Only the main thread gets
    SIGINT, and only it may set a handler."""
    noted: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    # Only Python's own Ctrl-C (KeyboardInterrupt) is deferred: a process that ignores SIGINT (started in the
    # background, nohup) or handles it itself keeps doing so.
    if threading.current_thread() is not threading.main_thread() or previous is not signal.default_int_handler:
        yield noted
        return
    signal.signal(signal.SIGINT, lambda signum, _frame: noted.append(signum))
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)


def run_packer(cmd: list[str], *, cwd: Path, log_path: Path, timeout_s: float, sink: EventSink,
               extra_env: dict[str, str] | None = None, serial_log: Path | None = None) -> _Run:
    """Run packer in its own process group; return the parsed run. Raises BuildError on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", encoding="utf-8") as log:
        run = _Run(log=log, sink=sink)
        with _ctrl_c_deferred() as interrupted:
            proc = _start_packer(cmd, cwd, log, extra_env)
        watch = _Watch(proc, timeout_s, serial_log)
        try:
            if interrupted:
                raise KeyboardInterrupt
            with watch:
                assert proc.stdout is not None
                for line in proc.stdout:
                    run.feed(line)
                _exited_unreaped(proc)
        except BaseException:
            _stop_group(proc, log)
            if watch.sent:
                log.write(f"stopping packer: the watch sent {', '.join(watch.sent)} to its process group\n")
            log.write(f"# {now()} interrupted\n")
            raise
        _raise_if_stopped(watch, log, log_path, timeout_s)
        _sweep_group(proc)
        log.write(f"# {now()} packer exited with {proc.returncode}\n")
    if proc.returncode != 0:
        raise BuildError(_failure_message(run, proc.returncode, log_path))
    return run


def run_packer_once_more_on_tcg_panic(cmd: list[str], *, accel: str, work: Path, sink: EventSink, log_path: Path,
                                      **kwargs: Any) -> _Run:
    """run_packer with the build VM's console in ``work``; a kernel panic under TCG is run once more.

    Under TCG a guest kernel can die in its own code patching (an int3 another vCPU met mid-patch: a race in
    QEMU's multi-threaded TCG, not the recipe), as image tests see too. A panic under KVM, a second panic or
    any other failure is the build's result. The panicked attempt's log and console are kept beside the build's.
    """
    serial_log = work / "serial.log"
    if accel == "tcg":
        try:
            return run_packer(cmd, log_path=log_path, serial_log=serial_log, sink=sink, **kwargs)
        except BuildVmPanicked as exc:
            kept_log = log_path.with_name(f"{log_path.stem}.panicked{log_path.suffix}")
            log_path.replace(kept_log)
            with contextlib.suppress(FileNotFoundError):
                serial_log.replace(log_path.with_name("serial.panicked.log"))
            shutil.rmtree(work / "output", ignore_errors=True)  # packer refuses an existing output directory
            sink.emit("status", f"warning: {str(exc).splitlines()[0]}; building once more (that attempt's log: "
                                f"{kept_log})")
    return run_packer(cmd, log_path=log_path, serial_log=serial_log, sink=sink, **kwargs)


def _failure_message(run: _Run, rc: int, log_path: Path) -> str:
    text = "\n".join([*run.errors, *run.tail])
    lower = text.lower()
    if "no space left on device" in lower:
        head = "disk full while building (no space left on device)"
    elif "checksum" in lower and ("mismatch" in lower or "didn't match" in lower or "does not match" in lower):
        head = "source checksum mismatch (packer verified the download)"
    elif "timeout waiting for ssh" in lower:
        head = "the guest never became reachable over SSH"
    else:
        head = f"packer build failed (exit {rc})"
    lines = [*list(run.notable)[-8:], *run.errors[-6:]] or list(run.tail)[-12:]
    body = "\n".join(f"  {ln}" for ln in lines)
    return f"{head}:\n{body}\nfull log: {log_path}"


# ----------------------------------------------------------------------------------------- compact


def qemu_img_info(path: Path) -> dict:
    exe = require("qemu-img")
    proc = subprocess.run([exe, "info", "--output=json", str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise BuildError(f"qemu-img info {path} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


# zstd, not qcow2's default zlib: the same size, made 4.4x faster and imported faster (docs/performance.md,
# "Compression"); readable by qemu-img 5.1 and later (every PVE since 7.0).
COMPRESSION = "zstd"


def compact(src: Path, dst: Path, *, compress: bool) -> None:
    exe = require("qemu-img")
    cmd = [exe, "convert", "-O", "qcow2", "-W", "-m", "4"]
    if compress:
        cmd += ["-c", "-o", f"compression_type={COMPRESSION}"]
    proc = subprocess.run([*cmd, str(src), str(dst)], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        msg = proc.stderr.strip()
        if "No space left" in msg:
            raise BuildError(f"disk full while compacting into {dst}: {msg}")
        raise BuildError(f"qemu-img convert failed: {msg}")


