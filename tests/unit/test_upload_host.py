"""The host's side of an SSH upload (upload_host.sh), run here by sh against a temp dir as sshd would run it."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from image_factory.pve.upload import partial_name, receive_script
from image_factory.pve.upload_engines import HOST_SCRIPT, PARTIAL_LOCK_WAIT
from image_factory.settings import REPO_ROOT

pytestmark = pytest.mark.unit

TOOLS = ("sh", "flock", "stat", "head", "cat", "mv", "openssl", "sha256sum", "perl")
SCRIPT = REPO_ROOT / "src/image_factory/pve" / HOST_SCRIPT


def _bin(tmp_path: Path, without: tuple[str, ...] = ()) -> str:
    """A PATH holding the tools a Debian host has, minus ``without``."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in TOOLS:
        if tool not in without and (found := shutil.which(tool)):
            os.symlink(found, bindir / tool)
    return str(bindir)


def host(part: Path, final: Path, data: bytes, *, sha256: str | None = None, lock_wait: int = PARTIAL_LOCK_WAIT,
         ) -> list[str]:
    """The host script's command line for an upload of ``data`` (its sha256 unless given) into ``final``."""
    digest = sha256 or hashlib.sha256(data).hexdigest()
    return ["sh", str(SCRIPT), str(part), str(final), str(len(data)), digest, str(lock_wait)]


def _receive(tmp_path: Path, argv: list[str], data: bytes, stdin: str,
             **run: Any) -> subprocess.CompletedProcess[bytes]:
    """Run the host's script with ``data`` on its stdin, from a pipe (as sshd gives it) or from a file."""
    if stdin == "pipe":
        return subprocess.run(argv, input=data, capture_output=True, timeout=60, **run)
    sent = tmp_path / "sent"
    sent.write_bytes(data)
    with sent.open("rb") as source:
        return subprocess.run(argv, stdin=source, capture_output=True, timeout=60, **run)


@pytest.mark.parametrize("without", [(), ("perl",), ("perl", "openssl")], ids=["tee", "no perl", "no openssl"])
@pytest.mark.parametrize("resume_at", [0, 70_000])
@pytest.mark.parametrize("stdin", ["pipe", "file"])  # sshd's is a pipe (the kernel tees); else perl copies
def test_the_host_verifies_what_it_received_and_only_then_renames(tmp_path: Path, without: tuple[str, ...],
                                                                   resume_at: int, stdin: str) -> None:
    data = os.urandom(3_000_000)
    digest = hashlib.sha256(data).hexdigest()
    final = tmp_path / "img.qcow2"
    part = tmp_path / partial_name(final.name)
    part.write_bytes(data[:resume_at])
    proc = _receive(tmp_path, host(part, final, data), data[resume_at:], stdin, env={"PATH": _bin(tmp_path, without)})
    assert proc.returncode == 0, proc.stderr
    offset, verdict = proc.stdout.decode().splitlines()
    assert int(offset) == resume_at and verdict == f"OK {len(data)} {digest}"
    assert final.read_bytes() == data and not part.exists()


def test_wrong_bytes_are_reported_and_never_renamed(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    final = tmp_path / "img.qcow2"
    part = tmp_path / partial_name(final.name)
    damaged = bytes([data[0] ^ 1]) + data[1:]
    proc = subprocess.run(host(part, final, data), input=damaged, capture_output=True, timeout=60)
    assert proc.stdout.decode().splitlines()[1].startswith(f"BAD {len(data)} {hashlib.sha256(damaged).hexdigest()}")
    assert not final.exists() and part.read_bytes() == damaged


def test_a_short_transfer_exits_4_and_leaves_the_partial_to_resume(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    part = tmp_path / partial_name("img.qcow2")
    proc = subprocess.run(host(part, tmp_path / "img.qcow2", data), input=data[:40_000], capture_output=True,
                          timeout=60)
    assert proc.returncode == 4 and part.stat().st_size == 40_000


def test_a_partial_longer_than_the_artifact_is_emptied_under_its_lock(tmp_path: Path) -> None:
    # not a prefix of this artifact (another build's bytes under the name): start over in the same command
    data = os.urandom(100_000)
    final = tmp_path / "img.qcow2"
    part = tmp_path / partial_name(final.name)
    part.write_bytes(os.urandom(150_000))
    proc = subprocess.run(host(part, final, data), input=data, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == ["0", f"OK {len(data)} {hashlib.sha256(data).hexdigest()}"]
    assert final.read_bytes() == data and not part.exists()


@pytest.mark.parametrize("stdin", ["pipe", "file"])
def test_a_failed_write_on_the_host_exits_4_with_the_reason(tmp_path: Path, stdin: str) -> None:
    """A full disk, here a file size limit: the write fails mid-transfer, the partial stays short (to resume)."""
    import resource
    import signal

    data = os.urandom(2_000_000)
    part = tmp_path / partial_name("img.qcow2")
    limit = 1_048_576

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal, as ENOSPC would come
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _receive(tmp_path, host(part, tmp_path / "img.qcow2", data), data, stdin, preexec_fn=small_disk)
    assert proc.returncode == 4
    assert b"write: File too large" in proc.stderr
    assert 0 < part.stat().st_size <= limit and data.startswith(part.read_bytes())


def test_where_splice_fails_the_teed_bytes_are_written_once_and_copying_takes_over(tmp_path: Path) -> None:
    """A filesystem without splice support: the bytes tee(2) already gave the hasher go to the partial only."""
    real = subprocess.run(["perl", "-e", 'require "syscall.ph"; print &SYS_tee'], capture_output=True, text=True)
    assert real.returncode == 0, "this machine's perl has syscall.ph, as a PVE host's has"
    lib = tmp_path / "lib"
    lib.mkdir()
    # tee is the real one; splice is a number no kernel has, so the first splice fails (ENOSYS)
    (lib / "syscall.ph").write_text(f"sub SYS_tee () {{ {real.stdout} }}\nsub SYS_splice () {{ 99999 }}\n1;\n")
    data = os.urandom(3_000_000)
    final = tmp_path / "img.qcow2"
    part = tmp_path / partial_name(final.name)
    proc = subprocess.run(host(part, final, data), input=data, capture_output=True, timeout=60,
                          env={**os.environ, "PERL5LIB": str(lib)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == ["0", f"OK {len(data)} {hashlib.sha256(data).hexdigest()}"]
    assert final.read_bytes() == data


@pytest.mark.parametrize("stdin", ["pipe", "file"])
def test_the_command_the_login_shell_gets_runs_the_script_with_its_arguments(tmp_path: Path, stdin: str) -> None:
    """What the engines send (receive_script): one command line, as sshd hands it to the user's shell with -c."""
    data = os.urandom(500_000)
    final = tmp_path / "a dir with 'quotes'" / "img.qcow2"
    final.parent.mkdir()
    part = final.parent / partial_name(final.name)
    command = receive_script(str(part), str(final), len(data), hashlib.sha256(data).hexdigest())
    proc = _receive(tmp_path, ["sh", "-c", command], data, stdin)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == ["0", f"OK {len(data)} {hashlib.sha256(data).hexdigest()}"]
    assert final.read_bytes() == data and not part.exists()


def test_a_partial_locked_by_an_earlier_writer_exits_1_without_a_word(tmp_path: Path) -> None:
    """A writer from a dropped connection still holds the lock: the uploader reads exit 1 and silence as 'busy'."""
    data = os.urandom(10_000)
    part = tmp_path / partial_name("img.qcow2")
    part.write_bytes(data[:100])
    with subprocess.Popen(["flock", str(part), "sleep", "30"]) as holder:
        try:
            while holder.poll() is None and subprocess.run(["flock", "-n", str(part), "true"]).returncode == 0:
                pass  # until the holder has its lock
            proc = subprocess.run(host(part, tmp_path / "img.qcow2", data, lock_wait=0), input=data,
                                  capture_output=True, timeout=60)
        finally:
            holder.kill()
    assert holder.returncode == -9, "the holder held the lock until the script gave up"
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, b"", b"")
    assert part.read_bytes() == data[:100]  # untouched: the earlier writer's bytes stay


def test_a_rename_that_fails_exits_5_and_leaves_the_verified_partial(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    part = tmp_path / partial_name("img.qcow2")
    proc = subprocess.run(host(part, tmp_path / "gone" / "img.qcow2", data), input=data, capture_output=True,
                          timeout=60)
    assert proc.returncode == 5 and b"gone" in proc.stderr
    assert proc.stdout.decode().splitlines() == ["0"] and part.read_bytes() == data


def test_an_unopenable_partial_exits_2(tmp_path: Path) -> None:
    data = os.urandom(1000)
    proc = subprocess.run(host(tmp_path / "no-dir" / "p", tmp_path / "f", data), input=data, capture_output=True,
                          timeout=60)
    assert proc.returncode == 2 and b"no-dir" in proc.stderr and proc.stdout == b""


@pytest.mark.parametrize("argv", [[], ["p", "f", "1", "0" * 64]], ids=["none", "four"])
def test_a_wrong_call_is_refused_before_anything_is_touched(tmp_path: Path, argv: list[str]) -> None:
    proc = subprocess.run(["sh", str(SCRIPT), *argv], input=b"x", capture_output=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith(b"usage: factory-upload PARTIAL FINAL SIZE SHA256")
    assert list(tmp_path.iterdir()) == []


def test_the_script_ships_in_the_wheel() -> None:
    """A data file the package-data globs miss is absent from an installed factory: the SSH upload would fail."""
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch.fnmatch(HOST_SCRIPT, pattern) for pattern in data["image_factory.pve"])
