"""Storage checks: the storages the factory writes exist with the right content types, and the upload has room."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from image_factory.image import manifest as manifest_mod
from image_factory.image.builddir import BuildDir
from image_factory.preflight.model import Outcome, SpaceNeed, failed, human_bytes, passed, split_list
from image_factory.preflight.probe import HostProbe
from image_factory.pve.upload import transport_kind
from image_factory.settings import Settings
from image_factory.site.inventory import Hypervisor, Site


def largest_artifact(settings: Settings, site: Site, images: Sequence[str] | None = None) -> SpaceNeed:
    """The largest built artifact (manifest artifact.disk_size, the bytes uploaded).

    Before anything is built, the catalogue's largest ``disk_size`` (the virtual size, an upper
    bound of the qcow2 file) stands in, so preflight can warn before a build is wasted.
    """
    names = list(images) if images else list(site.images)
    best: SpaceNeed | None = None
    for name in names:
        try:
            m = BuildDir.of(settings, name).load()
        except manifest_mod.ManifestError:
            m = None
        if m is None:
            continue
        size = int(m.artifact.disk_size or 0)
        if best is None or size > best.bytes:
            best = SpaceNeed(size, f"artifact of {name} (build {m.build_id})")
    if best is not None:
        return best
    for name in names:
        img = site.images.get(name)
        if img is None:
            continue
        size = int(img.disk_size[:-1]) * (1024**3 if img.disk_size.endswith("G") else 1024**2)
        if best is None or size > best.bytes:
            best = SpaceNeed(size, f"no build yet: disk_size {img.disk_size} of {name} (upper bound)")
    return best or SpaceNeed(0, "no images")


@dataclass
class Findings:
    """What a check found wrong (each problem with its fix) and what it saw."""

    problems: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)

    def add(self, problem: str, hint: str) -> None:
        self.problems.append(problem)
        self.hints.append(hint)

    def outcome(self, detail: str) -> Outcome:
        return failed("; ".join(self.problems), "; ".join(self.hints)) if self.problems else passed(detail)


# ------------------------------------------------------------------------------------- storage


def wanted_content(site: Site, hv: Hypervisor) -> dict[str, list[str]]:
    """Storage id -> the content types the factory writes there: the host's images, cloud-init and import
    storages, and what the VMs on this host ask for (data disks' storages, the snippets storage for vendor data)."""
    st = hv.storage
    wanted: dict[str, list[str]] = {}
    asked = [(d.storage, "images") for vm in site.vms_on(hv.name) for d in vm.disks if d.storage]
    asked += [(st.snippets, "snippets")] if st.snippets else []
    for sid, content in ((st.images, "images"), (st.cloudinit, "images"), (st.import_, "import"), *asked):
        wanted.setdefault(sid, [])
        if content not in wanted[sid]:
            wanted[sid].append(content)
    return wanted


def check_storage(probe: HostProbe) -> Outcome:
    """The storages exist, are enabled and active, and list the content types the factory writes."""
    hv = probe.hv
    wanted = wanted_content(probe.site, hv)
    found = Findings()
    for sid, contents in wanted.items():
        s = probe.storage(sid)
        if s is None:
            found.add(f"storage {sid!r} not found on node {hv.node} (or not visible to the token)",
                      f"check `pvesm status` on {hv.node} and pve.storage in the inventory; the token needs "
                      f"Datastore.Audit on /storage/{sid}")
            continue
        if not int(s.get("enabled", 1) or 0) or not int(s.get("active", 1) or 0):
            found.add(f"storage {sid!r} is disabled or inactive on {hv.node}",
                      f"pvesm set {sid} --disable 0, and check `pvesm status` on {hv.node}")
        have = split_list(s.get("content"))
        lack = [c for c in contents if c not in have]
        if lack:
            found.add(f"storage {sid!r} lacks content type {', '.join(lack)} (has: {','.join(have) or 'none'})",
                      f"pvesm set {sid} --content {','.join([*have, *lack])}")
    return found.outcome("; ".join(f"{sid}: {','.join(c)}" for sid, c in wanted.items()))


# ------------------------------------------------------------------------------------- space


def check_space(probe: HostProbe) -> Outcome:
    """The import storage (API ``avail``), an images storage on its own (API ``avail``: an LVM-thin pool's data
    space) and every filesystem the upload writes (``df`` over SSH) have room for the largest artifact."""
    found = Findings()
    on_import_fs = _storage_space(probe, found)
    _filesystem_space(probe, found, on_import_fs)
    need = probe.need
    return found.outcome(f"need {human_bytes(need.bytes)} ({need.source}); " + "; ".join(found.seen))


def _storage_space(probe: HostProbe, found: Findings) -> bool:
    """The API's free space of the import and images storages; True where the images storage is the import
    storage's own ``dir`` (then its filesystem is measured with the import directory's)."""
    hv = probe.hv
    sid = hv.storage.import_
    item = probe.storage(sid)
    if item is None:
        found.add(f"import storage {sid!r} not found on {hv.node}", "see the storage check")
    else:
        _storage_room(probe, found, sid, item, kind="import", what="", needs="the largest artifact",
                      old=f"old uploads: `pvesm list {sid} --content import`")
    images = probe.storage(hv.storage.images)
    on_import_fs = hv.storage.images == sid and images is not None and images.get("type") == "dir"
    if images is not None and not on_import_fs:
        # the template's disk, converted from the upload: on an LVM-thin pool it takes the pool's data
        # space (the API's avail), whatever the volume's virtual size
        what = f"{images.get('type', '?')} pool" if images.get("type") == "lvmthin" else images.get("type", "?")
        _storage_room(probe, found, hv.storage.images, images, kind="images", what=f" ({what})",
                      needs="the template's disk", old=f"old templates and VMs: `pvesm list {hv.storage.images}`")
    return on_import_fs


def _storage_room(probe: HostProbe, found: Findings, sid: str, item: dict[str, Any], *, kind: str, what: str,
                  needs: str, old: str) -> None:
    hv, need = probe.hv, probe.need
    free = int(item.get("avail") or 0)
    found.seen.append(f"{sid}{what}: {human_bytes(free)} free")
    if free < need.bytes:
        found.add(f"{kind} storage {sid!r}{what} has {human_bytes(free)} free, {needs} needs "
                  f"{human_bytes(need.bytes)} ({need.source})",
                  f"free at least {human_bytes(need.bytes - free)} on storage {sid} of {hv.node} ({old})")


def _upload_dirs(probe: HostProbe, on_import_fs: bool) -> list[tuple[str, str]]:
    """(directory, what) the upload writes. Free space is a property of a filesystem, not of a directory. An SSH
    upload writes the import directory only; an API upload is staged in staging_dir (/var/tmp) and then COPIED
    into import/, so both copies exist at once (docs/pve-facts.md): on a default install, where both are on the
    root filesystem, that is twice the artifact there. A `dir` images storage that is the import storage converts
    the disk into images/ beside them: one more copy on that filesystem."""
    st = probe.hv.storage
    uses = [(st.import_dir, "import")] + ([(st.staging_dir, "staging")]
                                          if transport_kind(probe.transport).staged else [])
    if on_import_fs:
        uses.append((st.import_dir.rstrip("/").rsplit("/", 1)[0] + "/images", "images"))
    return uses


def _filesystem_space(probe: HostProbe, found: Findings, on_import_fs: bool) -> None:
    hv = probe.hv
    filesystems: dict[str, dict[str, Any]] = {}
    for d, what in _upload_dirs(probe, on_import_fs):
        res = probe.df(d)
        rows = [ln.split() for ln in res.stdout.splitlines()[1:] if ln.strip()]
        if res.status != 0 or not rows or len(rows[-1]) < 6:
            why = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"df exited {res.status}"
            found.add(f"cannot measure free space in {d} on {hv.node}: {why}",
                      f"{d} should be storage {hv.storage.import_}'s import/ directory: enable `import` content on "
                      f"{hv.storage.import_} (PVE creates the directory) or fix pve.storage.import_dir"
                      if what in ("import", "images") else
                      f"create {d} on {hv.node} or fix pve.storage.staging_dir")
            continue
        fs = filesystems.setdefault(rows[-1][5], {"avail": int(rows[-1][3]) * 1024, "dirs": []})
        fs["dirs"].append(d)
    for mount, fs in filesystems.items():
        found.seen.append(f"{mount} ({', '.join(fs['dirs'])}): {human_bytes(fs['avail'])} free")
        _filesystem_room(probe, found, mount, fs["dirs"], fs["avail"])


def _filesystem_room(probe: HostProbe, found: Findings, mount: str, dirs: list[str], avail: int) -> None:
    hv, need = probe.hv, probe.need
    wanted = need.bytes * len(dirs)
    if avail >= wanted:
        return
    times = f"{len(dirs)} x " if len(dirs) > 1 else ""
    staged = any(d == hv.storage.staging_dir for d in dirs)
    reasons = [*([] if not staged else ["the API stages the upload and then copies it, both at once"]),
               *(["the template's disk is converted into images/ beside the upload"]
                 if any(d.endswith("/images") for d in dirs) else [])]
    found.add(f"filesystem {mount} on {hv.node} (holding {' and '.join(dirs)}) has {human_bytes(avail)} free, "
              f"{probe.transport} uploads need {times}{human_bytes(need.bytes)} there ({need.source})"
              + (": " + "; ".join(reasons) if reasons else ""),
              f"free at least {human_bytes(wanted - avail)} on {mount} of {hv.node}"
              + (", or publish with --transport ssh (one copy fewer)" if staged else ""))
