"""Run one image build: render, cache check, validate, ``packer build``, compact, manifest.

Flow of :func:`build_image` (steps 1-5 hold builds/<image>/.lock: a second build of the same image, in any
process, waits for the first and then finds its result, a cache hit when its inputs are the same):

1. render (render.render_image) and compute the input fingerprint;
2. cache (buildcache): if builds/<image>/manifest.json has the same fingerprint and the artifact still has
   its recorded sha256, stop here: no packer process is started (not even ``packer version``: it is
   cached per packer binary);
3. validate (packer validate/fmt, ksvalidator, ansible-lint), check tools, the source image (sources),
   its checksum and free disk space;
4. ``packer build -machine-readable`` (packerrun) in a temporary directory under builds/<image>/, its own
   process group; the stream is parsed into live progress and a full log (builds/<image>/build.log);
5. ``qemu-img convert`` compacts (optionally compresses) the disk; the artifact and then the
   manifest (manifest.assemble) are moved into place only on success. Ctrl-C or a timeout stops packer and
   QEMU (SIGINT to the group, then SIGTERM, then SIGKILL) and leaves the previous artifact untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from image_factory.errors import FactoryError
from image_factory.image import bundle, firmware, manifest, packerrun, provenance, render, rendercheck
from image_factory.image.buildcache import (
    cache_status,
    changed_inputs,
    image_lock,
    recipe_digest,
    upstream_inputs,
    with_upstream,
)
from image_factory.image.builddir import EFI_VARS_NAME, BuildDir
from image_factory.image.buildevents import BuildError, BuildEvent, EventHandler, EventSink
from image_factory.image.manifest import Artifact, Manifest, sha256_file
from image_factory.image.sources import (
    check_disk_space,
    check_source,
    require_pinned,
    resolve_unpinned,
    verify_source_checksum,
)
from image_factory.image.strategy import (
    AnsibleStrategy,
    ansible_target_warning,
    resolve_accelerator,
    resolve_ansible_strategy,
)
from image_factory.settings import Settings
from image_factory.site.inventory import Image, eol_gate

BUILD_TIMEOUT_S = {"cloud": 3600, "iso": 3 * 3600}


@dataclass(frozen=True)
class BuildOptions:
    """How to build (the build.* tasks' flags): every field's default is the catalogue's or the settings'."""

    force: bool = False  # rebuild on a cache hit
    dry_run: bool = False  # render, validate and check; start no VM, write nothing under builds/
    accelerator: str = "auto"
    compress: bool | None = None  # None: the catalogue entry's
    timeout_s: float | None = None  # None: BUILD_TIMEOUT_S of the image's mode
    ansible_strategy: str | None = None  # None: factory.ansible_strategy
    allow_eol: bool = False
    offline: bool = False  # ask no upstream repository for its state; keep the last build's epochs


@dataclass
class BuildOutcome:
    status: Literal["built", "cached", "planned"]
    manifest: Manifest | None
    dir: BuildDir
    log: Path | None
    duration_s: float
    reason: str = ""
    fingerprint: str = ""
    artifact: Path | None = None
    events: list[BuildEvent] = field(default_factory=list, repr=False)

    @property
    def build_dir(self) -> Path:
        return self.dir.path


@dataclass(frozen=True)
class _Plan:
    """What the checks decided for a build that will run."""

    dir: BuildDir
    accel: str
    strategy: AnsibleStrategy
    compress: bool
    timeout_s: float
    reason: str
    source: dict[str, str]


def build_image(settings: Settings, image: Image, options: BuildOptions | None = None, *,
                on_event: EventHandler | None = None, **choices: Any) -> BuildOutcome:
    """Build one catalogue image (or find it cached); see the module docstring for the flow.

    ``options``, or its fields as keywords (``force=True``); ``on_event`` sees each event as it happens."""
    if options is not None and choices:
        raise TypeError("build_image takes options or their fields as keywords, not both")
    opts = options or BuildOptions(**choices)
    sink = EventSink(on_event)
    build_dir = BuildDir.of(settings, image.name)
    for warning in eol_gate([image], settings.images, allow_eol=opts.allow_eol):
        sink.emit("status", f"warning: {warning}")
    # A dry run renders into a scratch directory and writes nothing under builds/: it need not wait.
    with contextlib.nullcontext() if opts.dry_run else image_lock(build_dir, sink):
        return _find_or_build(settings, image, build_dir, opts, sink)


def _find_or_build(settings: Settings, image: Image, build_dir: BuildDir, opts: BuildOptions,
                   sink: EventSink) -> BuildOutcome:
    try:
        previous = build_dir.load()
    except FactoryError:
        previous = None
    image, source = resolve_unpinned(settings, image, sink.emit, offline=opts.offline, previous=previous)
    version = packerrun.cached_packer_version(settings, remember=not opts.dry_run)
    result = render.render_image(settings, image, packer_version=version, scratch=opts.dry_run)
    try:
        epochs, unavailable = upstream_inputs(settings, image, offline=opts.offline, previous=previous)
        with_upstream(result, epochs)
        if unavailable:
            sink.emit("status", f"warning: upstream state unknown ({unavailable}): rebuilding so no update is missed")
        if opts.force:
            reason = "--force"
        else:
            hit = _cache_hit(image, build_dir, result, sink)
            if isinstance(hit, BuildOutcome):
                return hit
            reason = f"upstream state unknown ({unavailable})" if unavailable else hit
        sink.emit("status", f"build needed: {reason}")
        plan = _check(settings, image, result, build_dir, opts, reason, source, sink)
        if opts.dry_run:
            sink.emit("status", f"dry run: would run packer build for {image.name} ({image.mode} mode, "
                                f"{plan.accel}, Ansible {plan.strategy.name})")
            return BuildOutcome("planned", None, build_dir, None, sink.elapsed(), reason, result.fingerprint, None,
                                sink.events)
        verify_source_checksum(settings, image, result, sink.emit)
        return _build(settings, image, result, plan, sink)
    finally:
        result.cleanup()


def _cache_hit(image: Image, build_dir: BuildDir, result: render.RenderResult, sink: EventSink) -> BuildOutcome | str:
    """The cached outcome, or why the build is needed."""
    hit, why = cache_status(build_dir.path, result.fingerprint,
                            max_age_days=image.max_age_days if image.updates else None)
    if hit is not None:
        sink.emit("status", f"cache hit: {image.name} is up to date (build {hit.build_id})")
        return BuildOutcome("cached", hit, build_dir, None, sink.elapsed(), "inputs unchanged", result.fingerprint,
                            build_dir.artifact(hit), sink.events)
    changed = changed_inputs(build_dir.path, result.inputs)
    return why + (f": {', '.join(changed[:6])}" if changed and why == "inputs changed" else "")


def _check(settings: Settings, image: Image, result: render.RenderResult, build_dir: BuildDir, opts: BuildOptions,
           reason: str, source: dict[str, str], sink: EventSink) -> _Plan:
    """Everything a build needs, checked before it starts: valid rendered files, the tools, the source."""
    sink.emit("step", "validating rendered files")
    rendercheck.validate(result, settings)
    packerrun.require("qemu-system-x86_64")
    render.require_tool("ansible-playbook")  # Packer's Ansible provisioner would stop half-way without it
    packerrun.require("qemu-img")
    check_source(settings, image)
    accel = resolve_accelerator(settings, opts.accelerator)
    strategy = resolve_ansible_strategy(opts.ansible_strategy or settings.ansible_strategy, accel, image.family)
    require_pinned(settings, image)
    return _Plan(build_dir, accel, strategy, image.compress if opts.compress is None else opts.compress,
                 opts.timeout_s or BUILD_TIMEOUT_S[image.mode], reason, source)


def _build(settings: Settings, image: Image, result: render.RenderResult, plan: _Plan,
           sink: EventSink) -> BuildOutcome:
    size_mb = render.disk_size_mb(image.disk_size)
    check_disk_space(plan.dir.path, size_mb * 2**20 * 2, f"building {image.name} ({image.disk_size} disk, twice)")
    started_at = packerrun.now()
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=plan.dir.path))
    vm_services = contextlib.ExitStack()
    try:
        enrolled = _prepare(settings, image, result, plan, work, vm_services, sink)
        efi_vars = _keep_enrolled_store(image, work)
        _run(image, result, plan, work, sink)
        compacted, artifact = _compact(image, plan, work, sink)
        made = manifest.Made(
            fingerprint=result.fingerprint, inputs=dict(result.inputs), recipe=recipe_digest(result.inputs),
            tools=provenance.tool_versions(settings, mitogen=plan.strategy.name == "mitogen_linear"),
            git=provenance.git_state(settings.root), started_at=started_at, finished_at=packerrun.now(),
            accelerator=plan.accel, ansible_strategy=plan.strategy.name, source=plan.source,
            secure_boot_enrolled=enrolled, efi_vars=efi_vars.name if efi_vars else "",
            efi_vars_sha256=sha256_file(efi_vars) if efi_vars else "")
        built = manifest.assemble(image, artifact, made)
        _put_in_place(plan.dir, compacted, work, built)
        sink.emit("artifact", str(plan.dir.artifact(built)))
        return BuildOutcome("built", built, plan.dir, plan.dir.build_log, sink.elapsed(), plan.reason,
                            result.fingerprint, plan.dir.artifact(built), sink.events)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            (work / "serial.log").replace(plan.dir.serial_failed_log)
        raise
    finally:
        vm_services.close()
        shutil.rmtree(work, ignore_errors=True)


def _keep_enrolled_store(image: Image, work: Path) -> Path | None:
    """A Secure Boot build's variable store as enrolled, before the installer writes its boot entries (they name
    the build VM's devices): the store publish imports into a template that needs its own (Platform.own_store)."""
    if not (image.firmware == "uefi" and image.secure_boot):
        return None
    kept = work / EFI_VARS_NAME
    shutil.copyfile(work / firmware.VARS_NAME, kept)
    return kept


def _prepare(settings: Settings, image: Image, result: render.RenderResult, plan: _Plan, work: Path,
             vm_services: contextlib.ExitStack, sink: EventSink) -> list[dict[str, str]]:
    """The per-build variables, the UEFI firmware (and TPM) and the factory bundle; the enrolled certificates."""
    render.set_var(result, "work_dir", str(work))
    render.set_var(result, "accelerator", plan.accel)
    enrolled: list[dict[str, str]] = []
    if image.firmware == "uefi":
        boot = firmware.prepare(work, machine=image.machine_type, secure_boot=image.secure_boot,
                                keys=image.keys, family=image.family)
        render.set_var(result, "ovmf_code", str(boot.code))
        render.set_var(result, "ovmf_vars", str(boot.variables))
        enrolled = list(boot.enrolled)
        if image.secure_boot:
            sink.emit("status", f"Secure Boot: OVMF {boot.code.name} with key set {image.keys}: "
                                + ("; ".join(f"{e['variable']} {e['subject']} sha256:{e['sha256'][:16]}… until "
                                             f"{e['not_after']}" for e in enrolled) or "setup mode, no keys"))
        old_packer = packerrun.cached_packer_version(settings) < render.PLUGIN_PACKER
        if old_packer and not image.source.is_local and image.mode == "iso":
            render.set_var(result, "install_iso", str(packerrun.install_iso_path(result.out_dir, image)))
        if image.tpm and old_packer:  # newer Packer: the qemu plugin's own vtpm option runs swtpm
            # a unix socket path must stay under 108 bytes: a short private directory, not the work dir
            tpm = vm_services.enter_context(firmware.swtpm(Path(tempfile.mkdtemp(prefix="swtpm-"))))
            render.set_var(result, "tpm_socket", str(tpm.socket))
    if image.factory:
        sink.emit("step", "building the factory's wheel and fetching its locked dependencies for the image")
        bundle.factory_bundle(settings, image, result.var_file.parent / render.FACTORY_BUNDLE_DIR, work)
    return enrolled


def _run(image: Image, result: render.RenderResult, plan: _Plan, work: Path, sink: EventSink) -> None:
    """``packer build``; its raw disk is left in work/output."""
    exe = packerrun.require("packer")  # its plugins: installed by render.validate (packer init)
    cmd = [exe, "build", "-machine-readable", "-color=false", f"-var-file={result.var_file}", result.hcl.name]
    strategy = plan.strategy
    sink.emit("step", f"packer build ({image.mode} mode, accelerator {plan.accel}, Ansible {strategy.name}: "
                      f"{strategy.why})")
    if warning := ansible_target_warning(image.family, image.release):
        sink.emit("status", f"warning: {warning}")
    try:
        run = packerrun.run_packer_once_more_on_tcg_panic(
            cmd, accel=plan.accel, work=work, sink=sink, cwd=result.out_dir, log_path=plan.dir.build_log,
            timeout_s=plan.timeout_s, extra_env=strategy.env)
    except BuildError as exc:
        if strategy.name == "mitogen_linear" and "executing ansible" in str(exc).lower():
            raise BuildError(f"{exc}\nAnsible ran under mitogen (factory.ansible_strategy); to rule mitogen "
                             "out, rebuild with --ansible-strategy linear") from None
        raise
    raw = work / "output" / render.artifact_name(image)
    if not raw.is_file():
        found = ", ".join(run.artifacts) or "none"
        raise BuildError(f"packer reported success but {raw} does not exist (artifacts: {found}); "
                         f"full log: {plan.dir.build_log}")


def _compact(image: Image, plan: _Plan, work: Path, sink: EventSink) -> tuple[Path, Artifact]:
    """The raw disk compacted (and compressed, if asked) into work/, and what it is."""
    name = render.artifact_name(image)
    sink.emit("step", "compacting the disk with qemu-img convert" + (" -c" if plan.compress else ""))
    compacted = work / name
    packerrun.compact(work / "output" / name, compacted, compress=plan.compress)
    shutil.rmtree(work / "output", ignore_errors=True)
    info = packerrun.qemu_img_info(compacted)
    sink.emit("step", "hashing the artifact")
    artifact = Artifact(path=name, format="qcow2", virtual_size=int(info["virtual-size"]),
                        disk_size=compacted.stat().st_size, sha256=sha256_file(compacted))
    return compacted, artifact


def _put_in_place(build_dir: BuildDir, compacted: Path, work: Path, built: Manifest) -> None:
    # The old manifest out first, so no manifest ever points at a half-replaced artifact.
    build_dir.manifest.unlink(missing_ok=True)
    os.replace(compacted, build_dir.artifact(built))
    if built.efi_vars:
        os.replace(work / EFI_VARS_NAME, build_dir.path / built.efi_vars)
    with contextlib.suppress(FileNotFoundError):
        (work / "serial.log").replace(build_dir.serial_log)
    build_dir.serial_failed_log.unlink(missing_ok=True)
    build_dir.save(built)
