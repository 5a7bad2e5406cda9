"""The host's side of an SSH upload (upload.receive_script), run here by sh as sshd would run it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from image_factory.pve.upload import partial_name, receive_script

pytestmark = pytest.mark.unit

TOOLS = ("sh", "flock", "stat", "head", "cat", "mv", "openssl", "sha256sum", "perl")


def _bin(tmp_path: Path, without: tuple[str, ...] = ()) -> str:
    """A PATH holding the tools a Debian host has, minus ``without``."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in TOOLS:
        if tool not in without and (found := shutil.which(tool)):
            os.symlink(found, bindir / tool)
    return str(bindir)


def _receive(tmp_path: Path, script: str, data: bytes, stdin: str, **run: Any) -> subprocess.CompletedProcess[bytes]:
    """Run the host's script with ``data`` on its stdin, from a pipe (as sshd gives it) or from a file."""
    if stdin == "pipe":
        return subprocess.run(["sh", "-c", script], input=data, capture_output=True, timeout=60, **run)
    sent = tmp_path / "sent"
    sent.write_bytes(data)
    with sent.open("rb") as source:
        return subprocess.run(["sh", "-c", script], stdin=source, capture_output=True, timeout=60, **run)


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
    script = receive_script(str(part), str(final), len(data), digest)
    proc = _receive(tmp_path, script, data[resume_at:], stdin, env={"PATH": _bin(tmp_path, without)})
    assert proc.returncode == 0, proc.stderr
    offset, verdict = proc.stdout.decode().splitlines()
    assert int(offset) == resume_at and verdict == f"OK {len(data)} {digest}"
    assert final.read_bytes() == data and not part.exists()


def test_wrong_bytes_are_reported_and_never_renamed(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    final = tmp_path / "img.qcow2"
    part = tmp_path / partial_name(final.name)
    script = receive_script(str(part), str(final), len(data), hashlib.sha256(data).hexdigest())
    damaged = bytes([data[0] ^ 1]) + data[1:]
    proc = subprocess.run(["sh", "-c", script], input=damaged, capture_output=True, timeout=60)
    assert proc.stdout.decode().splitlines()[1].startswith(f"BAD {len(data)} {hashlib.sha256(damaged).hexdigest()}")
    assert not final.exists() and part.read_bytes() == damaged


def test_a_short_transfer_exits_4_and_leaves_the_partial_to_resume(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    part = tmp_path / partial_name("img.qcow2")
    script = receive_script(str(part), str(tmp_path / "img.qcow2"), len(data), hashlib.sha256(data).hexdigest())
    proc = subprocess.run(["sh", "-c", script], input=data[:40_000], capture_output=True, timeout=60)
    assert proc.returncode == 4 and part.stat().st_size == 40_000


def test_a_partial_longer_than_the_artifact_is_emptied_under_its_lock(tmp_path: Path) -> None:
    # not a prefix of this artifact (another build's bytes under the name): start over in the same command
    data = os.urandom(100_000)
    final = tmp_path / "img.qcow2"
    part = tmp_path / partial_name(final.name)
    part.write_bytes(os.urandom(150_000))
    script = receive_script(str(part), str(final), len(data), hashlib.sha256(data).hexdigest())
    proc = subprocess.run(["sh", "-c", script], input=data, capture_output=True, timeout=60)
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
    script = receive_script(str(part), str(tmp_path / "img.qcow2"), len(data), hashlib.sha256(data).hexdigest())
    limit = 1_048_576

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal, as ENOSPC would come
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _receive(tmp_path, script, data, stdin, preexec_fn=small_disk)
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
    script = receive_script(str(part), str(final), len(data), hashlib.sha256(data).hexdigest())
    proc = subprocess.run(["sh", "-c", script], input=data, capture_output=True, timeout=60,
                          env={**os.environ, "PERL5LIB": str(lib)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == ["0", f"OK {len(data)} {hashlib.sha256(data).hexdigest()}"]
    assert final.read_bytes() == data
