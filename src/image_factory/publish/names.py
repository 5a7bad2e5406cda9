"""What publish calls things on a host: the import file, the template's name, its tags and its description.

The description's format (header, ``key: value`` lines, PVE's size limit) is pve/templates' codec:
:func:`template_description` only chooses the lines a manifest gives, and
:func:`~image_factory.pve.templates.parse_description` / ``TemplateInfo.from_config`` read them back.
"""

from __future__ import annotations

import re

from image_factory.image.manifest import Manifest
from image_factory.ownership import FACTORY_TAG
from image_factory.publish.model import PublishError
from image_factory.pve.templates import encode_description
from image_factory.site.inventory import Image

# Files placed by SSH may use [a-zA-Z0-9-.+=_], but the upload endpoint rewrites every other
# character, '+' and '=' included, to '_' (docs/pve-facts.md): names from [A-Za-z0-9_.-] only, so
# both transports land the file under the name import-from points at.
IMPORT_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+\.(qcow2|raw|vmdk)$")
# What a factory template's description may name as its import file (older runs may have used + or =).
REMOVABLE_IMPORT_RE = re.compile(r"^[a-zA-Z0-9\-.+=_]+\.(qcow2|raw|vmdk)$")
DNS_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def sanitize_tag(text: str) -> str:
    tag = re.sub(r"[^a-z0-9_\-+.]+", "-", text.lower()).strip("-")
    if not tag or not re.match(r"[a-z0-9_]", tag[0]):
        tag = "x" + tag
    return tag


def dns_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower())
    name = re.sub(r"-{2,}", "-", name).strip("-")[:63].rstrip("-")
    if not DNS_RE.match(name):
        raise PublishError(f"cannot make a DNS-safe template name from {text!r}")
    return name


def import_file_name(manifest: Manifest) -> str:
    ext = manifest.artifact.format if manifest.artifact.format in ("qcow2", "raw", "vmdk") else "qcow2"
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{manifest.image}-{manifest.build_id}").strip("-.")
    name = f"{base}.{ext}"
    if not IMPORT_NAME_RE.match(name):
        raise PublishError(f"import file name {name!r} does not match [A-Za-z0-9_.-]+.(qcow2|raw|vmdk), the names "
                           "PVE's upload endpoint keeps as they are")
    return name


def efi_vars_file_name(import_file: str) -> str:
    """The import file of a build's EFI variable store: beside its disk's, raw (what efidisk0 import-from reads)."""
    return f"{import_file.rsplit('.', 1)[0]}.efivars.raw"


def template_name(image: Image, manifest: Manifest) -> str:
    raw = image.template_name.format(
        image=image.name, build_id=manifest.build_id, release=image.release, family=image.family
    )
    return dns_name(raw)


def template_tags(manifest: Manifest, tested: bool) -> list[str]:
    tags = {
        FACTORY_TAG,
        sanitize_tag(manifest.image),
        sanitize_tag(f"{manifest.family}-{manifest.release}"),
        sanitize_tag(f"build-{manifest.build_id}"),
        "tested" if tested else "untested",
    }
    return sorted(tags)


def test_summary(manifest: Manifest) -> str:
    t = manifest.image_test
    if t is None:
        return "none"
    ok = "for this sha256" if t.artifact_sha256 == manifest.artifact.sha256 else "for ANOTHER sha256"
    return (
        f"{t.status} ({t.passed} passed, {t.failed} failed, {t.errors} errors, {t.skipped} skipped; "
        f"suites {','.join(t.suites) or '-'}; {ok}; {t.finished_at or '?'})"
    )


def template_description(
    manifest: Manifest, *, import_file: str, tested: bool, forced: bool, run_id: str, published_at: str,
    efi_vars_file: str = "",
) -> str:
    """The description publish writes: what TemplateInfo.from_config reads back (image, build, digests, test
    result, import file, publish time and run), and what a human reads in the UI (git, firmware, contents)."""
    fields = [
        ("image", manifest.image),
        ("build_id", manifest.build_id),
        ("release", f"{manifest.family} {manifest.release}"),
        ("digest", manifest.digest),
        *([("content", manifest.content_digest)] if manifest.content_digest else []),
        ("sha256", manifest.artifact.sha256),
        ("image_test", test_summary(manifest)),
        ("tested", "yes" if tested else "no (published with --force-untested)" if forced else "no"),
        ("import_file", import_file),
        ("git", f"{manifest.git.get('commit', '?')}{' (dirty)' if manifest.git.get('dirty') else ''}"),
        ("built_at", str(manifest.finished_at)),
        ("firmware", manifest.platform.describe()),
        # which variable store efidisk0 got: the build's own (imported as it is), or PVE's vars template
        *([("efi_vars", f"{efi_vars_file} sha256={manifest.efi_vars_sha256} (the build's enrolled store)")]
          if efi_vars_file else []),
    ]
    if manifest.contents:
        inside = manifest.contents
        fields += [("packages", f"{inside.get('packages', '?')} (digest {inside.get('packages_digest', '?')})"),
                   ("os", f"{inside.get('os', '?')}, kernel {inside.get('kernel', '?')}")]
    fields += [("published_at", published_at), ("publish_run", run_id)]
    return encode_description(fields)
