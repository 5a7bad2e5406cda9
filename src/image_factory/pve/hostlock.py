"""One lock per hypervisor, shared by every run that changes it: publish, retention and deploy.

The lock is ``flock`` on ``<import_dir>/.image-factory-publish.lock`` held by an SSH exec channel
for the whole converge of a host (the file keeps its historic name, so a publish of an older
version and a deploy of this one still exclude each other). The kernel drops the lock when the
holder's process dies, so a crashed or cut run never leaves a stale lock; the holder writes
``<lock>.owner`` (user@host, pid, run id, since) so a waiting run can say whom it waits for.

A run checks :attr:`HostLock.held` (or calls :meth:`HostLock.ensure`) before every write: after
an SSH drop another run may hold the lock and be working on the same VMs, and whatever this run
would do then (including cleaning up after itself) could destroy that run's work.

The nodes of a cluster entry share one lock instead, :class:`ClusterLock`: PVE's own cluster-wide kind, a
directory in the cluster file system (pmxcfs), held the same way by an SSH exec channel on one node.
"""

from __future__ import annotations

import getpass
import os
import shlex
import socket
from datetime import UTC, datetime
from typing import Protocol

import paramiko

from image_factory.errors import FactoryError, RemoteError
from image_factory.pve.sshlink import SshLink

LOCK_NAME = ".image-factory-publish.lock"
DEFAULT_WAIT = 900
BUSY_EXIT = 75


class LockBusy(FactoryError):
    """Another run held the host lock for longer than this run may wait."""


class LockLost(FactoryError):
    """The SSH link holding the host lock dropped: another run may now be working on this host."""


class HostGuard(Protocol):
    """What a stage needs of a host lock: take it, know whether it still holds it, let it go."""

    def acquire(self) -> None: ...

    @property
    def held(self) -> bool: ...

    def ensure(self, doing: str) -> None: ...

    def release(self) -> None: ...


def owner_line(run_id: str) -> str:
    since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()} run {run_id} since {since}"


class HostLock:
    """flock held on the host by an SSH exec channel; released when the channel or the link dies."""

    kind = "host lock"

    def __init__(self, link: SshLink, lock_dir: str, owner: str, *, wait: int = DEFAULT_WAIT, owns_link: bool = False):
        if wait < 0:
            raise ValueError(f"lock wait must be 0 or more seconds (got {wait})")
        self.link = link
        self.path = f"{lock_dir}/{LOCK_NAME}"
        self.owner = owner
        self.wait = wait
        self.chan: paramiko.Channel | None = None
        self.waited_for: str = ""
        self.owns_link = owns_link

    def acquire(self) -> None:
        q = shlex.quote(self.path)
        self._hold(
            f"exec 9>>{q} || exit 2; "
            f"if ! flock -n 9; then printf 'BUSY '; cat {q}.owner 2>/dev/null; echo; "
            f"flock -w {self.wait} 9 || exit {BUSY_EXIT}; fi; "
            f"printf '%s\\n' {shlex.quote(self.owner)} > {q}.owner; echo LOCKED; exec cat >/dev/null"
        )

    def _hold(self, command: str) -> None:
        """Run the holder's command on an exec channel until it says LOCKED (BUSY <owner> while it waits)."""
        try:
            chan = self.link.open_session()
        except Exception:
            if self.owns_link:
                self.link.close()
            raise
        chan.settimeout(self.wait + 30)
        chan.exec_command(command)
        buf = b""
        while True:
            try:
                piece = chan.recv(4096)
            except TimeoutError:  # the holder's own wait bounds this: its shell hangs, so give up on it
                chan.close()
                if self.owns_link:
                    self.link.close()
                raise LockBusy(f"{self.link.name}: the {self.kind} {self.path} was not taken within {self.wait + 30}s "
                               "(the host did not answer); nothing changed") from None
            if not piece:
                status = chan.recv_exit_status()
                err = chan.makefile_stderr("rb").read().decode(errors="replace").strip()
                chan.close()
                if self.owns_link:
                    self.link.close()
                if status == BUSY_EXIT:
                    raise LockBusy(
                        f"{self.link.name}: in progress by {self.waited_for or 'another run (owner unknown)'}: "
                        f"the {self.kind} {self.path} was not free within {self.wait}s (--lock-wait); nothing changed"
                    )
                raise RemoteError(self.link.name, f"cannot take the {self.kind} {self.path}: {err[-300:]}")
            buf += piece
            text = buf.decode(errors="replace")
            if text.startswith("BUSY ") and "\n" in text:
                self.waited_for = text[5:].split("\n", 1)[0].strip()
            if "LOCKED\n" in text:
                break
        chan.settimeout(None)
        self.chan = chan

    @property
    def held(self) -> bool:
        c = self.chan
        return c is not None and not c.closed and not c.exit_status_ready() and bool(
            self.link.transport and self.link.transport.is_active()
        )

    def ensure(self, doing: str) -> None:
        if not self.held:
            raise LockLost(f"{self.link.name}: lost the {self.kind} {self.path} before {doing}; stopped without "
                           "changing anything more (another run may be working on this host; re-run to converge)")

    def release(self) -> None:
        try:
            if self.chan is not None:
                self.chan.shutdown_write()
                self.chan.settimeout(10)
                self.chan.recv_exit_status()
        except Exception:  # noqa: S110 - the link may be gone; the kernel released the lock then
            pass
        finally:
            if self.chan is not None:
                self.chan.close()
                self.chan = None
            if self.owns_link:
                self.link.close()


CLUSTER_LOCK_NAME = "image-factory"
CLUSTER_LOCK_RENEW = 30  # seconds; pmxcfs lets a waiter break a lock left untouched for 120 s


class ClusterLock(HostLock):
    """The lock of a whole PVE cluster: PVE's own cluster-wide lock, a directory made under the cluster file system's
    lock directory (/etc/pve/priv/lock: mkdir there is atomic across the nodes, as pve-cluster's cfs_lock relies on),
    held from one online node by an SSH exec channel. The holder touches it every CLUSTER_LOCK_RENEW seconds and
    removes it when the channel closes or drops; a holder whose node died leaves it to pmxcfs's expiry, which a
    waiter asks for by setting its mtime to 0, as cfs_lock does (docs/pve-facts.md, "The cluster lock")."""

    kind = "cluster lock"

    def __init__(self, link: SshLink, lock_dir: str, owner: str, *, wait: int = DEFAULT_WAIT, owns_link: bool = False):
        super().__init__(link, lock_dir, owner, wait=wait, owns_link=owns_link)
        self.lock_dir = lock_dir
        self.path = f"{lock_dir}/{CLUSTER_LOCK_NAME}"

    def acquire(self) -> None:
        q, owner = shlex.quote(self.path), shlex.quote(f"{self.path}.owner")
        parent = shlex.quote(self.lock_dir)
        self._hold(
            f"mkdir -p {parent} 2>/dev/null; [ -d {parent} ] || {{ echo 'cluster file system not online' >&2; "
            f"exit 2; }}; n=0; end=$(($(date +%s) + {self.wait})); until mkdir {q} 2>/dev/null; do "
            f"[ $n = 0 ] && {{ printf 'BUSY '; cat {owner} 2>/dev/null; echo; }}; "
            f"[ $(date +%s) -ge $end ] && exit {BUSY_EXIT}; touch -m -d @0 {q} 2>/dev/null; sleep 0.2; "
            f"n=$((n+1)); done; (while sleep {CLUSTER_LOCK_RENEW}; do touch {q}; done) & renew=$!; "
            f"trap 'kill $renew 2>/dev/null; rm -f {owner}; rmdir {q}' EXIT; trap 'exit 1' HUP TERM INT; "
            f"printf '%s\\n' {shlex.quote(self.owner)} > {owner}; echo LOCKED; cat >/dev/null"
        )
