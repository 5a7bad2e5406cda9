"""The host's side of a delta publish: rebuild the full image from the base in the import directory and a delta
the SSH uploader has just delivered (verified on arrival), check its guest view, then rename it into place.

The steps run as one command (upload_delta_host.sh, POSIX sh, under the publish's host lock): the base is only
read; the rebuilt image is independent of it (qemu-img convert), so pruning the base's template can never break
the new one, and PVE's import, which refuses a backing file in an import volume (docs/pve-facts.md, "Delta
publish"), takes it as it takes a full upload. Every failure raises :class:`DeltaRebuildFailed`: the caller falls
back to a full upload, and nothing is left under the final name or any temporary one.
"""

from __future__ import annotations

import shlex
from functools import cache
from importlib import resources

from image_factory.pve.sshlink import SshLink
from image_factory.pve.upload_remote import UploadError

HOST_SCRIPT = "upload_delta_host.sh"
REBUILD_TIMEOUT = 1800.0
WHY = {
    2: "the import directory or the delta is missing",
    3: "the base is no longer in the import directory",
    4: "qemu-img failed on the host",
    5: "the rebuilt image could not be renamed into place",
    6: "the rebuilt image's guest view does not match the build's (the base is not the image the delta was made "
       "against)",
    124: "the host's rebuild ran out of time and was stopped (its files removed)",
}


class DeltaRebuildFailed(UploadError):
    """The host could not rebuild a verified image from base + delta (the caller sends the full image)."""


def delta_name(final: str) -> str:
    """The name the delta is delivered under, beside the import file it becomes (hidden, like a partial)."""
    return f".{final}.delta"


def leftover_names(final: str) -> tuple[str, ...]:
    """Every name a delta publish of ``final`` may leave if the host dies part-way (the script removes them
    itself on any exit it sees)."""
    return delta_name(final), f".{delta_name(final)}.partial", f".{final}.rebuild", f".{final}.guestview"


@cache
def host_script() -> str:
    return resources.files(__package__).joinpath(HOST_SCRIPT).read_text()


def rebuild_from_delta(link: SshLink, import_dir: str, base: str, final: str, guest_sha256: str, *,
                       timeout: float = REBUILD_TIMEOUT) -> int:
    """Rebuild ``final`` from ``base`` and the delivered delta on the host; the rebuilt file's size."""
    # `timeout` (coreutils, on every PVE host) stops the script and its qemu-img with it a little before the client
    # gives up: sshd does not end a command whose client went away, and an orphan would race the next round.
    host_limit = max(int(timeout) - 15, 1)
    command = shlex.join(["timeout", "-k", "10", str(host_limit), "sh", "-c", host_script(), "factory-delta",
                          import_dir, base, delta_name(final), final, guest_sha256])
    res = link.run(command, check=False, timeout=timeout)
    out = res.stdout.split()
    if res.status == 0 and len(out) == 2 and out[0] == "OK" and out[1].isdigit():
        return int(out[1])
    why = WHY.get(res.status, f"the host's rebuild failed (exit {res.status})")
    detail = (res.stderr.strip() or res.stdout.strip())[-300:]
    raise DeltaRebuildFailed(link.name, f"{why}{': ' + detail if detail else ''}")
