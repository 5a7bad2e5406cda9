"""publish.names: the import file, template name, tags and description (no processes)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from image_factory.ownership import FACTORY_TAG
from image_factory.platform import Platform
from image_factory.publish.model import PublishError
from image_factory.publish.names import (
    IMPORT_NAME_RE,
    dns_name,
    efi_vars_file_name,
    import_file_name,
    sanitize_tag,
    template_description,
    template_name,
    template_tags,
)
from image_factory.pve.templates import DESCRIPTION_MAX, parse_description

from ._support import SB_FIELDS, manifest

pytestmark = pytest.mark.unit
TAG_RE = re.compile(r"^[a-z0-9_][a-z0-9_\-+.]*$")


def test_names_follow_pve_rules(site: Any) -> None:
    m = manifest(build_id="2026-11-25T12:00:00Z/A+B")
    name = import_file_name(m)
    assert IMPORT_NAME_RE.match(name) and name.endswith(".qcow2") and "/" not in name and ":" not in name
    tpl = template_name(site.image("debian-lab"), m)
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", tpl)
    assert tpl.startswith("tpl-debian-lab-2026-11-25t12-00-00z")
    assert dns_name("x" * 100 + "-") == "x" * 63
    with pytest.raises(PublishError):
        dns_name("---")


def test_tags_are_valid_sorted_and_mark_tested() -> None:
    tags = template_tags(manifest(build_id="B_1:x"), tested=True)
    assert tags == sorted(tags) and all(TAG_RE.match(t) for t in tags)
    assert {FACTORY_TAG, "debian-lab", "debian-12", "tested"} <= set(tags)
    assert "untested" in template_tags(manifest(), tested=False)
    assert sanitize_tag("-Weird Tag!") == "weird-tag"
    assert TAG_RE.match(sanitize_tag("+x"))


def test_description_round_trips_and_fits() -> None:
    m = manifest()
    text = template_description(m, import_file="f.qcow2", tested=False, forced=True, run_id="r1",
                                published_at="2026-11-25T12:00:00Z")
    meta = parse_description(text)
    assert meta is not None
    assert meta["digest"] == m.digest and meta["sha256"] == m.artifact.sha256
    assert meta["tested"].startswith("no") and "--force-untested" in meta["tested"]
    assert meta["publish_run"] == "r1" and meta["import_file"] == "f.qcow2"
    assert parse_description("some human note") is None
    assert m.image_test is not None
    big = dataclasses.replace(m, image_test=dataclasses.replace(m.image_test, suites=["s" * 100] * 200))
    long_text = template_description(big, import_file="f", tested=True, forced=False, run_id="r",
                                     published_at="t")
    assert len(long_text.encode()) <= DESCRIPTION_MAX


def test_the_description_records_firmware_and_template_discovery_reads_it() -> None:
    m = dataclasses.replace(manifest(), **SB_FIELDS)
    text = template_description(m, import_file="x.qcow2", tested=True, forced=False, run_id="r", published_at="t")
    line = parse_description(text)["firmware"]  # type: ignore[index]
    assert line == "uefi,machine=q35,secure_boot=yes,keys=microsoft-2011+2023,tpm=v2.0"
    assert Platform.parse(line) == Platform("uefi", True, "microsoft-2011+2023", True, "q35")
    bios = parse_description(template_description(manifest(), import_file="x.qcow2", tested=True, forced=False,
                                                  run_id="r", published_at="t"))
    assert bios is not None and Platform.parse(bios["firmware"]) == Platform()
    assert Platform.parse("") is None  # a template published before the line existed


def test_the_description_records_the_builds_efi_vars_store_and_retention_reads_its_file() -> None:
    from image_factory.pve.templates import TemplateInfo

    m = dataclasses.replace(manifest(), **{**SB_FIELDS, "secure_boot_keys": "microsoft-2023",
                                           "efi_vars": "efivars.raw", "efi_vars_sha256": "e" * 64})
    vars_file = efi_vars_file_name("debian-lab-b9.qcow2")
    assert vars_file == "debian-lab-b9.efivars.raw" and IMPORT_NAME_RE.match(vars_file)
    text = template_description(m, import_file="debian-lab-b9.qcow2", tested=True, forced=False, run_id="r",
                                published_at="t", efi_vars_file=vars_file)
    meta = parse_description(text)
    assert meta is not None and meta["efi_vars"] == f"{vars_file} sha256={'e' * 64} (the build's enrolled store)"
    info = TemplateInfo.from_config("n", 9000, {"description": text, "tags": "image-factory", "template": 1}, None)
    assert info is not None and info.efi_vars_file == vars_file
    pve_made = parse_description(template_description(dataclasses.replace(manifest(), **SB_FIELDS),
                                                      import_file="x.qcow2", tested=True, forced=False, run_id="r",
                                                      published_at="t"))
    assert pve_made is not None and "efi_vars" not in pve_made  # PVE's vars template: the firmware line says which
