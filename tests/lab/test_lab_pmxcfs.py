"""pmxcfs's lock expiry as the lab models it (lab/pve/pmxcfs.py) on a real directory, with a clock the test moves:
a waiter's utime(0) drops a lock untouched for more than the timeout, and otherwise leaves its mtime as it was;
a holder's touch starts the timeout again (memdb.c memdb_lock_expired, cfs-plug-memdb.c utimens)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from image_factory.lab.pve.pmxcfs import LockExpiry

pytestmark = pytest.mark.unit
TIMEOUT = 120.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Expiry = tuple[LockExpiry, Clock, Path]
Unlock = Callable[[Path], None]


def made(lock_dir: Path, name: str, mtime: int = 1_700_000_000) -> Path:
    lock = lock_dir / name
    lock.mkdir()
    os.utime(lock, (mtime, mtime))
    return lock


def utime_zero(lock: Path) -> None:
    os.utime(lock, (0, 0))  # cfs_lock's waiter (Cluster.pm: utime 0, 0): reported as IN_ATTRIB


def touch_mtime_zero(lock: Path) -> None:
    # the factory's ClusterLock: the mtime alone, reported as IN_MODIFY
    subprocess.run(["touch", "-m", "-d", "@0", str(lock)], check=True)


@pytest.fixture(params=[utime_zero, touch_mtime_zero], ids=["utime", "touch-m"])
def unlock_request(request: pytest.FixtureRequest) -> Unlock:
    unlock: Unlock = request.param
    return unlock


@pytest.fixture
def expiry(tmp_path: Path) -> Iterator[Expiry]:
    clock = Clock()
    exp = LockExpiry(tmp_path, lambda: TIMEOUT, clock)
    yield exp, clock, tmp_path
    exp.close()


def test_an_unlock_request_on_a_lock_within_its_timeout_leaves_it_and_its_mtime(
        expiry: Expiry, unlock_request: Unlock) -> None:
    exp, clock, lock_dir = expiry
    lock = made(lock_dir, "image-factory")
    exp.pump()
    clock.now += TIMEOUT  # not more than the timeout yet
    unlock_request(lock)
    assert exp.pump() == []
    assert lock.is_dir() and lock.stat().st_mtime == 1_700_000_000


def test_a_lock_untouched_past_its_timeout_goes_at_the_next_unlock_request(
        expiry: Expiry, unlock_request: Unlock) -> None:
    exp, clock, lock_dir = expiry
    lock = made(lock_dir, "image-factory")
    (lock_dir / "image-factory.owner").write_text("ops@a pid 1\n")  # a file beside it is no lock
    exp.pump()
    clock.now += TIMEOUT + 1
    assert exp.pump() == [] and lock.is_dir()  # expired, but nobody asked
    unlock_request(lock)
    assert exp.pump() == ["image-factory"]
    assert not lock.exists() and (lock_dir / "image-factory.owner").exists()


def test_a_holders_touch_starts_the_timeout_again(
        expiry: Expiry, unlock_request: Unlock) -> None:
    exp, clock, lock_dir = expiry
    lock = made(lock_dir, "image-factory")
    exp.pump()
    clock.now += 100
    os.utime(lock, (1_700_000_100, 1_700_000_100))  # the holder's renewing touch
    exp.pump()
    clock.now += 100  # 200 s since it was made, 100 s since the touch
    unlock_request(lock)
    assert exp.pump() == [] and lock.is_dir()
    clock.now += 21
    unlock_request(lock)
    assert exp.pump() == ["image-factory"]


def test_a_lock_made_again_under_the_same_name_is_a_new_lock(
        expiry: Expiry, unlock_request: Unlock) -> None:
    exp, clock, lock_dir = expiry
    lock = made(lock_dir, "storage-shared")
    exp.pump()
    clock.now += TIMEOUT + 1
    lock.rmdir()
    lock = made(lock_dir, "storage-shared")  # even with the same mtime: another lock, made now
    unlock_request(lock)
    assert exp.pump() == [] and lock.is_dir()


def test_a_lock_made_and_asked_for_between_two_looks_gets_its_whole_timeout(
        expiry: Expiry, unlock_request: Unlock) -> None:
    exp, clock, lock_dir = expiry
    lock = made(lock_dir, "image-factory")
    unlock_request(lock)
    assert exp.pump() == [] and lock.is_dir() and lock.stat().st_mtime_ns != 0
    clock.now += TIMEOUT + 1
    unlock_request(lock)
    assert exp.pump() == ["image-factory"]


def test_a_lock_there_before_the_watch_began_starts_its_timeout_then(
        tmp_path: Path, unlock_request: Unlock) -> None:
    lock = made(tmp_path, "image-factory")
    clock = Clock()
    exp = LockExpiry(tmp_path, lambda: TIMEOUT, clock)
    try:
        unlock_request(lock)
        assert exp.pump() == [] and lock.is_dir()
        clock.now += TIMEOUT + 1
        unlock_request(lock)
        assert exp.pump() == ["image-factory"]
    finally:
        exp.close()


def test_an_older_mtime_is_put_back_and_does_not_restart_the_timeout(expiry: Expiry) -> None:
    exp, clock, lock_dir = expiry
    lock = made(lock_dir, "image-factory")
    exp.pump()
    clock.now += TIMEOUT + 1
    os.utime(lock, (5, 5))  # memdb_mtime refuses an older mtime on a lock
    assert exp.pump() == [] and lock.stat().st_mtime == 1_700_000_000
    touch_mtime_zero(lock)
    assert exp.pump() == ["image-factory"]  # the timeout ran on from the lock's making


def test_a_holders_touch_hidden_behind_a_later_request_still_restarts_the_timeout(expiry: Expiry) -> None:
    exp, clock, lock_dir = expiry
    lock = made(lock_dir, "image-factory")
    exp.pump()
    clock.now += TIMEOUT + 1
    subprocess.run(["touch", str(lock)], check=True)  # the holder renews (mtime and atime now) ...
    touch_mtime_zero(lock)  # ... and a waiter asks before the lab looks: it still sees the touch's atime
    assert exp.pump() == [] and lock.is_dir() and lock.stat().st_mtime_ns != 0
    clock.now += TIMEOUT  # not past the restarted timeout
    touch_mtime_zero(lock)
    assert exp.pump() == [] and lock.is_dir()
