"""What is inside a built image: its packages, kernel and os-release, read from the booted image.

The image test reads them over its verified SSH session (one command per family, chosen from a
registry), the build directory keeps them as ``packages.json`` and a CycloneDX SBOM
(``sbom.cdx.json``, cyclonedx-python-lib), and the manifest records the package-set digest, which
publish writes into the template description.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from image_factory import families
from image_factory.errors import FactoryError
from image_factory.files import write_atomic

PACKAGES_NAME = "packages.json"
DIFF_NAME = "package-diff.json"
SBOM_NAME = "sbom.cdx.json"
SEP = "\t"


class ContentsError(FactoryError):
    """The image's package list could not be read or made sense of."""


@dataclass(frozen=True, order=True)
class Package:
    name: str
    version: str  # epoch:version-release as the package manager says it
    arch: str


@dataclass
class Contents:
    family: str
    packages: list[Package]
    kernel: str
    os_release: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """sha256 of the sorted package set: equal digests, equal installed software."""
        lines = "\n".join(f"{p.name} {p.version} {p.arch}" for p in sorted(self.packages))
        return hashlib.sha256(lines.encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        return {"packages_digest": self.digest, "packages": len(self.packages), "kernel": self.kernel,
                "os": self.os_release.get("PRETTY_NAME", ""), "os_version_id": self.os_release.get("VERSION_ID", "")}

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "kernel": self.kernel, "os_release": self.os_release,
                "packages_digest": self.digest, "packages": [asdict(p) for p in sorted(self.packages)]}


def parse_packages(text: str) -> list[Package]:
    packages = []
    for line in text.splitlines():
        parts = line.split(SEP)
        if len(parts) != 4:
            continue
        status, name, version, arch = parts
        if status.strip() == "installed" and name:
            packages.append(Package(name.split(":")[0], version, arch))
    return sorted(set(packages))


def parse_os_release(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            out[key.strip()] = " ".join(shlex.split(value)) if value.strip() else ""
    return out


def read_contents(run: Callable[[str], str], family: str) -> Contents:
    """Ask the booted image through ``run`` (a command -> stdout function over the test session)."""
    if family not in families.FAMILIES:
        raise ContentsError(f"no package query for family {family!r} (known: {', '.join(families.FAMILIES)})")
    packages = parse_packages(run(families.get(family).package_query))
    if not packages:
        raise ContentsError(f"{family}: the package query listed no installed package")
    return Contents(family, packages, run("uname -r").strip(), parse_os_release(run("cat /etc/os-release")))


def purl(contents: Contents, package: Package) -> str:
    # Local: packageurl and cyclonedx cost ~55 ms to import, paid only by a build that writes its SBOM.
    from packageurl import PackageURL

    distro = contents.os_release.get("ID", contents.family)
    qualifiers = {"arch": package.arch, "distro": f"{distro}-{contents.os_release.get('VERSION_ID', '')}"}
    return str(PackageURL(type=families.get(contents.family).purl_type, namespace=distro, name=package.name,
                          version=package.version, qualifiers=qualifiers))


def sbom_json(contents: Contents, *, image: str, build_id: str) -> str:
    """A CycloneDX 1.6 SBOM: the image as the root component, the OS and every installed package."""
    # Local for the cost (~55 ms with packageurl), paid only when an SBOM is written.
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    bom = Bom()
    root = Component(name=image, version=build_id, type=ComponentType.OPERATING_SYSTEM, bom_ref=f"image:{image}")
    bom.metadata.component = root
    distro = Component(name=contents.os_release.get("ID", contents.family),
                       version=contents.os_release.get("VERSION_ID", ""), type=ComponentType.OPERATING_SYSTEM,
                       description=contents.os_release.get("PRETTY_NAME", ""), bom_ref=f"os:{contents.family}")
    bom.components.add(distro)
    parts = [distro]
    for package in sorted(contents.packages):
        ref = purl(contents, package)
        component = Component(name=package.name, version=package.version, type=ComponentType.LIBRARY,
                              purl=PackageURL.from_string(ref), bom_ref=ref)
        bom.components.add(component)
        parts.append(component)
    bom.register_dependency(root, parts)
    return JsonV1Dot6(bom).output_as_string(indent=2)


@dataclass(frozen=True)
class PackageDiff:
    """What changed between two builds' package sets (keyed by name and architecture)."""

    from_build: str
    added: list[Package]
    removed: list[Package]
    changed: list[tuple[Package, Package]]  # (before, after)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "from_build": self.from_build,
            "added": [f"{p.name} {p.version}" for p in self.added],
            "removed": [f"{p.name} {p.version}" for p in self.removed],
            "changed": [{"name": a.name, "from": a.version, "to": b.version} for a, b in self.changed],
        }

    def summary(self) -> str:
        if self.empty:
            return f"no package changes since build {self.from_build}"
        parts = [f"{a.name} {a.version} -> {b.version}" for a, b in self.changed[:8]]
        parts += [f"+{p.name} {p.version}" for p in self.added[:4]] + [f"-{p.name}" for p in self.removed[:4]]
        more = len(self.changed) + len(self.added) + len(self.removed) - len(parts)
        return f"since build {self.from_build}: " + ", ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def diff(before: list[Package], after: list[Package], from_build: str) -> PackageDiff:
    old = {(p.name, p.arch): p for p in before}
    new = {(p.name, p.arch): p for p in after}
    return PackageDiff(
        from_build,
        added=sorted(new[k] for k in new.keys() - old.keys()),
        removed=sorted(old[k] for k in old.keys() - new.keys()),
        changed=sorted((old[k], new[k]) for k in old.keys() & new.keys() if old[k].version != new[k].version),
    )


def load_packages(build_dir: Path) -> tuple[str, list[Package]] | None:
    """The package list a previous image test recorded in build_dir: (its build id, packages), or None."""
    try:
        data = json.loads((build_dir / PACKAGES_NAME).read_text(encoding="utf-8"))
        return str(data.get("build_id", "?")), [Package(**p) for p in data["packages"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(build_dir: Path, contents: Contents, *, image: str, build_id: str) -> tuple[Path, Path]:
    """packages.json, the SBOM, and package-diff.json against the build whose packages.json this replaces."""
    previous = load_packages(build_dir)
    if previous is not None and previous[0] != build_id:
        changes = diff(previous[1], contents.packages, previous[0])
        write_atomic(build_dir / DIFF_NAME, json.dumps({**changes.to_dict(), "to_build": build_id}, indent=2) + "\n")
    packages = write_atomic(build_dir / PACKAGES_NAME,
                            json.dumps({**contents.to_dict(), "build_id": build_id}, indent=2, sort_keys=True) + "\n")
    sbom = write_atomic(build_dir / SBOM_NAME, sbom_json(contents, image=image, build_id=build_id) + "\n")
    return packages, sbom
