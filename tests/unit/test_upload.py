"""upload.py: the uploader's retry of control commands (by the failure's type) and the transport facts."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from image_factory.errors import RemoteError
from image_factory.pve.sshlink import CommandTimedOut, LinkClosed, SshLink
from image_factory.pve.upload import TRANSPORT_KINDS, SshUploader, UnknownTransport, UploadError, transport_kind

pytestmark = pytest.mark.unit


class _Link(SshLink):
    """A link to nowhere: the uploader's commands here fail or succeed without it."""

    def __init__(self) -> None:
        super().__init__("hv", None)  # type: ignore[arg-type]  # never connects


def _failing(*failures: Exception) -> Callable[[], str]:
    """A command that fails with ``failures`` in turn, then answers "done"; ``command.calls`` counts its runs."""
    pending = list(failures)

    def command() -> str:
        command.calls += 1  # type: ignore[attr-defined]
        if pending:
            raise pending.pop(0)
        return "done"

    command.calls = 0  # type: ignore[attr-defined]
    return command


@pytest.mark.parametrize("lost", [LinkClosed("hv", "SSH connection is not open"),
                                  CommandTimedOut("hv", "command timed out after 60s: stat"),
                                  OSError("Connection reset by peer"), EOFError()],
                         ids=["closed", "timed out", "reset", "eof"])
def test_a_command_whose_link_failed_runs_again_on_a_fresh_link(lost: Exception) -> None:
    uploader = SshUploader("hv", _Link, engine="exec", attempts=3)
    uploader.link()
    command = _failing(lost, lost)
    assert uploader._retry(command) == "done" and command.calls == 3  # type: ignore[attr-defined]
    assert uploader._link is None  # the failed link was dropped: the next command opens a fresh one


def test_a_command_that_failed_on_a_working_link_is_not_run_again() -> None:
    uploader = SshUploader("hv", _Link, engine="exec", attempts=3)
    refused = RemoteError("hv", "command failed (1): mv: cannot move")
    command = _failing(refused)
    with pytest.raises(RemoteError) as caught:
        uploader._retry(command)
    assert caught.value is refused and command.calls == 1  # type: ignore[attr-defined]  # not retried


def test_a_link_that_keeps_failing_is_given_up_after_the_attempts() -> None:
    uploader = SshUploader("hv", _Link, engine="exec", attempts=3)
    command = _failing(*[LinkClosed("hv", "SSH connection is not open")] * 4)
    with pytest.raises(UploadError, match=r"^hv: SSH connection kept failing \(3 attempts\): hv: SSH connection "
                                          r"is not open$"):
        uploader._retry(command)
    assert command.calls == 3  # type: ignore[attr-defined]


def test_transport_kinds_and_an_unknown_one() -> None:
    assert transport_kind("ssh") is TRANSPORT_KINDS["ssh"] and TRANSPORT_KINDS["ssh"].resumable
    assert TRANSPORT_KINDS["api"].staged and not TRANSPORT_KINDS["api"].resumable
    with pytest.raises(UnknownTransport, match=r"unknown transport 'scp' \(choose ssh or api\)"):
        transport_kind("scp")
