"""Test data factories: the product's own types with plausible defaults, so a test names only what it is about.

Like fabric's ``fabric.testing``: shipped beside the lab, never imported by the product.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path
from typing import Any

from image_factory import publish
from image_factory.image.manifest import Artifact, ImageTestResult, Manifest, sha256_file
from image_factory.pve.templates import TemplateInfo
from image_factory.site.inventory import Hypervisor, Image

SHA = "ab" * 32


def manifest(image: str = "debian-lab", *, build_id: str = "b1", path: str = "", sha256: str = SHA,
             virtual_size: int = 1, disk_size: int = 1, tested: bool | None = None,
             failures: tuple[str, ...] = ("test_x::test_y",), **fields: Any) -> Manifest:
    """A build manifest; ``tested`` True/False adds a passed/failed image test (with ``failures``) of this
    artifact."""
    result = None
    if tested is not None:
        result = ImageTestResult(status="passed" if tested else "failed", passed=3, failed=0 if tested else 1,
                                 artifact_sha256=sha256, failures=[] if tested else list(failures))
    base: dict[str, Any] = {
        "family": "debian", "release": 12, "mode": "cloud", "fingerprint": "f", "inputs": {}, "tools": {},
        "git": {}, "started_at": "", "finished_at": "", "image_test": result,
    }
    artifact = Artifact(path=path or f"{image}.qcow2", format="qcow2", virtual_size=virtual_size,
                        disk_size=disk_size, sha256=sha256)
    return Manifest(image=image, build_id=build_id, artifact=artifact, **{**base, **fields})


def manifest_of(artifact: Path, image: str = "debian-lab", **fields: Any) -> Manifest:
    """A manifest that matches a real artifact file: its digest, size and (for qcow2) virtual size."""
    info = json.loads(subprocess.check_output(["qemu-img", "info", "--output=json", str(artifact)]))
    return manifest(image, path=str(artifact), sha256=sha256_file(artifact), disk_size=artifact.stat().st_size,
                    virtual_size=int(info["virtual-size"]), **fields)


def qcow2_of(raw: bytes, out: Path) -> Path:
    """``raw`` as the guest's disk in a qcow2 at ``out`` (every cluster with data allocated), replacing any file
    there."""
    staged = out.with_name(f"{out.name}.raw")
    staged.write_bytes(raw)
    out.unlink(missing_ok=True)
    try:
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(staged), str(out)], check=True)
    finally:
        staged.unlink()
    return out


def clusters_changed(raw: bytes, share: float, seed: int, cluster: int = 64 * 1024) -> bytes:
    """``raw`` with ``share`` of its clusters rewritten with other random bytes: a nightly's change, as the
    guest sees it."""
    rng = random.Random(seed)
    data = bytearray(raw)
    clusters = len(raw) // cluster
    for c in rng.sample(range(clusters), int(clusters * share)):
        data[c * cluster:(c + 1) * cluster] = rng.randbytes(cluster)
    return bytes(data)


def template(vmid: int = 9000, name: str = "tpl-fedora-44-b1", *, tested: bool = True, image: str = "fedora-44",
             build_id: str = "b1", **fields: Any) -> TemplateInfo:
    """A factory template as publish describes it and template discovery reads it back."""
    tags = ("image-factory", image, f"build-{build_id}", "tested" if tested else "untested")
    base: dict[str, Any] = {
        "node": "pve", "digest": "d", "sha256": SHA, "published_at": "2026-11-25T12:00:00Z",
        "import_file": f"{image}-{build_id}.qcow2", "publish_run": "r0", "is_template": True, "locked": None,
        "tags": tags,
    }
    return TemplateInfo(vmid=vmid, name=name, image=image, build_id=build_id, tested=tested, **{**base, **fields})


def template_config(hv: Hypervisor, image: Image, *, vmid: int = 9001, build_id: str = "b2",
                    firmware: str = "bios") -> dict[str, str]:
    """A factory template's config as PVE holds it after publish: publish's own create parameters (so a test
    follows publish when it changes), as strings, plus ``template: 1``."""
    built = manifest(image.name, build_id=build_id, firmware=firmware)
    art = publish.Artifact(manifest=built, image=image, path=Path(built.artifact.path), size=1, tested=True,
                           forced=False, import_file=f"{image.name}-{build_id}.qcow2",
                           template_name=f"tpl-{image.name}-{build_id}")
    params = publish.create_params(hv, art, vmid, f"image-factory template\nimage: {image.name}", ["image-factory"])
    return {**{k: str(v) for k, v in params.items() if k != "vmid"}, "template": "1"}
