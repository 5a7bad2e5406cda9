"""Render Packer HCL and Fedora kickstarts from Jinja templates, then validate them with the real tools.

Deterministic output goes to builds/<image>/ (git-ignored): ``<image>.pkr.hcl``, ``ks.cfg`` (iso mode)
and ``seed/meta-data`` (cloud mode). Per-build material (SSH key pair, NoCloud user-data, the kickstart
part with the SHA-512 crypt hash, the Packer var file) lives in a 0700 directory OUTSIDE the repository,
every file 0600, and is removed by ``RenderResult.cleanup()``. No plaintext password is ever written:
the build user logs in with a per-build key; its password hash belongs to a random password that
is thrown away at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import yaml

from image_factory import families, tools
from image_factory.errors import FactoryError
from image_factory.families import Installer
from image_factory.image.fedora_media import located, remote_checksum_file
from image_factory.image.signatures import SignatureError, load_key_file
from image_factory.settings import Settings
from image_factory.site.inventory import Image, Repository
from image_factory.units import parse_size

BUILD_USER = "packer"
# The build VM's NIC: fixed, so the cloud-mode seed's network-config can match it by MAC (a name pattern
# is not something every renderer, ENI among them, can express).
BUILD_MAC = "52:54:00:fa:c7:01"
ARTIFACT_RE = re.compile(r"^[a-zA-Z0-9\-.+=_]+\.qcow2$")
REMOTE_CHECKSUM_RE = re.compile(r"^file:[A-Za-z][A-Za-z0-9+.-]*:")  # file:https://, file:HTTPS://, file:s3::...
TEMPLATE_DIRS = ("packer", "kickstart")
ANSIBLE_DIR = "ansible"
SSH_TIMEOUT = {"cloud": "20m", "iso": "90m"}
# Plugin versions for Packer >= 1.7 (required_plugins, installed by `packer init`): pinned, so a
# plugin release never changes a build unannounced. Tags of hashicorp/packer-plugin-qemu and -ansible.
PLUGIN_VERSIONS = {"qemu": "1.1.5", "ansible": "1.1.6"}
# The first Packer that reads required_plugins and has `packer init` for HCL templates (1.6 has the builders
# built in); 1.10+ bundles no plugin at all, so from here on `packer init` must run before `packer validate`
# or `packer build`.
PLUGIN_PACKER = (1, 7, 0)
# Runs over SSH as the build user after the playbook: remove the build user itself (it cannot
# delete itself from inside Ansible while logged in), then power off.
SHUTDOWN_COMMAND = (
    f"sudo -n sh -c 'rm -f /etc/sudoers.d/{BUILD_USER} /etc/sudoers.d/90-cloud-init-users; "
    f"userdel --force --remove {BUILD_USER}; rm -rf /tmp/* /tmp/.[!.]* /var/tmp/* /root/.ansible; "
    "sync; systemctl poweroff'"
)


class RenderError(FactoryError):
    """A template, a catalogue value or a rendered file was rejected (by us or by its real tool)."""

    exit_code = 3


class ToolMissing(FactoryError):
    """A required external program is not installed."""


@dataclass
class RenderResult:
    image: Image
    out_dir: Path
    files: list[Path]
    hcl: Path
    kickstart: Path | None
    var_file: Path
    fingerprint: str
    secret_dir: Path | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    packer_version: tuple[int, int, int] = (0, 0, 0)  # the Packer it was rendered for

    def cleanup(self) -> None:
        """Remove the per-build secret directory (key, seed, var file)."""
        if self.secret_dir is not None:
            shutil.rmtree(self.secret_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------- tools


def tool_missing(tool: str) -> ToolMissing:
    """Worded from the tools registry, as `invoke doctor` reports the same tool."""
    return ToolMissing(tools.missing_message(tool))


def require_tool(tool: str) -> str:
    """The program's path: this venv's bin first (ansible-playbook, ksvalidator, ansible-lint), then PATH."""
    local = venv_bin() / tool
    if local.exists():
        return str(local)
    path = shutil.which(tool)
    if path is None:
        raise tool_missing(tool)
    return path


_packer_version_cache: dict[str, tuple[int, int, int]] = {}


def packer_version() -> tuple[int, int, int]:
    """The installed Packer's version, e.g. (1, 6, 6)."""
    exe = require_tool("packer")
    if exe in _packer_version_cache:
        return _packer_version_cache[exe]
    proc = subprocess.run([exe, "version"], capture_output=True, text=True, timeout=60)
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", proc.stdout)
    if proc.returncode != 0 or m is None:
        raise ToolMissing(f"`packer version` failed or printed no version: {proc.stdout}{proc.stderr}".strip())
    version = (int(m[1]), int(m[2]), int(m[3]))
    _packer_version_cache[exe] = version
    return version


def _installed_packer_version() -> tuple[int, int, int]:
    return packer_version()


def venv_bin() -> Path:
    return Path(sys.executable).parent


def tool_env() -> dict[str, str]:
    """Environment for packer and the linters: this venv's bin (ansible-playbook) first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}"
    env["CHECKPOINT_DISABLE"] = "1"  # no phone-home from packer
    env["PACKER_NO_COLOR"] = "1"
    return env


# ---------------------------------------------------------------------------------------- helpers


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def disk_size_mb(size: str) -> int:
    return parse_size(size) // 2**20


def artifact_name(image: Image) -> str:
    name = f"{image.name}.qcow2"
    if not ARTIFACT_RE.match(name):
        raise RenderError(f"image name {image.name!r} does not give a Proxmox-importable file name ({name})")
    return name


def source_paths(settings: Settings, image: Image) -> tuple[Path | None, Path | None]:
    """For a local source: (image file, checksum file or None); (None, None) for a URL."""
    if not image.source.is_local:
        return None, None
    src = settings.resolve(image.source.url)
    ck = image.source.checksum
    if ck.startswith("file:") and not REMOTE_CHECKSUM_RE.match(ck):
        return src, settings.resolve(ck[len("file:"):])
    return src, None


def _source_checksum_hcl(settings: Settings, image: Image) -> str:
    ck = image.source.checksum
    if ck.startswith("file:") and image.source.is_local and not REMOTE_CHECKSUM_RE.match(ck):
        return f"file:{settings.resolve(ck[len('file:'):])}"
    return ck


def source_checksum_input(settings: Settings, image: Image) -> str:
    """What the fingerprint records about the source: the checksum itself, or the checksum file's content."""
    _, ck_file = source_paths(settings, image)
    if ck_file is None:
        return image.source.checksum
    try:
        return ck_file.read_text(encoding="utf-8").split()[0] if ck_file.stat().st_size else "empty"
    except (FileNotFoundError, IndexError):
        return "missing"


def _hcl_string(value: str, what: str) -> str:
    if any(ch in value for ch in '"\\\n') or "${" in value or "%{" in value:
        raise RenderError(f"{what}: {value!r} contains characters not allowed in an HCL string")
    return value


def playbook_roles(playbook: Path) -> list[str]:
    """Role names a playbook lists under ``roles:`` (as strings or ``{role: name}``)."""
    try:
        plays = yaml.safe_load(playbook.read_text(encoding="utf-8")) or []
    except (OSError, yaml.YAMLError) as exc:
        raise RenderError(f"{playbook}: cannot read the playbook: {exc}") from None
    names: list[str] = []
    for play in plays if isinstance(plays, list) else []:
        for role in (play.get("roles") or []) if isinstance(play, dict) else []:
            name = role.get("role") or role.get("name") if isinstance(role, dict) else role
            if isinstance(name, str):
                names.append(name)
    return sorted(set(names))


def template_files(settings: Settings, image: Image | None = None) -> list[Path]:
    """Every template and Ansible file a build depends on (for the fingerprint).

    Ansible: the image's playbook, the roles it lists and ansible.cfg (other playbooks and roles in
    the repository, e.g. for hypervisors, do not invalidate image builds).
    """
    out: list[Path] = []
    for d in TEMPLATE_DIRS:
        base = settings.data / d
        out.extend(p for p in base.rglob("*.j2") if p.is_file())
    ans = settings.data / ANSIBLE_DIR
    if image is None:
        dirs = [ans / "playbooks", ans / "roles"]
    else:
        playbook = settings.resolve(image.playbook)
        out.append(playbook)
        dirs = [ans / "roles" / name for name in playbook_roles(playbook)]
    for folder in dirs:
        out.extend(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    cfg = ans / "ansible.cfg"
    if cfg.exists():
        out.append(cfg)
    return sorted(set(out))


# Catalogue fields added after builds were cached: they count in the fingerprint only when an entry sets them.
UNSET_UNCOUNTED = ("secure_boot", "keys", "tpm", "machine", "factory")


def compute_fingerprint(settings: Settings, image: Image, rendered: list[Path], out_dir: Path) -> tuple[str, dict]:
    inputs: dict[str, str] = {}
    for p in rendered:
        inputs[f"rendered:{p.relative_to(out_dir)}"] = _sha256(p.read_bytes())
    # the extra repositories' keys too: a new key is a new build, even under the same catalogue text
    keys = [settings.resolve(repo.key) for repo in image.upstream_repositories if repo.key]
    for p in [*template_files(settings, image), *keys]:
        key = next((str(p.relative_to(d)) for d in (settings.data, settings.root) if p.is_relative_to(d)), str(p))
        inputs[f"input:{key}"] = _sha256(p.read_bytes())
    if image.factory:  # the factory's own wheel goes into the image: a change to the factory is a new build
        for p in factory_sources(settings):
            inputs[f"factory:{p.relative_to(settings.root)}"] = _sha256(p.read_bytes())
    entry = image.model_dump(mode="json", by_alias=True)
    for name in UNSET_UNCOUNTED:  # an image that does not use a later field keeps its fingerprint (and cache)
        if entry.get(name) == Image.model_fields[name].default:
            del entry[name]
    inputs["catalogue"] = _sha256(json.dumps(entry, sort_keys=True).encode())
    inputs["source_checksum"] = source_checksum_input(settings, image)
    blob = json.dumps(inputs, sort_keys=True).encode()
    return _sha256(blob), inputs


# What the factory's wheel is made of (pyproject.toml maps the data directories in), and its hashed lock.
FACTORY_WHEEL_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "src", "packer", "kickstart", "ansible",
                         "tests/image")
FACTORY_LOCK = "requirements/build.txt"
FACTORY_BUNDLE_DIR = "factory-bundle"  # in the build's secret directory: the wheel and the lock


def not_a_factory_checkout(settings: Settings) -> str | None:
    """Why an image with ``factory: true`` cannot be rendered here (an installed wheel, or a directory that is not
    the factory's checkout), or None."""
    root = settings.root
    if not (root / "pyproject.toml").is_file():
        return (f"an image with factory: true carries the factory built from its checkout, and {root} is not one "
                "(no pyproject.toml): build it from a git clone of the factory")
    missing = next((rel for rel in (*FACTORY_WHEEL_SOURCES, FACTORY_LOCK) if not (root / rel).exists()), None)
    if missing is not None:
        return f"the factory's {missing} is missing from {root}: its wheel cannot be built"
    return None


def factory_sources(settings: Settings) -> list[Path]:
    """Every file the factory's wheel is built from, plus the lock its dependencies are installed from."""
    root = settings.root
    why_not = not_a_factory_checkout(settings)
    if why_not:
        raise RenderError(why_not)
    files: list[Path] = []
    for rel in (*FACTORY_WHEEL_SOURCES, FACTORY_LOCK):
        path = root / rel
        if path.is_dir():
            files += [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                      and not any(part.endswith(".egg-info") for part in p.parts)]
        else:
            files.append(path)
    return sorted(files)


# -------------------------------------------------------------------------------------------- render


def _environment(settings: Settings) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(settings.data / d) for d in TEMPLATE_DIRS]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # noqa: S701 - HCL/kickstart/YAML, not HTML; values are checked above
    )


def _render(env: jinja2.Environment, name: str, ctx: dict) -> str:
    try:
        return env.get_template(name).render(**ctx)
    except jinja2.UndefinedError as exc:
        tb = exc.__traceback__
        where = name
        while tb is not None:
            fn = tb.tb_frame.f_code.co_filename
            if fn.endswith(".j2"):
                where = f"{fn}:{tb.tb_lineno}"
            tb = tb.tb_next
        raise RenderError(f"{where}: undefined template variable: {exc.message}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(f"{exc.filename or name}:{exc.lineno}: template syntax error: {exc.message}") from None
    except jinja2.TemplateNotFound as exc:
        raise RenderError(f"template {exc.name} not found (looked in {', '.join(TEMPLATE_DIRS)})") from None


def write_file(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(path, mode)


def sha512_crypt(password: str) -> str:
    """SHA-512 crypt ($6$) via `openssl passwd -6`; the password goes over stdin, never argv."""
    exe = require_tool("openssl")
    salt = secrets.token_hex(8)
    proc = subprocess.run(
        [exe, "passwd", "-6", "-salt", salt, "-stdin"], input=password, capture_output=True, text=True, timeout=30
    )
    out = proc.stdout.strip()
    if proc.returncode != 0 or not out.startswith("$6$"):
        raise RenderError(f"openssl passwd -6 failed: {proc.stderr.strip()}")
    return out


SEED_ISO = "seed.iso"
SEED_FILES = ("meta-data", "user-data", "network-config")


def seed_iso(seed_dir: Path, iso: Path) -> None:
    """The NoCloud seed CD, made as Packer's cd_files makes it (xorriso, volume label cidata): with
    Packer 1.6 a UEFI build names every drive in qemuargs, and Packer's own CD has a random path."""
    xorriso = shutil.which("xorriso")
    if xorriso is None:
        raise RenderError("a UEFI cloud build on Packer 1.6 needs xorriso for its seed CD: "
                          + tools.provided_by("xorriso"))
    proc = subprocess.run([xorriso, "-as", "genisoimage", "-rock", "-joliet", "-volid", "cidata", "-output", str(iso),
                           *(str(seed_dir / name) for name in SEED_FILES)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RenderError(f"xorriso could not make the seed CD {iso}: {proc.stderr.strip()[-500:]}")
    iso.chmod(0o600)  # the build user's public key and sudo rule: per build, like the seed files


def _keypair(secret_dir: Path) -> tuple[Path, str]:
    key = secret_dir / "id_ed25519"
    exe = require_tool("ssh-keygen")
    proc = subprocess.run(
        [exe, "-q", "-t", "ed25519", "-N", "", "-C", "image-factory-build", "-f", str(key)],
        capture_output=True, text=True, timeout=30,
    )
    if proc.returncode != 0:
        raise RenderError(f"ssh-keygen failed: {proc.stderr.strip()}")
    os.chmod(key, 0o600)
    pub = secret_dir / "id_ed25519.pub"
    os.chmod(pub, 0o600)
    return key, pub.read_text(encoding="utf-8").strip()


def _secret_dir(image: Image) -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or None
    return Path(tempfile.mkdtemp(prefix=f"factory-{image.name}-", dir=base))  # mkdtemp makes it 0700


BUILD_VARS_FILE = "build-vars.json"
# QEMU's user network: the address at which the build VM reaches this machine's loopback (as Packer's own
# HTTP server is reached, packer_http_addr).
BUILD_VM_HOST_GATEWAY = "10.0.2.2"


def guest_uri(repo: Repository) -> str:
    """A repository URI as the build VM reaches it: this machine's loopback becomes QEMU's gateway."""
    assert repo.uri
    if not repo.on_loopback:
        return repo.uri
    return re.sub(r"^(https?://)(\[[^]]+\]|[^/:]+)", rf"\g<1>{BUILD_VM_HOST_GATEWAY}", repo.uri)


def build_vars(settings: Settings, image: Image) -> dict[str, object]:
    """Variables for the build's playbook beyond the catalogue basics: the extra repositories to add to
    the guest (each with its key, checked against its pinned fingerprint) and the packages to take from them."""
    repos = []
    for index, repo in enumerate(image.upstream_repositories):
        if not repo.is_extra:
            continue
        assert repo.key and repo.fingerprint and repo.uri and repo.suite
        where = f"{settings.images}: {image.name}: repositories[{index}].key"
        path = settings.resolve(repo.key)
        if not path.is_file():
            raise RenderError(f"{where}: {path} does not exist")
        try:
            load_key_file(path, repo.fingerprint, pinned_in=f"{where[:-4]}.fingerprint")
        except SignatureError as exc:
            raise RenderError(f"{where}: {exc}") from None
        repos.append({
            "slug": repo.slug,
            "uri": guest_uri(repo),
            "suite": repo.suite,
            "components": list(repo.components),
            "key": path.read_text(encoding="utf-8"),
            "packages": list(repo.packages),
            "build_only": repo.build_only,
        })
    return {"factory_repositories": repos}


def render_image(
    settings: Settings, image: Image, *, packer_version: tuple[int, int, int] | None = None, scratch: bool = False
) -> RenderResult:
    """Render one catalogue image into builds/<image>/ plus a fresh per-build secret directory.

    ``scratch`` (a dry run): render inside the secret directory instead, so nothing under builds/ is
    written; the fingerprint is the same, since it hashes content and paths relative to the output.
    """
    pv = packer_version if packer_version is not None else _installed_packer_version()
    installer, ctx = _context(settings, image, pv)
    env = _environment(settings)
    # Render everything in memory first: a template error leaves builds/<image>/ untouched.
    public: dict[str, str] = {f"{image.name}.pkr.hcl": _render(env, "image.pkr.hcl.j2", ctx)}
    if installer is not None:
        public[installer.file_name] = _render(env, installer.template, ctx)
    else:
        public["seed/meta-data"] = _render(env, "cloud-init/meta-data.j2", ctx)
        public["seed/network-config"] = _render(env, "cloud-init/network-config.j2", ctx)
    secret_dir = _secret_dir(image)
    try:
        var_file = _write_secrets(settings, image, installer, env, ctx, public, secret_dir, pv)
        out_dir = secret_dir / "rendered" if scratch else settings.builds_dir / image.name
        out_dir.mkdir(parents=True, exist_ok=True)
        files: list[Path] = []
        for rel, text in public.items():
            path = out_dir / rel
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                write_file(path, text)
            files.append(path)
        fingerprint, inputs = compute_fingerprint(settings, image, files, out_dir)
    except BaseException:
        shutil.rmtree(secret_dir, ignore_errors=True)
        raise
    return RenderResult(
        image=image, out_dir=out_dir, files=files, hcl=out_dir / f"{image.name}.pkr.hcl",
        kickstart=out_dir / installer.file_name if installer is not None else None,
        var_file=var_file, fingerprint=fingerprint, secret_dir=secret_dir, inputs=inputs, packer_version=pv,
    )


def _context(settings: Settings, image: Image, pv: tuple[int, int, int]) -> tuple[Installer | None, dict]:
    """The iso mode's installer (None in cloud mode) and the templates' variables, every value checked."""
    playbook = settings.resolve(image.playbook)
    if not playbook.is_file():
        raise RenderError(f"{settings.images}: {image.name}: playbook: {playbook} does not exist")
    installer = families.get(image.family).installer if image.mode == "iso" else None
    if image.mode == "iso" and installer is None:
        raise RenderError(f"{settings.images}: {image.name}: mode: iso mode needs an installer, and the "
                          f"{image.family} family has none (cloud mode only)")
    # A checksum file Packer would fetch unverified (http, ftp, s3::, a local file beside a download) stops here.
    remote_checksum_file(image.source.checksum, source_is_local=image.source.is_local,
                         what=f"{settings.images}: {image.name}: source.checksum")
    src = _hcl_string(str(settings.resolve(image.source.url)) if image.source.is_local
                      else located(image, image.source.url), f"{settings.images}: {image.name}: source.url")
    return installer, {
        "image": image,
        "required_plugins": pv >= PLUGIN_PACKER,
        "plugin_versions": PLUGIN_VERSIONS,
        "artifact_name": artifact_name(image),
        "disk_size_mb": f"{disk_size_mb(image.disk_size)}M",
        "source_url": src,
        "source_checksum": _hcl_string(_source_checksum_hcl(settings, image),
                                       f"{settings.images}: {image.name}: source.checksum"),
        "build_user": BUILD_USER,
        "build_mac": BUILD_MAC,
        "boot_command": [_hcl_string(line, "boot_command") for line in (installer.boot_command if installer else ())],
        "ssh_timeout": SSH_TIMEOUT[image.mode],
        "shutdown_command": SHUTDOWN_COMMAND,
        "playbook": _hcl_string(str(playbook), "playbook"),
        "ansible_cfg": _hcl_string(str(settings.data / ANSIBLE_DIR / "ansible.cfg"), "ansible.cfg"),
        "roles_path": _hcl_string(str(settings.data / ANSIBLE_DIR / "roles"), "roles"),
    }


def _write_secrets(settings: Settings, image: Image, installer: Installer | None, env: jinja2.Environment,
                   ctx: dict, public: dict[str, str], secret_dir: Path, pv: tuple[int, int, int]) -> Path:
    """The per-build files (0600, in the secret directory): the build user's key, its kickstart include or
    NoCloud seed, the playbook's variables and Packer's var file, which is returned."""
    key, pub = _keypair(secret_dir)
    sctx = {**ctx, "ssh_public_key": pub}
    if installer is not None:
        sctx["password_hash"] = sha512_crypt(secrets.token_urlsafe(24))
        write_file(secret_dir / "http" / installer.build_user_file,
                   _render(env, installer.build_user_template, sctx), 0o600)
        write_file(secret_dir / "http" / installer.file_name, public[installer.file_name], 0o600)
    else:
        write_file(secret_dir / "seed" / "meta-data", public["seed/meta-data"], 0o600)
        write_file(secret_dir / "seed" / "network-config", public["seed/network-config"], 0o600)
        write_file(secret_dir / "seed" / "user-data", _render(env, "cloud-init/user-data.j2", sctx), 0o600)
        if image.firmware == "uefi" and pv < PLUGIN_PACKER:
            seed_iso(secret_dir / "seed", secret_dir / SEED_ISO)
    variables = build_vars(settings, image)
    if image.factory:  # filled by the build (bundle.factory_bundle) before Packer starts
        variables["factory_bundle"] = str(secret_dir / FACTORY_BUNDLE_DIR)
    write_file(secret_dir / BUILD_VARS_FILE, json.dumps(variables, indent=2) + "\n", 0o600)
    per_build: list[tuple[str, object]] = [
        ("accelerator", "tcg"),
        ("work_dir", secret_dir / "work"),
        ("secret_dir", secret_dir),
        ("ssh_private_key_file", key),
    ]
    if image.firmware == "uefi":  # set by the build (firmware.locate_ovmf, packerrun.install_iso_path)
        per_build += [("ovmf_code", ""), ("ovmf_vars", "")]
        if image.tpm and pv < PLUGIN_PACKER:
            per_build.append(("tpm_socket", ""))
        if pv < PLUGIN_PACKER and not image.source.is_local and image.mode == "iso":
            per_build.append(("install_iso", ""))
    var_file = secret_dir / "build.pkrvars.hcl"
    write_file(var_file, "".join(f'{k} = "{_hcl_string(str(v), k)}"\n' for k, v in per_build), 0o600)
    return var_file


def set_var(result: RenderResult, name: str, value: str) -> None:
    """Change one per-build variable (e.g. accelerator, work_dir) in the 0600 var file."""
    lines = result.var_file.read_text(encoding="utf-8").splitlines()
    out = [ln for ln in lines if not ln.startswith(f"{name} = ")]
    out.append(f'{name} = "{_hcl_string(value, name)}"')
    write_file(result.var_file, "\n".join(out) + "\n", 0o600)
