"""pmxcfs's lock expiry, on the lab cluster's /etc/pve/priv/lock (a plain directory every node's sshd sees).

What real pmxcfs does (pve-cluster src/pmxcfs, read at its master snapshot; docs/pve-facts.md "The cluster lock"):
- a directory in priv/lock is a lock; pmxcfs notes when its checksum last changed (memdb.c: made by mkdir, or
  given a newer mtime by its holder's ``touch``);
- a waiter asks for it to be dropped with ``utime(0, 0)`` on it (cfs-plug-memdb.c cfs_plug_memdb_utimens): the
  lock is deleted when it has not changed for more than CFS_LOCK_TIMEOUT (120 s, memdb_lock_expired); otherwise
  its mtime stays as it was, since memdb_mtime refuses an older mtime on a lock (EACCES);
- so a holder that keeps touching its lock keeps it, and a dead holder's lock goes 120 s after its last touch.

On a plain directory every utime lands: the directory is watched with inotify, and the lab answers each change
as pmxcfs would have: a lock made (again) starts a new timeout, a newer mtime (its holder's touch) restarts it,
an older one is put back, and an mtime of 0 is the unlock request, which removes the lock or puts its mtime back.
(Linux reports a utime that sets only the mtime, ``touch -m``, as IN_MODIFY, one that sets both as IN_ATTRIB:
fsnotify_change.) inotify merges like events that are still unread, so the lab reads a lock's times rather than
counting events: a holder's touch hidden behind a waiter's later ``touch -m -d @0`` still shows in the atime the
touch set, and restarts the timeout. Left as they are: pmxcfs's refusal of a newer mtime from another node than
the lock's writer; a touch hidden behind a ``utime(0, 0)`` (which zeroes the atime too), or landing between the
lab's look at a lock and its putting the mtime back, is lost (the holder's next touch counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CFS_LOCK_TIMEOUT = 120  # memdb.c, in PVE seconds

# <sys/inotify.h>
IN_MODIFY, IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x2, 0x4, 0x40, 0x80, 0x100, 0x200
IN_Q_OVERFLOW, IN_ISDIR = 0x4000, 0x40000000
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name

log = logging.getLogger(__name__)


@dataclass
class _Seen:
    mtime_ns: int  # the lock's mtime as pmxcfs would keep it (never an unlock request's 0)
    atime_ns: int  # its atime when last looked at: a touch moves it on, an unlock request by touch -m does not
    since: float  # when the lock was made or last changed (the clock's reading)


class LockExpiry:
    """The expiry of every lock in ``lock_dir``; ``timeout`` gives the timeout in real seconds (the lab's time
    scale may change under a running test), ``clock`` the time. Call :meth:`pump` to act on what changed."""

    def __init__(self, lock_dir: Path, timeout: Callable[[], float], clock: Callable[[], float] = time.monotonic):
        self.lock_dir = lock_dir
        self.timeout = timeout
        self.clock = clock
        self._seen: dict[str, _Seen] = {}
        libc = ctypes.CDLL(None, use_errno=True)
        lock_dir.mkdir(parents=True, exist_ok=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), f"inotify: {os.strerror(ctypes.get_errno())}")
        mask = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
        if libc.inotify_add_watch(self.fd, os.fsencode(lock_dir), mask) < 0:
            errno = ctypes.get_errno()
            self.close()
            raise OSError(errno, f"inotify on {lock_dir}: {os.strerror(errno)}")
        self._restart_all()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def _restart_all(self) -> None:
        """Every lock there now starts its timeout now (at start, or when events were lost: the safe side)."""
        self._seen.clear()
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.lock_dir):
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        self._made(entry.name)

    def _made(self, name: str) -> None:
        st = (self.lock_dir / name).stat()
        self._restart(name, st.st_mtime_ns or time.time_ns(), st)

    def _restart(self, name: str, mtime_ns: int, st: os.stat_result) -> None:
        """The lock's timeout starts now, its mtime ``mtime_ns`` (put back where the directory holds another)."""
        self._seen[name] = _Seen(mtime_ns, st.st_atime_ns, self.clock())
        if st.st_mtime_ns != mtime_ns:
            self._put_back(name, st)

    def _put_back(self, name: str, st: os.stat_result) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.lock_dir / name, ns=(st.st_atime_ns, self._seen[name].mtime_ns))

    def _events(self) -> list[tuple[int, str]]:
        """Every event the watch holds now: (mask, name)."""
        out: list[tuple[int, str]] = []
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return out
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, size = EVENT.unpack_from(data, offset)
                name = os.fsdecode(data[offset + EVENT.size:offset + EVENT.size + size].rstrip(b"\0"))
                offset += EVENT.size + size
                out.append((mask, name))

    def pump(self) -> list[str]:
        """Act on every change since the last call; returns the locks an unlock request dropped."""
        dropped: list[str] = []
        for mask, name in self._events():
            if mask & IN_Q_OVERFLOW:
                self._restart_all()
            elif mask & (IN_DELETE | IN_MOVED_FROM):
                self._seen.pop(name, None)
            elif not mask & IN_ISDIR:
                continue  # a file beside the locks (the factory's .owner) is no lock
            elif mask & (IN_CREATE | IN_MOVED_TO):
                with contextlib.suppress(OSError):
                    self._made(name)
            elif mask & (IN_MODIFY | IN_ATTRIB) and self._changed(name):
                dropped.append(name)
        return dropped

    def _changed(self, name: str) -> bool:
        """A lock's times changed: a newer mtime (its holder's touch) restarts its timeout, an older one is
        refused, and 0 asks for the lock to be dropped."""
        path = self.lock_dir / name
        try:
            st = path.stat()
        except OSError:
            return False
        seen = self._seen.get(name)
        if seen is None:
            self._made(name)
            return False
        if st.st_mtime_ns > seen.mtime_ns:
            self._restart(name, st.st_mtime_ns, st)
        elif st.st_mtime_ns == 0 and st.st_atime_ns > seen.atime_ns:  # a touch came before the request
            self._restart(name, max(seen.mtime_ns + 1, time.time_ns()), st)
        elif st.st_mtime_ns == 0 and self.clock() - seen.since > self.timeout():
            with contextlib.suppress(OSError):  # a holder may remove it at this moment
                path.rmdir()
                log.info("pmxcfs: lock %s expired and was removed", name)
            self._seen.pop(name, None)
            return True
        else:
            seen.atime_ns = st.st_atime_ns
            if st.st_mtime_ns != seen.mtime_ns:  # memdb_mtime refuses an older mtime on a lock
                self._put_back(name, st)
        return False

    async def run(self) -> None:
        """Act on each change as it comes, until cancelled; a change it fails on is logged, and the watch goes on
        (a dead watch would quietly make every lock permanent)."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(self.fd, ready.set)
        try:
            while True:
                await ready.wait()
                ready.clear()
                try:
                    self.pump()
                except Exception:
                    log.exception("pmxcfs lock watch")
        finally:
            loop.remove_reader(self.fd)
            self.close()
