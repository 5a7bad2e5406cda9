"""upload_engines.py: the engine registry and what an attempt's end means, each as a type."""

from __future__ import annotations

from pathlib import Path

import pytest

from image_factory.pve.sshlink import SshLink
from image_factory.pve.upload import ENGINES, SshUploader, UploadError
from image_factory.pve.upload_engines import (
    ENGINE_TYPES,
    RETRYABLE,
    DiskFull,
    ExecEngine,
    HostRefused,
    HostScriptFailed,
    LinkLost,
    OpensshEngine,
    PartialBusy,
    Transfer,
    UploadEngine,
    engine_named,
    no_offset_failure,
    raise_if_disk_full,
)
from image_factory.site.inventory import SshEndpoint

pytestmark = pytest.mark.unit


def test_every_engine_name_callers_offer_is_a_registered_engine() -> None:
    assert ENGINES == ("openssh", "exec", "sftp") == tuple(ENGINE_TYPES)
    for name, engine_type in ENGINE_TYPES.items():
        assert issubclass(engine_type, UploadEngine) and engine_type.name == name
        engine = engine_named(name, chunk=4096, channel_timeout=5)
        assert (engine.name, engine.chunk, engine.channel_timeout) == (name, 4096, 5)


def test_auto_is_openssh_where_ssh_is_installed_else_exec(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert engine_named("auto").name == ("openssh" if OpensshEngine.available() else "exec")
    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh client here
    assert isinstance(engine_named("auto"), ExecEngine)
    assert SshUploader("hv", _no_link, engine="auto").engine == "exec"


def test_an_unknown_engine_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown SSH engine 'scp' \(openssh, exec, sftp or auto\)"):
        SshUploader("hv", _no_link, engine="scp")


# ssh's own words (OpenSSH 9/10) for each way it ends with status 255, and what they mean here
SSH_ENDINGS = [
    ("Host key verification failed.", HostRefused, "the host's key is not the one pinned"),
    ("@ WARNING: UNPROTECTED PRIVATE KEY FILE! @\nLoad key \"/k\": bad permissions\n"
     "root@127.0.0.1: Permission denied (publickey).", HostRefused, "chmod 600"),
    ("root@127.0.0.1: Permission denied (publickey).", HostRefused, "the factory's key was refused"),
    ("ssh: Could not resolve hostname pve-x: Name or service not known", HostRefused, "does not resolve"),
    ("Connection closed by 127.0.0.1 port 2222", LinkLost, "ssh failed: Connection closed"),
    ("kex_exchange_identification: read: Connection reset by peer", LinkLost, "ssh failed"),
]


@pytest.mark.parametrize(("stderr", "kind", "says"), SSH_ENDINGS)
def test_what_ssh_said_is_read_once_into_a_type(stderr: str, kind: type[Exception], says: str) -> None:
    failure = no_offset_failure("hv", 255, stderr, "/i/.a.partial")
    assert type(failure) is kind and says in str(failure)
    assert isinstance(failure, RETRYABLE) == (kind is LinkLost)  # a refusal is final: never retried


def test_the_host_scripts_exit_statuses_are_types() -> None:
    busy = no_offset_failure("hv", 1, "", "/i/.a.partial")
    assert isinstance(busy, PartialBusy) and isinstance(busy, RETRYABLE)  # the earlier writer finishes; resume
    failed = no_offset_failure("hv", 2, "sh: 1: cannot create /i/.a.partial: Permission denied", "/i/.a.partial")
    assert isinstance(failed, HostScriptFailed) and isinstance(failed, UploadError)
    assert str(failed) == "hv: cannot write /i/.a.partial (exit 2): sh: 1: cannot create /i/.a.partial: " \
                          "Permission denied"
    assert not isinstance(failed, RETRYABLE)


class _Unreachable:
    """A connection whose link is gone: the free-space figure cannot be read."""

    name = "hv"

    def link(self) -> SshLink:
        raise OSError("link gone")

    def endpoint(self) -> SshEndpoint:
        raise AssertionError("not needed")


@pytest.mark.parametrize("stderr", ["write: No space left on device\n", "cat: write error: Disk quota exceeded"])
def test_a_full_disk_is_final_and_says_what_to_do(stderr: str) -> None:
    with pytest.raises(DiskFull) as caught:
        raise_if_disk_full(_Unreachable(), stderr, "/var/lib/vz/import/.a.partial", 3 * 2**20)
    assert str(caught.value) == (
        "hv: No space left on device writing /var/lib/vz/import/.a.partial (free space unknown on the filesystem "
        "of /var/lib/vz/import, 3 MiB still to send); free space there and re-run: the upload resumes")
    assert not isinstance(caught.value, RETRYABLE)


def test_other_write_failures_are_not_a_full_disk() -> None:
    raise_if_disk_full(_Unreachable(), "read: Connection reset by peer", "/i/.a.partial", 1)


def test_an_attempt_resumes_from_the_hosts_partial_and_reports_it(tmp_path: Path) -> None:
    seen: list[int] = []
    job = Transfer("hv", tmp_path / "a", 1000, "/i/.a.partial", "/i/a", "0" * 64, seen.append)
    assert job.resume_at(0) == 0 and job.resumed_from == []
    assert job.resume_at(400) == 400 and job.resumed_from == [400]
    job.moved(600, 1000)
    assert (job.sent, seen) == (600, [0, 400, 1000])
    with pytest.raises(UploadError, match="reported 1001 bytes of /i/.a.partial, more than the artifact's 1000"):
        job.resume_at(1001)


def _no_link() -> SshLink:
    raise AssertionError("no connection is made choosing an engine")

