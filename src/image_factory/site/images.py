"""The image catalogue: an image's source, family and release, firmware and Secure Boot keys, upstream
repositories, tests, and the end-of-life gate."""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Iterable
from datetime import date
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from image_factory import families
from image_factory.errors import Problem, ValidationFailed
from image_factory.platform import Platform
from image_factory.site.formats import MAX_CORES, MAX_MEMORY_MIB, REMOTE_PATH_RE, CpuType, DiskSize, ImageName, Strict

Suite = Literal["common", "hygiene", "fedora", "updates", "builder", "firmware"]
TEMPLATE_FIELDS = ("image", "build_id", "release", "family")  # what publish.template_name fills in
MAX_TEMPLATE_PATTERN = 128
EOL_WARN_DAYS = 30


class Repository(Strict):
    """An upstream package repository a build takes packages from: its signed state (epoch) is part of the
    build's identity, so a nightly rebuilds when upstream moved (image_factory.image.upstream).

    A debian repository with its own ``key`` is an extra one (a team's own packages): the build adds it to
    the guest, signed by that key, and installs its ``packages``; ``build_only`` removes it again before
    the seal (a repository deployed VMs cannot or should not reach)."""

    kind: Literal["debian", "fedora-metalink"]
    uri: str | None = Field(default=None, description="debian: the archive root (http://deb.debian.org/debian)")
    suite: str | None = Field(default=None, description="debian: the suite (trixie, trixie-security)")
    components: list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._/-]*$")]] = Field(
        default_factory=lambda: ["main"], min_length=1)
    repo: str | None = Field(default=None, description="fedora-metalink: the repo id (updates-released-f45)")
    key: str | None = Field(default=None, description="debian, extra repository: its OpenPGP public key file")
    fingerprint: str | None = Field(default=None, description="the key's pinned fingerprint (40 hex digits)")
    packages: list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9+.-]+$")]] = Field(default_factory=list)
    build_only: bool = False

    @field_validator("uri")
    @classmethod
    def _http_uri(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"https?://[A-Za-z0-9.\[\]:-]+(/[A-Za-z0-9._~/%+-]*)?", v):
            raise ValueError("must be an http(s) URL without spaces, quotes or query (http://deb.example.org/debian)")
        return v.rstrip("/") if v else v

    @field_validator("suite")
    @classmethod
    def _suite_word(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-z0-9][a-z0-9._/-]*", v):
            raise ValueError("must be a suite name (trixie, trixie-security, stable)")
        return v

    @field_validator("fingerprint")
    @classmethod
    def _fingerprint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        compact = v.replace(" ", "").lower()
        if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", compact):
            raise ValueError("must be the key's full fingerprint (40 or 64 hex digits, spaces allowed)")
        return compact

    @model_validator(mode="after")
    def _complete(self) -> Repository:
        if self.kind == "debian" and not (self.uri and self.suite):
            raise ValueError("a debian repository needs uri and suite")
        if self.kind == "fedora-metalink" and not self.repo:
            raise ValueError("a fedora-metalink repository needs repo (for example updates-released-f45)")
        if (self.key is None) != (self.fingerprint is None):
            raise ValueError("key and fingerprint go together: the key file is refused unless it has the "
                             "pinned fingerprint")
        if self.kind != "debian" and (self.key or self.packages or self.build_only):
            raise ValueError("key, packages and build_only are for extra debian repositories")
        if (self.packages or self.build_only) and not self.key:
            raise ValueError("packages and build_only need the repository's own key (an extra repository)")
        if self.is_extra and self.on_loopback and not self.build_only:
            raise ValueError("a repository on this machine's loopback is reachable during the build only (the "
                             "build VM reaches it through QEMU's gateway): set build_only: true")
        return self

    @property
    def name(self) -> str:
        return f"{self.uri} {self.suite}" if self.kind == "debian" else f"metalink {self.repo}"

    @property
    def is_extra(self) -> bool:
        """Not one of the release's own suites: the build adds it to the guest."""
        return self.key is not None

    @property
    def on_loopback(self) -> bool:
        host = re.sub(r"^https?://", "", self.uri or "").split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def slug(self) -> str:
        """A file name for the guest's sources and keyring (factory-<host>-<suite>)."""
        host = re.sub(r"^https?://", "", self.uri or self.repo or "").split("/", 1)[0]
        return "factory-" + re.sub(r"[^a-z0-9]+", "-", f"{host}-{self.suite or ''}".lower()).strip("-")


class Source(Strict):
    url: str = Field(description="http(s) URL, or a path relative to the repository root")
    checksum: str = Field(description="'sha256:<hex>', 'file:<url-or-path>' or 'none' for local fixtures")

    @field_validator("checksum")
    @classmethod
    def _checksum(cls, v: str) -> str:
        if v in ("none", "refresh") or v.startswith("file:") or re.fullmatch(
                r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}", v):
            return v
        raise ValueError("must be 'sha256:<64 hex>', 'sha512:<128 hex>', 'file:<checksum file>', 'refresh' or 'none'")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", v)
        if scheme and scheme[1].lower() not in ("http", "https"):
            raise ValueError(f"{scheme[1]}:// is not supported: use https://, http:// or a local path")
        if not v.strip() or any(ch.isspace() for ch in v):
            raise ValueError("must be a URL or path without whitespace")
        return v

    @model_validator(mode="after")
    def _none_only_local(self) -> Source:
        if self.checksum == "none" and not self.is_local:
            raise ValueError("checksum 'none' is accepted for local files only; a download needs 'sha256:...' or "
                             "a signed 'file:' checksum")
        if (self.checksum == "refresh") != (not self.is_local and self.url.endswith("/")):
            raise ValueError("checksum 'refresh' (media not pinned yet) goes with the release's media directory "
                             "URL (ending in '/'), and a directory URL needs it")
        return self

    @property
    def pinned(self) -> bool:
        """False until image.refresh has written a file URL and its signed checksum."""
        return self.checksum != "refresh"

    @property
    def is_local(self) -> bool:
        return not re.match(r"^[a-z]+://", self.url, re.IGNORECASE)


class Image(Strict):
    name: ImageName
    family: str = Field(description="a registered image family (image_factory.families)")
    release: int = Field(ge=1)
    mode: Literal["iso", "cloud"]
    source: Source
    # The firmware the build VM and the template boot with: bios (SeaBIOS) or uefi (OVMF, q35). iso mode
    # installs for it (a BIOS boot partition or an EFI system partition); a cloud image must carry a loader
    # for it, as vendors' hybrid GPT images (Debian genericcloud, Fedora Cloud Base) carry both.
    firmware: Literal["bios", "uefi"] = "bios"
    # uefi only: Secure Boot enforced by the template's EFI vars, with the key set the catalogue chooses
    # (Microsoft's 2011 CAs expired in June 2026: choose deliberately); a vTPM 2.0; the QEMU machine.
    secure_boot: bool = False
    keys: Literal["microsoft-2023", "microsoft-2011+2023", "distribution-only", "none"] | None = None
    tpm: bool = False
    machine: Literal["pc", "q35"] | None = Field(default=None, description="default: q35 for uefi, pc for bios")
    eol: date | None = Field(default=None, description="end of life: warn 30 days before, refuse after")
    disk_size: DiskSize = "10G"
    playbook: str = Field(default="ansible/playbooks/template.yml",
                          description="relative to the repository (or site) directory, never outside it")
    test_suites: list[Suite] = Field(default_factory=lambda: list[Suite](["common"]))
    template_name: str = "tpl-{image}-{build_id}"
    memory: int = Field(default=2048, ge=512, le=MAX_MEMORY_MIB, description="MiB for the build VM")
    cpus: int = Field(default=2, ge=1, le=MAX_CORES)
    # The template's CPU type (publish sets it; a clone, deploy's or OpenTofu's, inherits it instead of PVE's
    # kvm64/qemu64); a VM's own vm.cpu overrides it. A publish parameter, not a build input: excluded from the
    # catalogue digest a build's identity hashes, so setting it rebuilds nothing (the next publish carries it).
    cpu: CpuType | None = Field(default=None, exclude=True)
    # qemu-img convert -c: smaller uploads over a WAN, ~15 s more per build on 2 TCG cores.
    compress: bool = True
    # Apply the release's updates during the build (reboot into a newer kernel before sealing).
    updates: bool = True
    # An image that takes updates is rebuilt once its build is this old, even with nothing else changed:
    # the nightly then carries the upstream fixes of the last week at the latest.
    max_age_days: int = Field(default=7, ge=1, le=365)
    # Upstream repositories whose state is part of the build's identity; Fedora's default is its release
    # and updates repositories (see upstream_repositories).
    repositories: list[Repository] | None = None
    # The image carries this factory (a nightly runner's image): the wheel built from this checkout and the
    # hashed lock requirements/build.txt reach the playbook as factory_bundle (docs/images.md).
    factory: bool = False

    @property
    def upstream_repositories(self) -> list[Repository]:
        if self.repositories is not None:
            return list(self.repositories)
        return [Repository.model_validate(r) for r in families.get(self.family).default_repositories(self.release)]

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        if v not in families.FAMILIES:
            raise ValueError(f"unknown image family {v!r} (known: {', '.join(sorted(families.FAMILIES))})")
        return v

    @property
    def machine_type(self) -> str:
        return self.machine or ("q35" if self.firmware == "uefi" else "pc")

    @property
    def platform(self) -> Platform:
        return Platform(self.firmware, self.secure_boot, self.keys, self.tpm, self.machine_type, self.family)

    @model_validator(mode="after")
    def _uefi_options(self) -> Image:
        if self.firmware != "uefi":
            extra = [k for k in ("secure_boot", "tpm") if getattr(self, k)] + (["keys"] if self.keys else [])
            if extra:
                raise ValueError(f"{', '.join(extra)} need{'s' if len(extra) == 1 else ''} firmware: uefi (this entry "
                                 "is firmware: bios)")
        if self.secure_boot and self.keys is None:
            raise ValueError("secure_boot: true needs keys: (microsoft-2023, microsoft-2011+2023, distribution-only "
                             "or none)")
        if self.keys is not None and not self.secure_boot:
            raise ValueError("keys: goes with secure_boot: true")
        if self.firmware == "uefi" and self.machine == "pc":
            # one UEFI machine, so a manifest's machine is never ambiguous (Manifest.machine_type)
            raise ValueError("firmware: uefi boots on machine: q35 (Secure Boot needs q35's SMM; the template's EFI "
                             "disk and its cloud-init drive on SCSI are laid out for q35): drop machine: pc")
        return self

    @model_validator(mode="after")
    def _iso_needs_an_installer(self) -> Image:
        if self.mode == "iso" and self.family in families.FAMILIES and families.get(self.family).installer is None:
            raise ValueError(f"mode: iso needs an installer, and the {self.family} family has none (cloud mode only)")
        return self

    @model_validator(mode="after")
    def _builder_suite_needs_the_factory(self) -> Image:
        if "builder" in self.test_suites and not self.factory:
            raise ValueError("test_suites: the builder suite checks the factory installed in the image: it needs "
                             "factory: true")
        return self

    @model_validator(mode="after")
    def _keys_boot_the_signed_chain(self) -> Image:
        # Measured (docs/images.md): OVMF refuses Debian 13's shim with only Debian's CA in db ("Access Denied");
        # Fedora's is signed by Microsoft only as well. The store itself is made (firmware.KEY_SETS).
        if self.keys == "distribution-only":
            raise ValueError("keys: distribution-only cannot boot the Debian or Fedora chain: the firmware loads shim "
                             "first, and shim is signed by Microsoft's UEFI CA only, not by the distribution's CA "
                             "(choose microsoft-2011+2023 or microsoft-2023; docs/images.md)")
        return self

    @model_validator(mode="after")
    def _eol_known(self) -> Image:
        if self.eol is None and not self.source.is_local:
            raise ValueError("eol: a downloaded release needs its end-of-life date (YYYY-MM-DD)")
        return self

    def eol_status(self, today: date, warn_days: int = EOL_WARN_DAYS) -> tuple[str, str]:
        """("ok" | "warn" | "eol", message) for this image on ``today``."""
        if self.eol is None:
            return "ok", ""
        days = (self.eol - today).days
        if days < 0:
            return "eol", (f"{self.name}: {self.family} {self.release} reached its end of life on {self.eol} "
                           f"({-days} days ago): no more security updates; move to a supported release, or pass "
                           "--allow-eol to build it from the archive anyway")
        if days <= warn_days:
            return "warn", (f"{self.name}: {self.family} {self.release} reaches its end of life on {self.eol} "
                            f"(in {days} days); plan the move to a newer release")
        return "ok", ""

    @field_validator("playbook")
    @classmethod
    def _confined_playbook(cls, v: str) -> str:
        """The playbook runs with the build's credentials: it comes from the repository (or site) directory only."""
        path = PurePosixPath(v)
        if (path.is_absolute() or v.startswith("~") or ".." in path.parts or "\\" in v
                or path.suffix not in (".yml", ".yaml") or not REMOTE_PATH_RE.match(f"/{v}")):
            raise ValueError("must be a playbook (.yml) inside the repository, as a relative path without '..' "
                             "(e.g. ansible/playbooks/template.yml)")
        return v

    @field_validator("template_name")
    @classmethod
    def _tpl(cls, v: str) -> str:
        """Placeholders by name only: a field path (``{image.__class__}``), a format spec (``{image:>300000000}``)
        or a conversion (``{image!r}``) would reach attributes or pad without bound."""
        use = " ".join(f"{{{name}}}" for name in TEMPLATE_FIELDS)
        if len(v) > MAX_TEMPLATE_PATTERN:
            raise ValueError(f"is {len(v)} characters long; at most {MAX_TEMPLATE_PATTERN}")
        try:
            fields = list(string.Formatter().parse(v))
        except ValueError as exc:
            raise ValueError(f"{exc}; use {use} (write a literal brace as {{{{ or }}}})") from None
        for _, name, spec, conversion in fields:
            if name is None:
                continue
            if name not in TEMPLATE_FIELDS:
                raise ValueError(f"unknown placeholder {{{name}}}; use {use}")
            if spec or conversion:
                raise ValueError(f"placeholder {{{name}}} takes no format spec or conversion; use {use}")
        return v


def eol_gate(images: Iterable[Image], catalogue: Path | str, *, allow_eol: bool = False,
             today: date | None = None) -> list[str]:
    """Warnings for images within 30 days of their end of life; ValidationFailed for those past it."""
    day = today or date.today()
    warnings: list[str] = []
    refused: list[Problem] = []
    for image in images:
        level, message = image.eol_status(day)
        if level == "warn" or (level == "eol" and allow_eol):
            warnings.append(message + (" (--allow-eol given)" if level == "eol" else ""))
        elif level == "eol":
            refused.append(Problem(str(catalogue), image.name, "eol", message.split(": ", 1)[1]))
    if refused:
        raise ValidationFailed(refused)
    return warnings
