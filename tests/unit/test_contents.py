"""contents.py: package lists per family, the package-set digest and the CycloneDX SBOM."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from image_factory import families
from image_factory.image import contents as ct

pytestmark = pytest.mark.unit

DPKG = ("installed\topenssh-server\t1:9.2p1-2+deb12u3\tamd64\n"
        "installed\tlibc6:amd64\t2.36-9+deb12u9\tamd64\n"
        "config-files\tremoved-one\t1.0\tall\n"
        "half-installed\tbroken\t2.0\tamd64\n")
RPM = ("installed\tkernel-core\t0:6.17.7-300.fc44\tx86_64\n"
       "installed\tbash\t0:5.3.0-2.fc44\tx86_64\n")
OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nID=debian\nVERSION_ID="12"\n'


def fake_guest(family_output: str):  # type: ignore[no-untyped-def]
    calls: list[str] = []

    def run(command: str) -> str:
        calls.append(command)
        if command.startswith(("dpkg-query", "rpm")):
            return family_output
        if command == "uname -r":
            return "6.1.0-28-cloud-amd64\n"
        return OS_RELEASE

    return run, calls


def test_only_installed_packages_count_and_multiarch_names_are_plain() -> None:
    run, calls = fake_guest(DPKG)
    inside = ct.read_contents(run, "debian")
    assert [(p.name, p.version) for p in inside.packages] == [("libc6", "2.36-9+deb12u9"),
                                                              ("openssh-server", "1:9.2p1-2+deb12u3")]
    assert calls[0] == families.get("debian").package_query
    assert inside.summary()["os"] == "Debian GNU/Linux 12 (bookworm)" and inside.kernel == "6.1.0-28-cloud-amd64"


def test_digest_is_the_package_set_not_its_order() -> None:
    a = ct.Contents("fedora", ct.parse_packages(RPM), "k")
    b = ct.Contents("fedora", ct.parse_packages("".join(reversed(RPM.splitlines(True)))), "other kernel")
    assert a.digest == b.digest
    upgraded = ct.Contents("fedora", ct.parse_packages(RPM.replace("5.3.0-2", "5.3.0-3")), "k")
    assert upgraded.digest != a.digest


def test_unknown_family_and_empty_list_are_errors() -> None:
    run, _ = fake_guest("")
    with pytest.raises(ct.ContentsError, match="no package query for family 'plan9'"):
        ct.read_contents(run, "plan9")
    with pytest.raises(ct.ContentsError, match="listed no installed package"):
        ct.read_contents(run, "debian")


def test_sbom_is_valid_cyclonedx_with_every_package(tmp_path: Path) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    run, _ = fake_guest(DPKG)
    inside = ct.read_contents(run, "debian")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dependency-graph warning would mean an incomplete SBOM
        packages, sbom = ct.save(tmp_path, inside, image="debian-lab", build_id="abc123")
    text = sbom.read_text()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    doc = json.loads(text)
    assert doc["metadata"]["component"]["name"] == "debian-lab"
    purls = sorted(c.get("purl", "") for c in doc["components"])
    assert "pkg:deb/debian/openssh-server@1:9.2p1-2%2Bdeb12u3?arch=amd64&distro=debian-12" in purls
    assert json.loads(packages.read_text())["packages_digest"] == inside.digest


def test_package_diff_against_the_previous_build(tmp_path: Path) -> None:
    from image_factory.image.contents import DIFF_NAME, Contents, Package, save

    first = Contents("debian", [Package("openssl", "3.5.1-1", "amd64"), Package("vim-tiny", "2:9.1-1", "amd64"),
                                Package("libc6", "2.41-12", "amd64")], "6.12.117-cloud-amd64")
    save(tmp_path, first, image="debian-lab", build_id="b1")
    assert not (tmp_path / DIFF_NAME).exists()  # nothing to compare the first build with
    second = Contents("debian", [Package("openssl", "3.5.1-1+deb13u1", "amd64"), Package("libc6", "2.41-12", "amd64"),
                                 Package("nano", "8.4-1", "amd64")], "6.12.118-cloud-amd64")
    save(tmp_path, second, image="debian-lab", build_id="b2")
    diff = json.loads((tmp_path / DIFF_NAME).read_text())
    assert diff == {"from_build": "b1", "to_build": "b2", "added": ["nano 8.4-1"], "removed": ["vim-tiny 2:9.1-1"],
                    "changed": [{"name": "openssl", "from": "3.5.1-1", "to": "3.5.1-1+deb13u1"}]}
    save(tmp_path, second, image="debian-lab", build_id="b2")  # the same build tested again: diff kept
    assert json.loads((tmp_path / DIFF_NAME).read_text())["from_build"] == "b1"
