"""pve.hostlock.ClusterLock against the lab's real sshd: two hosts that see one directory stand for two nodes of a
cluster seeing /etc/pve; the lock taken through one is refused through the other, naming its holder, and it goes
with its holder's SSH session."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from image_factory.lab.pytest_plugin import LabHandle
from image_factory.pve.hostlock import CLUSTER_LOCK_NAME, ClusterLock, LockBusy
from image_factory.pve.sshlink import SshLink

pytestmark = pytest.mark.lab


def until(condition: object, what: str, deadline: float = 30.0) -> None:
    """Wait for an observed state (never a fixed sleep)."""
    end = time.monotonic() + deadline
    while not condition():  # type: ignore[operator]
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline}s: {what}")
        time.sleep(0.05)


def lock_through(lab: LabHandle, host: str, lock_dir: Path, owner: str, wait: int) -> ClusterLock:
    hv = lab.hv(host)
    return ClusterLock(SshLink(hv.name, hv.ssh).connect(), str(lock_dir), owner, wait=wait, owns_link=True)


def test_the_cluster_lock_is_one_for_every_node_and_goes_with_its_holders_session(lab: LabHandle,
                                                                                  tmp_path: Path) -> None:
    lock_dir = tmp_path / "etc-pve" / "priv" / "lock"  # made by the first taker, as cfs_lock makes it
    held = lock_dir / CLUSTER_LOCK_NAME
    first = lock_through(lab, "pve-mgmt", lock_dir, "ops@a pid 1 run first", wait=1)
    first.acquire()
    try:
        assert held.is_dir() and first.held
        assert (lock_dir / f"{CLUSTER_LOCK_NAME}.owner").read_text().strip() == "ops@a pid 1 run first"
        second = lock_through(lab, "pve-tenant", lock_dir, "ops@b pid 2 run second", wait=1)
        with pytest.raises(LockBusy, match=r"in progress by ops@a pid 1 run first: the cluster lock .* was not free"):
            second.acquire()
        assert held.is_dir() and first.held  # a waiter's unlock request does not break a live lock
        assert first.link.transport is not None
        first.link.transport.close()  # the holder's SSH session drops: its shell removes the lock
        until(lambda: not held.exists(), "the dropped holder's lock removed")
        assert not first.held
    finally:
        first.release()
    third = lock_through(lab, "pve-tenant", lock_dir, "ops@b pid 3 run third", wait=5)
    third.acquire()
    assert third.held and held.is_dir()
    third.release()
    until(lambda: not held.exists(), "the released lock removed")


def test_a_lock_holder_that_never_answers_is_busy_with_its_reason_not_a_traceback(lab: LabHandle,
                                                                                   tmp_path: Path) -> None:
    """The channel's read timeout (the lock's own wait plus slack) ends in LockBusy: a publish reports it for its
    hosts instead of a socket timeout escaping the whole run."""
    lock = lock_through(lab, "pve-mgmt", tmp_path, "ops@a pid 1", wait=0)
    real_open = lock.link.open_session

    def open_session() -> object:
        chan = real_open()
        real_settimeout = chan.settimeout
        chan.settimeout = lambda t: real_settimeout(0.5 if t else t)  # 30 s of slack, made short for the test
        return chan

    lock.link.open_session = open_session  # type: ignore[method-assign]
    with pytest.raises(LockBusy, match=r"was not taken within 30s \(the host did not answer\); nothing changed"):
        lock._hold("sleep 30")  # a holder's shell that says nothing
    assert lock.chan is None
