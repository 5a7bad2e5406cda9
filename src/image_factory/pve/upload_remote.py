"""What an upload reads and removes in a host's import directory over SSH, each in one round trip.

Publish plans with these (``remote_probe``, ``remote_sha256``, ``remote_remove``); the SSH uploader checks
with them whether the final file is already there.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable

from image_factory.errors import RemoteError
from image_factory.pve.sshlink import SshLink


class UploadError(RemoteError):
    """An upload cannot go on: said once, with the host's name, and never retried."""


def partial_name(final: str) -> str:
    return f".{final}.partial"


def _q(path: str) -> str:
    return shlex.quote(path)


def remote_size(link: SshLink, path: str) -> int | None:
    res = link.run(f"stat -c %s -- {_q(path)}", check=False, timeout=60)
    if res.status != 0:
        return None
    try:
        return int(res.stdout.strip())
    except ValueError:
        raise UploadError(link.name, f"unexpected stat output for {path}: {res.stdout!r}") from None


def remote_sizes(link: SshLink, *paths: str) -> dict[str, int | None]:
    """Sizes of several files in one round trip (None: absent)."""
    script = "; ".join(f"stat -c %s -- {_q(p)} 2>/dev/null || echo -" for p in paths)
    res = link.run(script, check=False, timeout=60)
    values = res.stdout.split()
    if len(values) != len(paths):
        raise UploadError(link.name, f"unexpected stat output: {res.stdout!r} {res.stderr.strip()[-200:]}")
    return {p: (None if v == "-" else int(v)) for p, v in zip(paths, values, strict=True)}


def remote_probe(link: SshLink, directory: str, *names: str) -> tuple[list[str], dict[str, int | None]]:
    """One round trip: the directory's entries and the sizes of some of them (None: absent)."""
    qd = _q(directory)
    sizes = "; ".join(f"stat -c %s -- {qd}/{_q(n)} 2>/dev/null || echo -" for n in names)
    res = link.run(f"ls -1A -- {qd} || exit 3; echo @@@; {sizes}", check=False, timeout=60)
    if res.status != 0 or "@@@\n" not in res.stdout:
        raise UploadError(link.name, f"cannot list {directory}: {res.stderr.strip()[-300:]}")
    listing, _, tail = res.stdout.partition("@@@\n")
    values = tail.split()
    if len(values) != len(names):
        raise UploadError(link.name, f"unexpected stat output: {tail!r}")
    return ([n for n in listing.splitlines() if n],
            {n: (None if v == "-" else int(v)) for n, v in zip(names, values, strict=True)})


def remote_list(link: SshLink, directory: str) -> list[str]:
    """Names in a directory on the host (hidden ones included)."""
    res = link.run(f"ls -1A -- {_q(directory)}", check=False, timeout=60)
    if res.status != 0:
        raise UploadError(link.name, f"cannot list {directory}: {res.stderr.strip()[-300:]}")
    return [line for line in res.stdout.splitlines() if line]


def remote_sha256(link: SshLink, path: str, *, timeout: float = 1800) -> str | None:
    """sha256 of a file on the host (openssl is ~3.5x faster than sha256sum there); None if absent."""
    qp = _q(path)
    cmd = (
        f"test -f {qp} || exit 3; "
        f"if command -v openssl >/dev/null 2>&1; then openssl dgst -sha256 -r < {qp}; else sha256sum < {qp}; fi"
    )
    res = link.run(cmd, check=False, timeout=timeout)
    if res.status == 3:
        return None
    if res.status != 0:
        raise UploadError(link.name, f"cannot hash {path}: {res.stderr.strip()[-300:]}")
    digest = res.stdout.split()[0].lower() if res.stdout.split() else ""
    if len(digest) != 64:
        raise UploadError(link.name, f"unexpected hash output for {path}: {res.stdout[:200]!r}")
    return digest


def remote_remove(link: SshLink, *paths: str) -> None:
    if paths:
        link.run("rm -f -- " + " ".join(_q(p) for p in paths), check=False, timeout=60)


def final_has(link: SshLink, path: str, sha256: str, size: int) -> bool:
    """True when ``path`` exists on the host with exactly this content."""
    have = remote_size(link, path)
    if have != size:
        return False
    return remote_sha256(link, path) == sha256


def free_space(link: Callable[[], SshLink], directory: str) -> str:
    """The free space on the filesystem of ``directory``, for a message ("free space unknown" if df fails)."""
    try:
        df = link().run(["df", "-Pk", "--", directory], check=False, timeout=30).stdout.splitlines()
        return f"{int(df[-1].split()[3]) * 1024 / 2**20:.0f} MiB free"
    except Exception:  # the message matters more than the figure
        return "free space unknown"
