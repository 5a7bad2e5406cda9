"""Image families: everything that differs between Fedora, Debian and any family added later, in one place.

A family says how its images install in iso mode (an installer template and its validator), how the image
test lists installed packages, whether mitogen is proven on its guests, which upstream repositories a
release takes packages from by default, which signed checksum files it can trust and what to do when a
local source is missing. The catalogue's ``family:`` must name a registered family; adding one is one module
that calls :func:`register`, plus catalogue entries (see ``tests/unit/test_families.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from image_factory.errors import FactoryError


class FamilyError(FactoryError):
    pass


@dataclass(frozen=True)
class Installer:
    """iso mode: a Jinja template rendered to ``file_name`` and the command that validates it."""

    template: str  # in kickstart/ (or any template directory)
    file_name: str  # served by Packer's HTTP server; the boot command points the installer at it
    # typed at the installer's boot menu (Packer boot_command syntax; {{ .HTTPPort }} is Packer's)
    boot_command: tuple[str, ...]
    # the per-build part (build user, its key and a one-off password hash), never in builds/
    build_user_template: str
    build_user_file: str
    # argv of the validator, {release} and {file} filled in; None: no validator
    validator: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Family:
    name: str
    # "name<TAB>epoch:version-release<TAB>arch" lines, prefixed by "installed<TAB>" for installed packages
    package_query: str
    purl_type: str
    installer: Installer | None = None  # None: cloud images only
    mitogen_proven: bool = False  # the Ansible baseline may run under mitogen when the accelerator is TCG
    # upstream repositories of a release (inventory.Repository fields), unless the catalogue lists its own
    default_repositories: Callable[[int], list[dict[str, str]]] = field(default=lambda _release: [])
    signs_checksums: bool = False  # its remote CHECKSUM files are verified against pinned release keys
    missing_source_hint: str = "fetch it first"
    # the Python a release's images run Ansible's modules with (None: not known here)
    target_python: Callable[[int], tuple[int, int] | None] = field(default=lambda _release: None)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise FamilyError(f"unknown image family {name!r} (known: {', '.join(sorted(FAMILIES))})") from None


register(Family(
    name="fedora",
    package_query="rpm -qa --qf 'installed\\t%{NAME}\\t%{EPOCHNUM}:%{VERSION}-%{RELEASE}\\t%{ARCH}\\n'",
    purl_type="rpm",
    installer=Installer(
        "fedora.ks.j2", "ks.cfg",
        boot_command=("<up>e<wait>", "<down><down><end>",
                      " inst.text inst.ks=http://10.0.2.2:{{ .HTTPPort }}/ks.cfg console=tty0 console=ttyS0,115200n8",
                      "<leftCtrlOn>x<leftCtrlOff>"),
        build_user_template="partials/build-user.ks.j2", build_user_file="build-user.ks",
        validator=("ksvalidator", "-e", "-v", "F{release}", "{file}"),
    ),
    # Fedora 43+ ships Python 3.14 and 45 ships 3.15, where mitogen is unproven: linear there.
    mitogen_proven=False,
    default_repositories=lambda release: [{"kind": "fedora-metalink", "repo": f"fedora-{release}"},
                                          {"kind": "fedora-metalink", "repo": f"updates-released-f{release}"}],
    signs_checksums=True,
    # Fedora 42: 3.13; 43 and 44: 3.14; 45: 3.15 (Fedora's Python version change proposals)
    target_python=lambda release: (3, 13) if release <= 42 else (3, 14) if release <= 44 else (3, 15),
))

register(Family(
    name="debian",
    package_query="dpkg-query -W -f '${db:Status-Status}\\t${binary:Package}\\t${Version}\\t${Architecture}\\n'",
    purl_type="deb",
    # the lab's Debian fixture: bench/ansible_strategy and the e2e build run it under mitogen
    mitogen_proven=True,
    missing_source_hint="run `invoke lab.base-image`",
    target_python=lambda release: {12: (3, 11), 13: (3, 13)}.get(release),
))
