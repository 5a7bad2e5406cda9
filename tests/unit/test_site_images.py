"""The image catalogue (site/images.py): end of life, extra repositories, UEFI options, each refused with its reason."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from image_factory.errors import ValidationFailed
from image_factory.settings import REPO_ROOT
from image_factory.site.inventory import Repository, eol_gate, load_site

from . import site_cases
from .site_cases import example_catalogue, problems_of, site_files

pytestmark = pytest.mark.unit
no_network = site_cases.no_network  # the fixture, for this module's tests


def test_eol_gate_warns_within_30_days_and_refuses_after() -> None:
    site = load_site(REPO_ROOT / "ansible/inventory", REPO_ROOT / "packer/images.yml")
    f43 = site.images["fedora-44"].model_copy(update={"name": "fedora-43", "release": 43, "eol": date(2026, 12, 2)})
    assert f43.eol is not None
    assert eol_gate([f43], "images.yml", today=date(2026, 10, 1)) == []
    [warning] = eol_gate([f43], "images.yml", today=f43.eol)
    assert "reaches its end of life" in warning and "in 0 days" in warning
    later = date.fromordinal(f43.eol.toordinal() + 1)
    with pytest.raises(ValidationFailed) as err:
        eol_gate([f43], "images.yml", today=later)
    [problem] = err.value.problems
    assert (problem.file, problem.entry, problem.key) == ("images.yml", "fedora-43", "eol")
    assert "--allow-eol" in problem.message
    [allowed] = eol_gate([f43], "images.yml", today=later, allow_eol=True)
    assert "--allow-eol given" in allowed


def test_every_downloaded_image_has_an_eol_date() -> None:
    site = load_site(REPO_ROOT / "ansible/inventory", REPO_ROOT / "packer/images.yml")
    assert all(img.eol is not None for img in site.images.values())
    assert {"fedora-44", "fedora-44-iso", "fedora-45", "fedora-45-iso"} <= set(site.images)
    assert not {"fedora-41", "fedora-42"} & set(site.images)


@pytest.mark.parametrize(("fields", "message"), [
    ({"key": "team.asc"}, "key and fingerprint go together"),
    ({"packages": ["team-agent"]}, "need the repository's own key"),
    ({"key": "team.asc", "fingerprint": "ab" * 20, "uri": "http://localhost:8080/team"},
     "loopback is reachable during the build only"),
    ({"key": "team.asc", "fingerprint": "xyz"}, "full fingerprint"),
    ({"uri": "http://deb.example.org/debian stable main"}, "http\\(s\\) URL"),
    ({"suite": "stable;reboot"}, "suite name"),
    ({"key": "team.asc", "fingerprint": "ab" * 20, "packages": ["Bad Name"]}, "String should match pattern"),
])
def test_extra_repository_is_refused_with_the_reason(fields: dict[str, object], message: str) -> None:
    base = {"kind": "debian", "uri": "http://deb.example.org/team", "suite": "stable"}
    with pytest.raises(ValidationError, match=message):
        Repository.model_validate({**base, **fields})


def test_extra_repository_on_loopback_is_build_only_and_named_for_its_host_and_suite() -> None:
    repo = Repository.model_validate({"kind": "debian", "uri": "http://127.0.0.2:8080/team/", "suite": "stable",
                                      "key": "team.asc", "fingerprint": "AB " * 20, "packages": ["team-agent"],
                                      "build_only": True})
    assert repo.on_loopback and repo.is_extra and repo.uri == "http://127.0.0.2:8080/team"
    assert repo.fingerprint == "ab" * 20
    assert repo.slug == "factory-127-0-0-2-8080-stable"
    plain = Repository.model_validate({"kind": "debian", "uri": "http://deb.debian.org/debian", "suite": "trixie"})
    assert not plain.is_extra and not plain.on_loopback and plain.components == ["main"]


@pytest.mark.parametrize(("entry", "change", "message"), [
    ("fedora-44-iso", {"secure_boot": True, "keys": "microsoft-2023"}, "secure_boot, keys need firmware: uefi"),
    ("fedora-44-iso", {"tpm": True}, "tpm needs firmware: uefi"),
    ("debian-lab-uefi", {"keys": None}, "secure_boot: true needs keys:"),
    ("debian-lab-uefi", {"secure_boot": False}, "keys: goes with secure_boot: true"),
    ("debian-lab-uefi", {"keys": "microsoft-2024"}, "microsoft-2011+2023"),
    ("debian-lab-uefi", {"machine": "pc"}, "firmware: uefi boots on machine: q35"),
    ("debian-lab-uefi", {"machine": "pc", "secure_boot": False, "keys": None, "tpm": False}, "drop machine: pc"),
    ("debian-lab-uefi", {"keys": "distribution-only"}, "shim is signed by Microsoft's UEFI CA only"),
])
def test_uefi_options_are_checked_with_entry_and_reason(tmp_path: Path, no_network: None, entry: str,
                                                        change: dict[str, Any], message: str) -> None:
    """Secure Boot, keys and TPM: inconsistent combinations are named with their entry before any build."""
    cat = example_catalogue()
    cat["images"][entry].update(change)
    [problem] = [p for p in problems_of(tmp_path, cat=cat) if entry in p.entry]
    assert problem.file.endswith("images.yml") and message in problem.message, problem


def test_uefi_machine_defaults_to_q35_bios_to_pc(tmp_path: Path, no_network: None) -> None:
    site = load_site(*site_files(tmp_path))
    assert site.images["debian-lab-uefi"].machine_type == "q35" and site.images["debian-lab"].machine_type == "pc"
    fedora = [i for i in site.images.values() if i.family == "fedora" and i.firmware == "uefi"]
    assert fedora and all(i.secure_boot and i.keys == "microsoft-2011+2023" for i in fedora)
