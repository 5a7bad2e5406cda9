"""What the publish unit tests share: a manifest, a fake API client answering from configs, a template config."""

from __future__ import annotations

from typing import Any

from image_factory.image import manifest as mf
from image_factory.lab import factories
from image_factory.publish.names import import_file_name, template_description, template_tags

SB_FIELDS = {"firmware": "uefi", "secure_boot": True, "secure_boot_keys": "microsoft-2011+2023", "tpm": True,
             "machine": "q35"}


def manifest(build_id: str = "20261125-1200-a1", sha: str = "ab" * 32, tested: bool = True) -> mf.Manifest:
    return factories.manifest(build_id=build_id, sha256=sha, tested=tested or None, fingerprint="f" * 64,
                              git={"commit": "abc"})


class FakeClient:
    """Answers list_vms/vm_config/get like PveClient from a dict of configs."""

    node = "pve-x"
    node_path = "/nodes/pve-x"

    def __init__(self, configs: dict[int, dict[str, Any]]):
        self.configs = configs

    def list_vms(self) -> list[dict[str, Any]]:
        out = []
        for vmid, cfg in self.configs.items():
            row: dict[str, Any] = {"vmid": vmid, "name": cfg.get("name", "")}
            if cfg.get("tags"):
                row["tags"] = cfg["tags"]
            if cfg.get("template"):
                row["template"] = 1
            out.append(row)
        return out

    def vm_config(self, vmid: int) -> dict[str, Any]:
        return dict(self.configs[vmid])

    def list_containers(self) -> list[dict[str, Any]]:
        return []

    def storages(self) -> list[dict[str, Any]]:
        return []


def tpl_config(m: mf.Manifest, published: str, *, template: bool = True, tested: bool = True) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": f"tpl-{m.build_id}",
        "tags": ";".join(template_tags(m, tested)),
        "description": template_description(m, import_file=import_file_name(m), tested=tested, forced=not tested,
                                            run_id="r", published_at=published),
        "scsi0": "local:9000/base-9000-disk-0.qcow2,size=2G",
    }
    if template:
        cfg["template"] = 1
    return cfg


