"""Run one image build: render, cache check, validate, ``packer build``, compact, manifest.

Flow of :func:`build_image` (steps 1-5 hold builds/<image>/.lock: a second build of the same image, in any
process, waits for the first and then finds its result, a cache hit when its inputs are the same):

1. render (render.render_image) and compute the input fingerprint;
2. cache: if builds/<image>/manifest.json has the same fingerprint and the artifact still has its
   recorded sha256, stop here: no packer process is started (not even ``packer version``: it is
   cached per packer binary);
3. validate (packer validate/fmt, ksvalidator, ansible-lint), check tools, the source image,
   its checksum and free disk space;
4. ``packer build -machine-readable`` in a temporary directory under builds/<image>/, its own
   process group; the stream is parsed into live progress and a full log (builds/<image>/build.log);
5. ``qemu-img convert`` compacts (optionally compresses) the disk; the artifact and then the
   manifest are moved into place only on success. Ctrl-C or a timeout stops packer and QEMU
   (SIGINT to the group, then SIGTERM, then SIGKILL) and leaves the previous artifact untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from image_factory import families, options
from image_factory.errors import FactoryError
from image_factory.files import write_atomic
from image_factory.image import firmware, qemuvm, render
from image_factory.image.manifest import Artifact, Manifest, has_sha256, load, manifest_path, save, sha256_file
from image_factory.settings import Settings
from image_factory.site.inventory import Image, eol_gate

if TYPE_CHECKING:
    from rich.text import Text

BUILD_TIMEOUT_S = {"cloud": 3600, "iso": 3 * 3600}
LOG_NAME = "build.log"
TAIL_LINES = 25


class BuildError(FactoryError):
    """The build itself failed (packer error, timeout, interrupted, disk full, bad source)."""

    exit_code = 4


class BuildVmPanicked(BuildError):
    """The build VM's kernel died (its console says so): under TCG a QEMU race, not the recipe."""


class BuildSettingError(BuildError):
    """A bad accelerator or Ansible strategy setting: bad input, refused before anything runs."""

    exit_code = 2


@dataclass
class BuildEvent:
    kind: str  # "step" | "message" | "error" | "artifact" | "status"
    message: str
    elapsed: float = 0.0


@dataclass
class BuildOutcome:
    status: Literal["built", "cached", "planned"]
    manifest: Manifest | None
    build_dir: Path
    log: Path | None
    duration_s: float
    reason: str = ""
    fingerprint: str = ""
    artifact: Path | None = None
    events: list[BuildEvent] = field(default_factory=list, repr=False)


EventHandler = Callable[[BuildEvent], None]


# ----------------------------------------------------------------------------------- accelerator


def detect_accelerator() -> Literal["kvm", "tcg"]:
    return qemuvm.detect_accelerator()


ACCELERATORS = ("auto", "kvm", "tcg")


def check_options(settings: Settings, accelerator: str | None, ansible_strategy: str | None) -> None:
    """--accelerator and --ansible-strategy (or their factory.* settings), before anything runs."""
    options.one_of("--accelerator", accelerator or settings.accelerator, ACCELERATORS)
    options.one_of("--ansible-strategy", ansible_strategy or settings.ansible_strategy, ANSIBLE_STRATEGIES)


def resolve_accelerator(settings: Settings, accelerator: str) -> Literal["kvm", "tcg"]:
    choice = accelerator if accelerator and accelerator != "auto" else settings.accelerator
    if choice in ("kvm", "tcg"):
        return choice  # type: ignore[return-value]
    if choice not in ("auto", ""):
        raise BuildSettingError(f"accelerator {choice!r} (--accelerator or factory.accelerator) is not one of "
                                "auto, kvm, tcg")
    return detect_accelerator()


# ------------------------------------------------------------------------------ ansible strategy

ANSIBLE_STRATEGIES = ("auto", "mitogen", "linear")


@dataclass(frozen=True)
class AnsibleStrategy:
    """How Packer's Ansible provisioner runs the baseline: the strategy and the environment it needs."""

    name: Literal["linear", "mitogen_linear"]
    why: str
    env: dict[str, str] = field(default_factory=dict)


def mitogen_strategy_dir() -> Path | None:
    """The strategy plugin directory of the installed mitogen package, or None without it."""
    spec = importlib.util.find_spec("ansible_mitogen")
    if spec is None or not spec.submodule_search_locations:
        return None
    plugins = Path(next(iter(spec.submodule_search_locations))) / "plugins" / "strategy"
    return plugins if (plugins / "mitogen_linear.py").is_file() else None


def resolve_ansible_strategy(choice: str, accelerator: str, family: str = "debian") -> AnsibleStrategy:
    """auto: mitogen under TCG, where every task otherwise starts a fresh Python in the guest (3-7 s
    each), for families where mitogen is proven; stock linear under KVM, where that costs well under a
    second and reliability wins, and for every other family."""
    if choice not in ANSIBLE_STRATEGIES:
        raise BuildSettingError(f"ansible strategy {choice!r} (--ansible-strategy or factory.ansible_strategy) "
                                f"is not one of {', '.join(ANSIBLE_STRATEGIES)}")
    linear_env = {"ANSIBLE_STRATEGY": "linear"}
    if choice == "linear":
        return AnsibleStrategy("linear", "factory.ansible_strategy=linear", linear_env)
    if choice == "auto" and accelerator == "kvm":
        return AnsibleStrategy("linear", "auto: KVM", linear_env)
    if choice == "auto" and not families.get(family).mitogen_proven:
        return AnsibleStrategy("linear", f"auto: mitogen is not proven on {family} guests", linear_env)
    plugins = mitogen_strategy_dir()
    if plugins is None:
        if choice == "mitogen":
            raise BuildError("factory.ansible_strategy=mitogen, but the mitogen package is not installed in "
                             "this environment: pip install mitogen (or set ansible_strategy to auto or linear)")
        return AnsibleStrategy("linear", "auto: TCG, but mitogen is not installed", linear_env)
    why = "factory.ansible_strategy=mitogen" if choice == "mitogen" else "auto: TCG"
    env = {"ANSIBLE_STRATEGY": "mitogen_linear", "ANSIBLE_STRATEGY_PLUGINS": str(plugins)}
    return AnsibleStrategy("mitogen_linear", why, env)


# The newest target Python each ansible-core release supports (ansible-test's constants in its wheel, read
# 2026-11); a core newer than these is not second-guessed. None supports Fedora 45's Python 3.15 yet.
ANSIBLE_CORE_TARGET_PYTHON = {(2, 19): (3, 13), (2, 20): (3, 14), (2, 21): (3, 14)}


def ansible_target_warning(family: str, release: int, core: tuple[int, int] | None = None) -> str:
    """Why this controller's ansible-core may not drive the release's Python, and the way out; "" if it can."""
    want = families.get(family).target_python(release)
    if core is None:
        try:
            from ansible.release import __version__
        except ImportError:
            return ""  # no ansible-core here: the build's own check names that
        core = (int(__version__.split(".")[0]), int(__version__.split(".")[1]))
    if want is None or core > max(ANSIBLE_CORE_TARGET_PYTHON):
        return ""
    newest = ANSIBLE_CORE_TARGET_PYTHON.get(core, (0, 0))
    if want <= newest:
        return ""
    fits = [c for c, py in sorted(ANSIBLE_CORE_TARGET_PYTHON.items()) if py >= want]
    if fits:
        way_out = (f"Use ansible-core {fits[0][0]}.{fits[0][1]}+ (it needs Python 3.12+ on this machine: make the "
                   "venv with a newer Python)")
    else:
        way_out = "No ansible-core release known here supports it yet: watch for one and upgrade"
    return (f"{family} {release} runs Python {want[0]}.{want[1]}, which ansible-core {core[0]}.{core[1]} does not "
            f"support as a target (up to {newest[0]}.{newest[1]}): the build may fail in Ansible. {way_out}")


# ---------------------------------------------------------------------------------------- tools


def _require(tool: str) -> str:
    """On PATH only: packer and QEMU come from the system, and a test's stand-in on PATH must win."""
    path = shutil.which(tool)
    if path is None:
        raise render.tool_missing(tool)
    return path


def cached_packer_version(settings: Settings, *, remember: bool = True) -> tuple[int, int, int]:
    """``packer version``, remembered per packer binary (path, size, mtime) in builds/.packer-version.json."""
    exe = _require("packer")
    st = Path(exe).stat()
    key = f"{os.path.realpath(exe)}:{st.st_size}:{st.st_mtime_ns}"
    cache = settings.builds_dir / ".packer-version.json"
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        if data.get("key") == key:
            v = data["version"]
            return (int(v[0]), int(v[1]), int(v[2]))
    except (FileNotFoundError, ValueError, KeyError, IndexError, TypeError):
        pass
    version = render.packer_version()
    if not remember:
        return version
    with contextlib.suppress(OSError):
        settings.builds_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(cache, json.dumps({"key": key, "version": list(version)}))
    return version


def _version_of(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    m = re.search(r"\d+\.\d+(\.\d+)?", out)
    return m.group(0) if m else "unknown"


def _mitogen_version() -> str:
    try:
        return importlib.metadata.version("mitogen")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _git_state(root: Path) -> dict[str, object]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30).stdout.strip() != ""
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": "", "dirty": True}
    return {"commit": commit, "dirty": dirty}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------- cache


def artifact_path(build_dir: Path, m: Manifest) -> Path:
    return build_dir / m.artifact.path


def build_age_days(m: Manifest, now: datetime | None = None) -> float | None:
    try:
        finished = datetime.strptime(m.finished_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return ((now or datetime.now(UTC)) - finished).total_seconds() / 86400


def cache_status(build_dir: Path, fingerprint: str, *, max_age_days: int | None = None,
                 now: datetime | None = None) -> tuple[Manifest | None, str]:
    """(manifest, "") on a hit; (None, why not) on a miss. ``max_age_days``: older builds miss too."""
    try:
        m = load(build_dir)
    except FactoryError as exc:
        return None, f"manifest unreadable ({exc})"
    if m is None:
        return None, "no previous build"
    if m.fingerprint != fingerprint:
        changed = "inputs changed"
        return None, changed
    art = artifact_path(build_dir, m)
    if not art.is_file():
        return None, f"artifact {art.name} is missing"
    if art.stat().st_size != m.artifact.disk_size or not has_sha256(art, m.artifact.sha256):
        return None, f"artifact {art.name} no longer matches its recorded sha256"
    if max_age_days is not None:
        age = build_age_days(m, now)
        if age is None or age >= max_age_days:
            shown = "of unknown age" if age is None else f"{age:.1f} days old"
            return None, f"build {m.build_id} is {shown} (max_age_days {max_age_days}): rebuilt for current updates"
    return m, ""


UPSTREAM_PREFIX = "upstream:"


def upstream_inputs(settings: Settings, image: Image, *, offline: bool,
                    previous: Manifest | None) -> tuple[dict[str, str], str]:
    """The upstream repositories' epochs as fingerprint inputs, and why some could not be read ("" if all
    were). ``offline`` keeps the previous build's epochs instead of asking (nothing is fetched)."""
    repos = image.upstream_repositories
    if not repos:
        return {}, ""
    if offline:
        kept = {k: v for k, v in (previous.inputs if previous else {}).items() if k.startswith(UPSTREAM_PREFIX)}
        return kept, ""
    from image_factory.image import upstream

    epochs, failures = upstream.repository_epochs(repos, settings.resolve("packer/keys"), image.release,
                                                  resolve=settings.resolve)
    inputs = {UPSTREAM_PREFIX + name: epoch for name, epoch in epochs.items()}
    if not failures:
        return inputs, ""
    # An unknown upstream state never matches a previous build: rebuilding is the side that misses no fix.
    inputs[UPSTREAM_PREFIX + "unavailable"] = _now()
    return inputs, "; ".join(f"{name}: {why}" for name, why in sorted(failures.items()))


def recipe_digest(inputs: dict[str, str]) -> str:
    """The build's own inputs without upstream's state: equal recipes plus equal packages, equal templates."""
    own = {k: v for k, v in inputs.items() if not k.startswith(UPSTREAM_PREFIX)}
    return hashlib.sha256(json.dumps(own, sort_keys=True).encode()).hexdigest()


def with_upstream(result: render.RenderResult, inputs: dict[str, str]) -> None:
    if inputs:
        result.inputs.update(inputs)
        blob = json.dumps({"rendered": result.fingerprint, **inputs}, sort_keys=True).encode()
        result.fingerprint = hashlib.sha256(blob).hexdigest()


def changed_inputs(build_dir: Path, inputs: dict[str, str]) -> list[str]:
    try:
        m = load(build_dir)
    except FactoryError:
        return []
    if m is None:
        return []
    keys = set(inputs) | set(m.inputs)
    return sorted(k for k in keys if inputs.get(k) != m.inputs.get(k))


# -------------------------------------------------------------------------------------- sources


def resolve_unpinned(settings: Settings, image: Image, emit: Callable[[str, str], None], *, offline: bool,
                     previous: Manifest | None) -> tuple[Image, dict[str, str]]:
    """An entry with ``checksum: refresh`` builds from the release's current medium, its sha256 taken from the
    signed CHECKSUM (image.refresh's path): the image as pinned for this build, and what the manifest records.
    ``offline`` keeps the medium the last build resolved. A pinned entry comes back as it is."""
    from image_factory.image import fedora_media

    if image.source.pinned:
        return image, {"url": image.source.url, "checksum": image.source.checksum}
    kept = previous.source if previous is not None and previous.release == image.release else {}
    if offline and not kept.get("sha256"):
        raise BuildError(f"{settings.images}: {image.name}: media not pinned yet (checksum: refresh) and --offline "
                         f"(no earlier build resolved them): run `invoke image.refresh --release {image.release}` "
                         "where fedoraproject.org is reachable, or build without --offline")
    if offline:
        record = dict(kept)
        emit("status", f"offline: building the medium the last build resolved: {record['url']}")
    else:
        resolved = fedora_media.resolve_medium(settings.base_for(fedora_media.KEYS_DIR), image,
                                               releases_url=settings.fedora_releases_url)
        record = resolved.as_record()
        emit("status", f"media resolved at build time: {resolved.url} sha256 {resolved.sha256} (CHECKSUM signed "
                       f"by {resolved.signed_by}); `invoke image.refresh --release {image.release}` pins them in git")
    source = image.source.model_copy(update={"url": record["url"], "checksum": f"sha256:{record['sha256']}"})
    return image.model_copy(update={"source": source}), record


def require_pinned(settings: Settings, image: Image) -> None:
    if not image.source.pinned:
        raise BuildError(f"{settings.images}: {image.name}: media not pinned yet (checksum: refresh): run "
                         f"`invoke image.refresh --release {image.release}` (reads fedoraproject.org), then build")


def verify_source_checksum(settings: Settings, image: Image, result: render.RenderResult,
                           emit: Callable[[str, str], None]) -> None:
    """Media not pinned yet stop the build; a remote CHECKSUM file counts only when the release key signed it,
    and Packer then gets the plain sha256 taken from its signed part."""
    from image_factory.image import fedora_media

    what = f"{settings.images}: {image.name}: source.checksum"
    remote = fedora_media.remote_checksum_file(image.source.checksum, source_is_local=image.source.is_local,
                                               what=what)
    if remote is None:
        return
    if not families.get(image.family).signs_checksums:
        raise BuildError(f"{what}: a remote checksum file is trusted only when signed by a pinned key, and none is "
                         f"pinned for {image.family}; use 'sha256:<hex>'")
    url = fedora_media.located(image, remote)
    file_name = image.source.url.rpartition("/")[2]
    sha = fedora_media.verified_checksum(settings.base_for(fedora_media.KEYS_DIR), image.release, url, file_name)
    render.set_var(result, "source_checksum", sha)
    key = fedora_media.release_key_name(image.release)
    emit("status", f"source verified: {file_name} {sha} (CHECKSUM signed by {key})")


def check_source(settings: Settings, image: Image) -> None:
    """Local sources: present, and matching their checksum file (clear message otherwise)."""
    src, ck_file = render.source_paths(settings, image)
    if src is None:
        return
    hint = families.get(image.family).missing_source_hint
    if not src.is_file():
        raise BuildError(f"{image.name}: source image {src} does not exist: {hint}")
    ck = image.source.checksum
    if ck_file is not None:
        if not ck_file.is_file():
            raise BuildError(f"{image.name}: checksum file {ck_file} does not exist: {hint}")
        fields = ck_file.read_text(encoding="utf-8").split()
        if not fields or not re.fullmatch(r"[0-9a-f]{64}", fields[0]):
            raise BuildError(f"{ck_file}: not in sha256sum format ('<sha256>  <file>')")
        want = fields[0]
    elif ck.startswith("sha256:"):
        want = ck.split(":", 1)[1]
    else:
        return
    got = sha256_file(src)
    if got != want:
        raise BuildError(f"{image.name}: checksum mismatch for {src}: expected sha256 {want}, got {got}; "
                         f"the file is damaged or stale: {hint}")


def check_disk_space(path: Path, need_bytes: int, what: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise BuildError(f"disk full: {path} has {free // 2**20} MiB free, {what} needs about "
                         f"{need_bytes // 2**20} MiB; free some space (old builds/ directories) and retry")


# ---------------------------------------------------------------------------- machine-readable


def parse_machine_readable(line: str) -> tuple[str, str, list[str]] | None:
    """``timestamp,target,type,data...`` -> (target, type, data); commas in data are escaped."""
    parts = line.rstrip("\r\n").split(",")
    if len(parts) < 3 or not parts[0].isdigit():
        return None
    data = [p.replace("%!(PACKER_COMMA)", ",").replace("\\n", "\n").replace("\\r", "\r") for p in parts[3:]]
    return parts[1], parts[2], data


_STEP_RE = re.compile(r"^==> [\w.\-]+: (.*)$")
# Ansible and guest failures worth quoting in the error message (the packer errors alone only say
# "Non-zero exit status").
_NOTABLE_RE = re.compile(r"fatal: |\[ERROR\]|FAILED!|^\s*[\w.\-]+:\s+msg: |UNREACHABLE|No space left")


@dataclass
class _Run:
    log: IO[str]
    started: float
    on_event: EventHandler | None
    events: list[BuildEvent]
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    errors: list[str] = field(default_factory=list)
    notable: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    artifacts: list[str] = field(default_factory=list)

    def emit(self, kind: str, message: str) -> None:
        ev = BuildEvent(kind, message, time.monotonic() - self.started)
        self.events.append(ev)
        if self.on_event is not None:
            self.on_event(ev)

    def feed(self, raw: str) -> None:
        parsed = parse_machine_readable(raw)
        elapsed = time.monotonic() - self.started
        if parsed is None:
            text = raw.rstrip("\n")
            if text:
                self.log.write(f"[{elapsed:7.1f}s] {text}\n")
                self.tail.append(text)
            return
        _target, kind, data = parsed
        if kind == "ui" and len(data) >= 2:
            level, text = data[0], ",".join(data[1:])
            for ln in text.splitlines() or [""]:
                self.log.write(f"[{elapsed:7.1f}s] {ln}\n")
                if ln.strip():
                    self.tail.append(ln)
                if _NOTABLE_RE.search(ln):
                    self.notable.append(re.sub(r"^\s*[\w.\-]+: ", "", ln.strip()))
            m = _STEP_RE.match(text.strip())
            if level == "error":
                self.errors.append(text.strip())
                self.emit("error", text.strip())
            elif m:
                self.emit("step", m.group(1))
            else:
                self.emit("message", text.strip())
        elif kind == "error" and data:
            msg = ",".join(data).strip()
            self.errors.append(msg)
            self.log.write(f"[{elapsed:7.1f}s] ERROR: {msg}\n")
            self.emit("error", msg)
        elif kind == "artifact" and len(data) >= 4 and data[1] == "file":
            # <target>,artifact,<n>,file,<i>,<path>
            self.artifacts.append(data[3])
            self.log.write(f"[{elapsed:7.1f}s] artifact file: {data[3]}\n")
            self.emit("artifact", data[3])
        self.log.flush()


def _stop_group(proc: subprocess.Popen[str], log: IO[str]) -> None:
    """SIGINT (packer cleans up its VM), then SIGTERM, then SIGKILL, to the whole process group."""
    for sig, wait in ((signal.SIGINT, 60), (signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        if proc.poll() is not None:
            break
        log.write(f"stopping packer: sending {sig.name} to its process group\n")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    # QEMU may outlive packer for a moment: make sure nothing of the group is left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def packer_cache_dir(cwd: Path) -> Path:
    """Where Packer keeps downloads across builds: $PACKER_CACHE_DIR, else builds/.packer_cache."""
    return Path(os.environ.get("PACKER_CACHE_DIR") or cwd.parent / ".packer_cache")


def install_iso_path(cwd: Path, image: Image) -> Path:
    """The install ISO's place in Packer's cache when the template must name it (UEFI on Packer 1.6); Packer
    downloads it again only when its checksum no longer matches."""
    return packer_cache_dir(cwd) / f"{image.name}-install.iso"


def run_packer(cmd: list[str], *, cwd: Path, log_path: Path, timeout_s: float,
               on_event: EventHandler | None, events: list[BuildEvent], t0: float | None = None,
               extra_env: dict[str, str] | None = None, serial_log: Path | None = None) -> _Run:
    """Run packer in its own process group; return the parsed run. Raises BuildError on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", encoding="utf-8") as log:
        run = _Run(log=log, started=t0 if t0 is not None else time.monotonic(), on_event=on_event, events=events)
        log.write(f"# {_now()} packer build in {cwd}\n")
        # Packer hands its own environment on to ansible-playbook: the strategy travels that way.
        env = {**render.tool_env(), **(extra_env or {})}
        env.setdefault("PACKER_CACHE_DIR", str(packer_cache_dir(cwd)))
        for key in sorted(extra_env or {}):
            log.write(f"# {key}={env[key]}\n")
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
        )
        timed_out = threading.Event()

        def _on_timeout() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)

        timer = threading.Timer(timeout_s, _on_timeout)
        timer.daemon = True
        timer.start()
        panicked = threading.Event()
        done = threading.Event()

        def _watch_console() -> None:
            # A dead guest kernel never answers: stop at once rather than after Packer's SSH timeout.
            while serial_log is not None and not done.wait(2.0):
                if qemuvm.console_panicked(serial_log):
                    panicked.set()
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGINT)
                    return

        threading.Thread(target=_watch_console, daemon=True).start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                run.feed(line)
            proc.wait()
        except BaseException:
            timer.cancel()
            _stop_group(proc, log)
            log.write(f"# {_now()} interrupted\n")
            raise
        finally:
            timer.cancel()
            done.set()
        if panicked.is_set():
            _stop_group(proc, log)
            log.write(f"# {_now()} the build VM's kernel panicked\n")
            tail = "\n".join(f"  {ln}" for ln in serial_log.read_text(errors="replace").splitlines()[-8:]) \
                if serial_log else ""
            raise BuildVmPanicked(f"the build VM's kernel panicked, so the build was stopped (under TCG, a QEMU race "
                             f"in code patching: re-run the build). Its console ended:\n{tail}\nfull log: {log_path}")
        if timed_out.is_set():
            _stop_group(proc, log)
            log.write(f"# {_now()} timed out after {timeout_s:.0f} s\n")
            raise BuildError(f"build timeout: packer ran longer than {timeout_s:.0f} s and was stopped; "
                             f"full log: {log_path}")
        log.write(f"# {_now()} packer exited with {proc.returncode}\n")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stray QEMU, if any
    if proc.returncode != 0:
        raise BuildError(_failure_message(run, proc.returncode, log_path))
    return run


def run_packer_once_more_on_tcg_panic(cmd: list[str], *, accel: str, work: Path, emit: Callable[[str, str], None],
                                      log_path: Path, **kwargs: Any) -> _Run:
    """run_packer with the build VM's console in ``work``; a kernel panic under TCG is run once more.

    Under TCG a guest kernel can die in its own code patching (an int3 another vCPU met mid-patch: a race in
    QEMU's multi-threaded TCG, not the recipe), as image tests see too. A panic under KVM, a second panic or
    any other failure is the build's result. The panicked attempt's log and console are kept beside the build's.
    """
    serial_log = work / "serial.log"
    if accel == "tcg":
        try:
            return run_packer(cmd, log_path=log_path, serial_log=serial_log, **kwargs)
        except BuildVmPanicked as exc:
            kept_log = log_path.with_name(f"{log_path.stem}.panicked{log_path.suffix}")
            log_path.replace(kept_log)
            with contextlib.suppress(FileNotFoundError):
                serial_log.replace(log_path.with_name("serial.panicked.log"))
            shutil.rmtree(work / "output", ignore_errors=True)  # packer refuses an existing output directory
            emit("status", f"warning: {str(exc).splitlines()[0]}; building once more (that attempt's log: {kept_log})")
    return run_packer(cmd, log_path=log_path, serial_log=serial_log, **kwargs)


def _failure_message(run: _Run, rc: int, log_path: Path) -> str:
    text = "\n".join([*run.errors, *run.tail])
    lower = text.lower()
    if "no space left on device" in lower:
        head = "disk full while building (no space left on device)"
    elif "checksum" in lower and ("mismatch" in lower or "didn't match" in lower or "does not match" in lower):
        head = "source checksum mismatch (packer verified the download)"
    elif "timeout waiting for ssh" in lower:
        head = "the guest never became reachable over SSH"
    else:
        head = f"packer build failed (exit {rc})"
    lines = [*list(run.notable)[-8:], *run.errors[-6:]] or list(run.tail)[-12:]
    body = "\n".join(f"  {ln}" for ln in lines)
    return f"{head}:\n{body}\nfull log: {log_path}"


# ----------------------------------------------------------------------------------------- compact


def qemu_img_info(path: Path) -> dict:
    exe = _require("qemu-img")
    proc = subprocess.run([exe, "info", "--output=json", str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise BuildError(f"qemu-img info {path} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


# zstd, not qcow2's default zlib: the same size, made 4.4x faster and imported faster (docs/performance.md,
# "Compression"); readable by qemu-img 5.1 and later (every PVE since 7.0).
COMPRESSION = "zstd"


def compact(src: Path, dst: Path, *, compress: bool) -> None:
    exe = _require("qemu-img")
    cmd = [exe, "convert", "-O", "qcow2", "-W", "-m", "4"]
    if compress:
        cmd += ["-c", "-o", f"compression_type={COMPRESSION}"]
    proc = subprocess.run([*cmd, str(src), str(dst)], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        msg = proc.stderr.strip()
        if "No space left" in msg:
            raise BuildError(f"disk full while compacting into {dst}: {msg}")
        raise BuildError(f"qemu-img convert failed: {msg}")


# ------------------------------------------------------------------------------------------- build


# The platform tags of Debian 13's glibc (2.41) and older that wheels are published for: pip download matches
# --platform exactly, it does not expand a manylinux tag to the older ones.
GUEST_WHEEL_PLATFORMS = ("manylinux1", "manylinux2010", "manylinux2014",
                         *(f"manylinux_2_{minor}" for minor in (17, 24, 27, 28, 31, 34, 35, 36, 38, 39, 40, 41)))


def guest_wheelhouse(settings: Settings, image: Image, dest: Path) -> None:
    """Every file of the hashed lock for the image's Python, downloaded here (pip checks each hash): the build VM
    installs from it with --no-index. It cannot reach PyPI itself wherever TLS is inspected on the way out (a CA
    this machine trusts, the guest does not), and installing from local files is the cheaper half under TCG
    anyway. The files are cached per lock and Python in the factory's cache directory."""
    python = families.get(image.family).target_python(image.release)
    if python is None:
        raise BuildError(f"{image.name}: factory: true needs the image's Python version, and the {image.family} "
                         f"family does not know release {image.release}'s")
    lock = guest_lock(settings.root / render.FACTORY_LOCK, python, dest.parent / "guest-requirements.txt")
    tag = f"{python[0]}{python[1]}"
    cache = settings.cache_dir / "wheelhouse" / f"{hashlib.sha256(lock.read_bytes()).hexdigest()[:16]}-cp{tag}"
    try:
        _download_wheelhouse(lock, python, cache)
    finally:
        lock.unlink(missing_ok=True)
    with tarfile.open(dest, "w") as tar:  # one file, one transfer (the files are compressed already)
        for path in sorted(cache.iterdir()):
            tar.add(path, arcname=path.name)


def guest_lock(lock: Path, python: tuple[int, int], out: Path) -> Path:
    """The lock's entries whose environment markers hold on the guest (Linux x86_64, CPython ``python``), the
    markers dropped: pip download evaluates them against this machine's Python, whatever --python-version says
    (it took ansible-core 2.19 for a 3.13 guest whose lock entry is 2.21)."""
    from packaging.markers import Marker

    guest = {"python_version": f"{python[0]}.{python[1]}", "python_full_version": f"{python[0]}.{python[1]}.0",
             "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
             "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    kept: list[str] = []
    for entry in re.split(r"\n(?=[^\s#])", lock.read_text(encoding="utf-8")):
        head, _, rest = entry.partition("\n")
        requirement, _, marker = head.partition(";")
        if entry.startswith("#") or not requirement.strip():
            continue
        if marker.strip() and not Marker(marker.strip().rstrip("\\").strip()).evaluate(guest):
            continue
        kept.append(f"{requirement.strip()} \\\n{rest}" if marker.strip() else entry)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return out


def _download_wheelhouse(lock: Path, python: tuple[int, int], cache: Path) -> None:
    tag = f"{python[0]}{python[1]}"
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps", "--prefer-binary",
           "--require-hashes", "--python-version", f"{python[0]}.{python[1]}", "--implementation", "cp",
           "--abi", f"cp{tag}", "--abi", "abi3", "--abi", "none",
           *(arg for platform in GUEST_WHEEL_PLATFORMS for arg in ("--platform", f"{platform}_x86_64")),
           "-r", str(lock), "-d", str(cache)]  # fmt: skip
    try:
        done = subprocess.run(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True,
                              timeout=1200)
    except subprocess.TimeoutExpired:
        raise BuildError("downloading the factory's locked dependencies timed out after 1200 s") from None
    if done.returncode != 0:
        raise BuildError(f"downloading the factory's locked dependencies ({lock}) failed: "
                         f"{(done.stderr or done.stdout).strip()[-1500:]}")


def factory_bundle(settings: Settings, image: Image, bundle: Path, work: Path) -> None:
    """The factory's wheel (built from a copy of its sources, so the checkout gets no build/ or egg-info), its
    hashed lock and the lock's files for the image's Python (wheelhouse.tar), for a playbook that installs the
    factory (catalogue: factory: true)."""
    sources = work / "factory-src"
    for path in render.factory_sources(settings):
        target = sources / path.relative_to(settings.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    bundle.mkdir(mode=0o700, parents=True, exist_ok=True)
    quiet = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
           "-w", str(bundle), str(sources)]  # fmt: skip
    try:
        done = subprocess.run(cmd, env=quiet, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise BuildError("building the factory's wheel timed out after 600 s") from None
    if done.returncode != 0:
        raise BuildError(f"building the factory's wheel failed: {(done.stderr or done.stdout).strip()[-1500:]}")
    wheels = sorted(bundle.glob("deevnet_image_factory-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"building the factory's wheel left {len(wheels)} wheels in {bundle}")
    shutil.copy2(settings.root / render.FACTORY_LOCK, bundle / "requirements.txt")
    shutil.rmtree(sources, ignore_errors=True)
    guest_wheelhouse(settings, image, bundle / "wheelhouse.tar")


@contextlib.contextmanager
def _image_lock(build_dir: Path, emit: Callable[[str, str], None]) -> Iterator[None]:
    """Held from the render into builds/<image>/ to the new manifest: another process's render, cache check or
    build of the image in between would overwrite the rendered files under a running packer, or read a
    manifest being replaced. A second build waits its turn (the first is bounded by its own timeout)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with (build_dir / ".lock").open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            emit("status", f"waiting for another build of {build_dir.name} to finish (lock {build_dir / '.lock'})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def build_image(
    settings: Settings,
    image: Image,
    *,
    force: bool = False,
    dry_run: bool = False,
    accelerator: str = "auto",
    on_event: EventHandler | None = None,
    compress: bool | None = None,
    timeout_s: float | None = None,
    ansible_strategy: str | None = None,
    allow_eol: bool = False,
    offline: bool = False,
) -> BuildOutcome:
    """Build one catalogue image (or find it cached); see the module docstring for the flow.

    ``offline``: do not ask upstream repositories for their state; keep the last build's epochs."""
    t0 = time.monotonic()
    events: list[BuildEvent] = []

    def emit(kind: str, msg: str) -> None:
        ev = BuildEvent(kind, msg, time.monotonic() - t0)
        events.append(ev)
        if on_event is not None:
            on_event(ev)

    build_dir = settings.builds_dir / image.name
    for warning in eol_gate([image], settings.images, allow_eol=allow_eol):
        emit("status", f"warning: {warning}")
    # A dry run renders into a scratch directory and writes nothing under builds/: it need not wait.
    with contextlib.nullcontext() if dry_run else _image_lock(build_dir, emit):
        return _find_or_build(settings, image, build_dir, emit, events, t0, force=force, dry_run=dry_run,
                              accelerator=accelerator, on_event=on_event, compress=compress, timeout_s=timeout_s,
                              ansible_strategy=ansible_strategy, offline=offline)


def _find_or_build(
    settings: Settings, image: Image, build_dir: Path, emit: Callable[[str, str], None], events: list[BuildEvent],
    t0: float, *, force: bool, dry_run: bool, accelerator: str, on_event: EventHandler | None,
    compress: bool | None, timeout_s: float | None, ansible_strategy: str | None, offline: bool,
) -> BuildOutcome:
    try:
        previous = load(build_dir)
    except FactoryError:
        previous = None
    image, source = resolve_unpinned(settings, image, emit, offline=offline, previous=previous)
    result = render.render_image(settings, image, packer_version=cached_packer_version(settings, remember=not dry_run),
                                 scratch=dry_run)
    try:
        epochs, unavailable = upstream_inputs(settings, image, offline=offline, previous=previous)
        with_upstream(result, epochs)
        if unavailable:
            emit("status", f"warning: upstream state unknown ({unavailable}): rebuilding so no update is missed")
        if not force:
            hit, why = cache_status(build_dir, result.fingerprint,
                                    max_age_days=image.max_age_days if image.updates else None)
            if hit is not None:
                emit("status", f"cache hit: {image.name} is up to date (build {hit.build_id})")
                return BuildOutcome("cached", hit, build_dir, None, time.monotonic() - t0, "inputs unchanged",
                                    result.fingerprint, artifact_path(build_dir, hit), events)
            changed = changed_inputs(build_dir, result.inputs)
            reason = why + (f": {', '.join(changed[:6])}" if changed and why == "inputs changed" else "")
            if unavailable:
                reason = f"upstream state unknown ({unavailable})"
        else:
            reason = "--force"
        emit("status", f"build needed: {reason}")

        emit("step", "validating rendered files")
        render.validate(result, settings)
        _require("qemu-system-x86_64")
        render.require_tool("ansible-playbook")  # Packer's Ansible provisioner would stop half-way without it
        _require("qemu-img")
        check_source(settings, image)
        accel = resolve_accelerator(settings, accelerator)
        strategy = resolve_ansible_strategy(ansible_strategy or settings.ansible_strategy, accel, image.family)
        if compress is None:
            compress = image.compress
        require_pinned(settings, image)
        if dry_run:
            emit("status", f"dry run: would run packer build for {image.name} ({image.mode} mode, {accel}, "
                           f"Ansible {strategy.name})")
            return BuildOutcome("planned", None, build_dir, None, time.monotonic() - t0, reason,
                                result.fingerprint, None, events)
        verify_source_checksum(settings, image, result, emit)
        return _build(settings, image, result, build_dir, accel, strategy, emit, events, compress,
                      timeout_s or BUILD_TIMEOUT_S[image.mode], reason, t0, on_event, source)
    finally:
        result.cleanup()


def _build(
    settings: Settings, image: Image, result: render.RenderResult, build_dir: Path, accel: str,
    strategy: AnsibleStrategy, emit: Callable[[str, str], None], events: list[BuildEvent], compress: bool,
    timeout_s: float, reason: str, t0: float, on_event: EventHandler | None, source: dict[str, str],
) -> BuildOutcome:
    size_mb = render.disk_size_mb(image.disk_size)
    check_disk_space(build_dir, size_mb * 2**20 * 2, f"building {image.name} ({image.disk_size} disk, twice)")
    started_at = _now()
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=build_dir))
    log_path = build_dir / LOG_NAME
    enrolled: list[dict[str, str]] = []
    vm_services = contextlib.ExitStack()
    try:
        render.set_var(result, "work_dir", str(work))
        render.set_var(result, "accelerator", accel)
        if image.firmware == "uefi":
            boot = firmware.prepare(work, machine=image.machine_type, secure_boot=image.secure_boot,
                                    keys=image.keys, family=image.family)
            render.set_var(result, "ovmf_code", str(boot.code))
            render.set_var(result, "ovmf_vars", str(boot.variables))
            enrolled = list(boot.enrolled)
            if image.secure_boot:
                emit("status", f"Secure Boot: OVMF {boot.code.name} with key set {image.keys}: "
                               + ("; ".join(f"{e['variable']} {e['subject']} sha256:{e['sha256'][:16]}… until "
                                            f"{e['not_after']}" for e in enrolled) or "setup mode, no keys"))
            old_packer = cached_packer_version(settings) < render.PLUGIN_PACKER
            if old_packer and not image.source.is_local and image.mode == "iso":
                render.set_var(result, "install_iso", str(install_iso_path(result.out_dir, image)))
            if image.tpm and old_packer:  # newer Packer: the qemu plugin's own vtpm option runs swtpm
                # a unix socket path must stay under 108 bytes: a short private directory, not the work dir
                tpm = vm_services.enter_context(firmware.swtpm(Path(tempfile.mkdtemp(prefix="swtpm-"))))
                render.set_var(result, "tpm_socket", str(tpm.socket))
        if image.factory:
            emit("step", "building the factory's wheel and fetching its locked dependencies for the image")
            factory_bundle(settings, image, result.var_file.parent / render.FACTORY_BUNDLE_DIR, work)
        exe = _require("packer")  # its plugins: installed by render.validate (packer init)
        cmd = [exe, "build", "-machine-readable", "-color=false", f"-var-file={result.var_file}", result.hcl.name]
        emit("step", f"packer build ({image.mode} mode, accelerator {accel}, Ansible {strategy.name}: {strategy.why})")
        if warning := ansible_target_warning(image.family, image.release):
            emit("status", f"warning: {warning}")
        try:
            run = run_packer_once_more_on_tcg_panic(
                cmd, accel=accel, work=work, emit=emit, cwd=result.out_dir, log_path=log_path,
                timeout_s=timeout_s, on_event=on_event, events=events, t0=t0, extra_env=strategy.env)
        except BuildError as exc:
            if strategy.name == "mitogen_linear" and "executing ansible" in str(exc).lower():
                raise BuildError(f"{exc}\nAnsible ran under mitogen (factory.ansible_strategy); to rule mitogen "
                                 "out, rebuild with --ansible-strategy linear") from None
            raise
        name = render.artifact_name(image)
        raw = work / "output" / name
        if not raw.is_file():
            found = ", ".join(run.artifacts) or "none"
            raise BuildError(f"packer reported success but {raw} does not exist (artifacts: {found}); "
                             f"full log: {log_path}")
        emit("step", "compacting the disk with qemu-img convert" + (" -c" if compress else ""))
        compacted = work / name
        compact(raw, compacted, compress=compress)
        shutil.rmtree(work / "output", ignore_errors=True)
        info = qemu_img_info(compacted)
        emit("step", "hashing the artifact")
        digest = sha256_file(compacted)
        manifest = Manifest(
            image=image.name, family=image.family, release=image.release, mode=image.mode,
            build_id=digest[:12],
            artifact=Artifact(path=name, format="qcow2", virtual_size=int(info["virtual-size"]),
                              disk_size=compacted.stat().st_size, sha256=digest),
            fingerprint=result.fingerprint, inputs=dict(result.inputs),
            tools={
                "packer": ".".join(map(str, cached_packer_version(settings))),
                "qemu": _version_of(["qemu-system-x86_64", "--version"]),
                "qemu-img": _version_of(["qemu-img", "--version"]),
                "ansible": _version_of([str(render._venv_bin() / "ansible-playbook"), "--version"]),
                **({"mitogen": _mitogen_version()} if strategy.name == "mitogen_linear" else {}),
            },
            git=_git_state(settings.root), started_at=started_at, finished_at=_now(), accelerator=accel,
            ansible_strategy=strategy.name, firmware=image.firmware, recipe=recipe_digest(result.inputs),
            source=source, secure_boot=image.secure_boot, secure_boot_keys=image.keys, tpm=image.tpm,
            machine=image.machine_type, secure_boot_enrolled=enrolled,
        )
        # Publish: old manifest out first, so no manifest ever points at a half-replaced artifact.
        manifest_path(build_dir).unlink(missing_ok=True)
        os.replace(compacted, build_dir / name)
        with contextlib.suppress(FileNotFoundError):
            (work / "serial.log").replace(build_dir / "serial.log")
        (build_dir / "serial.failed.log").unlink(missing_ok=True)
        save(build_dir, manifest)
        emit("artifact", str(build_dir / name))
        return BuildOutcome("built", manifest, build_dir, log_path, time.monotonic() - t0, reason,
                            result.fingerprint, build_dir / name, events)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            (work / "serial.log").replace(build_dir / "serial.failed.log")
        raise
    finally:
        vm_services.close()
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------ ui


_ANSIBLE_HEADING_RE = re.compile(r"\b(PLAY|TASK|RUNNING HANDLER) \[(.+?)\]")


class LogLines:
    """on_event handler where there is no terminal: each build step, each Ansible task and every error as
    one timestamped line, so a CI log follows a build that takes minutes."""

    def __init__(self, image: str) -> None:
        self.image = image

    def __enter__(self) -> LogLines:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __call__(self, ev: BuildEvent) -> None:
        from image_factory.console import log_line

        if ev.kind in ("step", "status", "error", "artifact"):
            log_line(self.image, ("error: " if ev.kind == "error" else "") + ev.message)
        elif ev.kind == "message":
            found = _ANSIBLE_HEADING_RE.search(ev.message)
            if found:
                log_line(self.image, f"ansible {found[1].lower()}: {found[2]}")


def progress_for(image: str) -> LiveProgress | LogLines:
    """Live progress in a terminal, timestamped lines in a log."""
    from image_factory.console import console

    return LiveProgress(image) if console.is_terminal else LogLines(image)


class LiveProgress:
    """on_event handler: one rich status line (current step + elapsed) and every step printed."""

    def __init__(self, image: str, console: object | None = None) -> None:
        from rich.console import Console

        from image_factory.console import console as default_console

        self.console: Console = console if isinstance(console, Console) else default_console
        self.image = image
        self.step = "starting"
        self.t0 = time.monotonic()
        self.status = self.console.status(self._text())
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)

    def _text(self) -> Text:
        from image_factory.console import styled

        return styled("[bold]{}[/]: {} [dim]({}s)[/]", self.image, self.step, f"{time.monotonic() - self.t0:.0f}")

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self.status.update(self._text())

    def __enter__(self) -> LiveProgress:
        self.status.__enter__()
        self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.status.__exit__(None, None, None)

    def __call__(self, ev: BuildEvent) -> None:
        from image_factory.console import styled

        if ev.kind == "step":
            self.step = ev.message
            self.console.print(styled("[dim]{}s[/] {}", f"{ev.elapsed:6.0f}", ev.message))
        elif ev.kind == "error":
            self.console.print(styled("[dim]{}s[/] [red]{}[/]", f"{ev.elapsed:6.0f}", ev.message))
        elif ev.kind == "status":
            self.console.print(styled("[cyan]{}[/]", ev.message))
        self.status.update(self._text())
