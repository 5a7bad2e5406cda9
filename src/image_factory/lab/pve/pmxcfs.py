"""pmxcfs's lock expiry, on the lab cluster's /etc/pve/priv/lock (a plain directory every node's sshd sees).

What real pmxcfs does (pve-cluster src/pmxcfs, read at its master snapshot; docs/pve-facts.md "The cluster lock"):
- a directory in priv/lock is a lock; pmxcfs notes when its checksum last changed (memdb.c: made by mkdir, or
  given a newer mtime by its holder's ``touch``);
- a waiter asks for it to be dropped with ``utime(0, 0)`` on it (cfs-plug-memdb.c cfs_plug_memdb_utimens): the
  lock is deleted when it has not changed for more than CFS_LOCK_TIMEOUT (120 s, memdb_lock_expired); otherwise
  its mtime stays as it was, since memdb_mtime refuses an older mtime on a lock (EACCES);
- so a holder that keeps touching its lock keeps it, and a dead holder's lock goes 120 s after its last touch.

On a plain directory the waiter's utime does set the mtime to 0. The directory is watched with inotify, so every
change is seen in its order: a lock made (again) starts a new timeout, its holder's touch restarts it, and an
mtime of 0 is the unlock request, which removes the lock or puts its mtime back. (Linux reports a utime that
sets only the mtime, ``touch -m``, as IN_MODIFY, and one that sets both as IN_ATTRIB: fsnotify_change.)
Not modelled: pmxcfs refusing a newer mtime from another node than the lock's writer.
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
    mtime_ns: int  # the lock's last mtime other than an unlock request's 0
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
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        lock_dir.mkdir(parents=True, exist_ok=True)
        mask = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
        if self.fd < 0 or libc.inotify_add_watch(self.fd, os.fsencode(lock_dir), mask) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {lock_dir}: {os.strerror(ctypes.get_errno())}")
        self._restart_all()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def _restart_all(self) -> None:
        """Every lock there now starts its timeout now (at start, or when events were lost: the safe side)."""
        self._seen.clear()
        for entry in os.scandir(self.lock_dir):
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    self._made(entry.name)

    def _made(self, name: str) -> None:
        path = self.lock_dir / name
        st = path.stat()
        seen = self._seen[name] = _Seen(st.st_mtime_ns or time.time_ns(), self.clock())
        if not st.st_mtime_ns:  # asked for before its watch began: refused, as pmxcfs refuses it on a new lock
            os.utime(path, ns=(st.st_atime_ns, seen.mtime_ns))

    def pump(self) -> list[str]:
        """Act on every change since the last call; returns the locks an unlock request dropped."""
        dropped: list[str] = []
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return dropped
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, size = EVENT.unpack_from(data, offset)
                name = data[offset + EVENT.size:offset + EVENT.size + size].rstrip(b"\0").decode()
                offset += EVENT.size + size
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

    def _changed(self, name: str) -> bool:
        """A lock's attributes changed: a newer mtime restarts its timeout, 0 asks for it to be dropped."""
        path = self.lock_dir / name
        try:
            st = path.stat()
        except OSError:
            return False
        seen = self._seen.get(name) or _Seen(st.st_mtime_ns or time.time_ns(), self.clock())
        self._seen[name] = seen
        if st.st_mtime_ns != 0:
            if st.st_mtime_ns != seen.mtime_ns:
                self._seen[name] = _Seen(st.st_mtime_ns, self.clock())
            return False
        if self.clock() - seen.since > self.timeout():
            with contextlib.suppress(OSError):  # a holder may remove it at this moment
                path.rmdir()
                log.info("pmxcfs: lock %s expired and was removed", name)
            self._seen.pop(name, None)
            return True
        with contextlib.suppress(OSError):  # memdb_mtime refuses an older mtime on a lock: it stays as it was
            os.utime(path, ns=(st.st_atime_ns, seen.mtime_ns))
        return False

    async def run(self) -> None:
        """Act on each change as it comes, until cancelled."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(self.fd, ready.set)
        try:
            while True:
                await ready.wait()
                ready.clear()
                self.pump()
        finally:
            loop.remove_reader(self.fd)
            self.close()
