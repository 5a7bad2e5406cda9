"""Render: determinism, StrictUndefined, required_plugins gating, secrets, and the real validators.

The validation tests run the real tools (Debian's packer, pykickstart's ksvalidator, ansible-lint).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from image_factory.image import render, rendercheck
from image_factory.lab.aptrepo import generate_key, public_key
from image_factory.settings import REPO_ROOT, Settings
from image_factory.site.inventory import Image, load_site

pytestmark = pytest.mark.unit


def _copy_repo_inputs(dst: Path) -> None:
    for d in ("packer", "kickstart", "ansible"):
        shutil.copytree(REPO_ROOT / d, dst / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / ".ansible-lint", dst / ".ansible-lint")


@pytest.fixture
def repo(tmp_path: Path) -> Settings:
    """A private copy of the templates and catalogue, with builds/ under tmp_path."""
    _copy_repo_inputs(tmp_path)
    return Settings.from_mapping({"builds_dir": str(tmp_path / "builds")}, root=tmp_path)


@pytest.fixture
def catalogue(repo: Settings) -> dict[str, Image]:
    return load_site(REPO_ROOT / "ansible/inventory", repo.images).images


def fedora_images() -> list[str]:
    s = Settings.from_mapping()
    images = load_site(s.inventory, s.images).images
    return [n for n, i in images.items() if i.family == "fedora"]


def _render(settings: Settings, image: Image, pv: tuple[int, int, int] = (1, 6, 6)) -> render.RenderResult:
    result = render.render_image(settings, image, packer_version=pv)
    return result


def _snapshot(result: render.RenderResult) -> dict[str, bytes]:
    return {str(p.relative_to(result.out_dir)): p.read_bytes() for p in result.files}


@pytest.mark.parametrize("name", ["fedora-44-iso", "fedora-44", "debian-lab"])
def test_render_is_byte_identical(repo: Settings, catalogue: dict[str, Image], name: str) -> None:
    a = _render(repo, catalogue[name])
    first = _snapshot(a)
    a.cleanup()
    b = _render(repo, catalogue[name])
    try:
        assert _snapshot(b) == first
        assert b.fingerprint == a.fingerprint
        # the per-build material differs between renders, and is not part of the output
        assert a.secret_dir != b.secret_dir
        assert all(not p.is_relative_to(b.secret_dir) for p in b.files)  # type: ignore[arg-type]
    finally:
        b.cleanup()


def test_secret_files_are_private_and_outside_the_repo(repo: Settings, catalogue: dict[str, Image]) -> None:
    for name in ("fedora-44-iso", "fedora-44"):
        result = _render(repo, catalogue[name])
        try:
            assert result.secret_dir is not None
            assert not result.var_file.is_relative_to(repo.root)
            assert stat.S_IMODE(result.secret_dir.stat().st_mode) == 0o700
            for p in result.secret_dir.rglob("*"):
                if p.is_file():
                    assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        finally:
            result.cleanup()
        assert not result.secret_dir.exists()


def test_kickstart_holds_only_a_sha512_hash(repo: Settings, catalogue: dict[str, Image]) -> None:
    result = _render(repo, catalogue["fedora-44-iso"])
    try:
        assert result.kickstart is not None and result.secret_dir is not None
        ks = result.kickstart.read_text()
        assert "%include /tmp/factory-build-user.ks" in ks
        assert "--password" not in ks and "$6$" not in ks
        user = (result.secret_dir / "http" / "build-user.ks").read_text()
        assert "--iscrypted --password=$6$" in user
        pw_hash = user.split("--password=")[1].split()[0]
        assert len(pw_hash.split("$")[3]) == 86  # a full SHA-512 crypt digest
    finally:
        result.cleanup()


def test_no_plaintext_secret_under_builds(repo: Settings, catalogue: dict[str, Image]) -> None:
    # a factory: true image carries the factory's wheel and needs a checkout as its site (this copy is none);
    # its secrets take the same path as every other image's
    results = [_render(repo, img) for img in catalogue.values() if not img.factory]
    try:
        needles: list[bytes] = []
        for r in results:
            assert r.secret_dir is not None
            needles.append((r.secret_dir / "id_ed25519").read_bytes().split(b"\n")[1])  # private key body
            needles.append(str(r.secret_dir).encode())
            for p in r.secret_dir.rglob("build-user.ks"):
                needles.append(p.read_text().split("--password=")[1].split()[0].encode())
        for p in repo.builds_dir.rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                assert b"PRIVATE KEY" not in data, p
                for n in needles:
                    assert n not in data, p
    finally:
        for r in results:
            r.cleanup()


def test_required_plugins_only_for_packer_1_7_and_later(repo: Settings, catalogue: dict[str, Image]) -> None:
    old = _render(repo, catalogue["fedora-44"], (1, 6, 6))
    old_text = old.hcl.read_text()
    old.cleanup()
    new = _render(repo, catalogue["fedora-44"], (1, 11, 2))
    new_text = new.hcl.read_text()
    new.cleanup()
    assert "required_plugins {" not in old_text and "\npacker {" not in old_text
    assert "\npacker {\n  required_plugins {" in new_text and 'source  = "github.com/hashicorp/qemu"' in new_text
    assert f'version = "= {render.PLUGIN_VERSIONS["qemu"]}"' in new_text  # pinned, never ">="
    assert old.fingerprint != new.fingerprint  # a different packer renders a different build


def test_undefined_variable_names_template_and_variable(repo: Settings, catalogue: dict[str, Image]) -> None:
    tpl = repo.root / "kickstart/partials/storage.ks.j2"
    tpl.write_text(tpl.read_text() + "part /srv --size={{ srv_size }}\n")
    out = repo.builds_dir / "fedora-44-iso"
    with pytest.raises(render.RenderError) as exc:
        _render(repo, catalogue["fedora-44-iso"])
    msg = str(exc.value)
    assert "storage.ks.j2:" in msg and "srv_size" in msg
    assert not out.exists(), "a template error must leave builds/<image>/ untouched"


def test_undefined_attribute_of_image_is_an_error(repo: Settings, catalogue: dict[str, Image]) -> None:
    tpl = repo.root / "packer/image.pkr.hcl.j2"
    tpl.write_text(tpl.read_text().replace("{{ image.cpus }}", "{{ image.vcpus }}"))
    with pytest.raises(render.RenderError, match=r"image\.pkr\.hcl\.j2:\d+: .*vcpus"):
        _render(repo, catalogue["fedora-44"])


def test_bad_catalogue_value_fails_before_packer(repo: Settings, catalogue: dict[str, Image]) -> None:
    bad = catalogue["fedora-44"].model_copy(update={"source": catalogue["fedora-44"].source.model_copy(
        update={"url": 'https://example.invalid/x".qcow2'})})
    with pytest.raises(render.RenderError, match="source.url"):
        _render(repo, bad)
    debian_iso = catalogue["debian-lab"].model_copy(update={"mode": "iso"})
    with pytest.raises(render.RenderError, match="iso mode needs an installer, and the debian family has none"):
        _render(repo, debian_iso)


def test_fingerprint_follows_inputs(repo: Settings, catalogue: dict[str, Image]) -> None:
    base = _render(repo, catalogue["debian-lab"])
    base.cleanup()
    role = repo.root / "ansible/roles/seal/tasks/main.yml"
    role.write_text(role.read_text() + "\n# changed\n")
    changed = _render(repo, catalogue["debian-lab"])
    changed.cleanup()
    assert changed.fingerprint != base.fingerprint
    # an unrelated playbook does not invalidate the image
    (repo.root / "ansible/playbooks/other.yml").write_text("---\n- hosts: all\n  tasks: []\n")
    again = _render(repo, catalogue["debian-lab"])
    again.cleanup()
    assert again.fingerprint == changed.fingerprint
    # the local source's checksum file content is an input
    ck = repo.resolve("builds/base/debian-13-base.qcow2.sha256")
    ck.parent.mkdir(parents=True, exist_ok=True)
    ck.write_text("0" * 64 + "  debian-13-base.qcow2\n")
    with_ck = _render(repo, catalogue["debian-lab"])
    with_ck.cleanup()
    assert with_ck.fingerprint != again.fingerprint
    assert with_ck.inputs["source_checksum"] == "0" * 64


def test_packer_version_reads_the_real_packer() -> None:
    if shutil.which("packer") is None:
        pytest.skip("packer not installed (./dev setup installs it)")
    v = render.packer_version()
    assert len(v) == 3 and v >= (1, 0, 0)


def test_packer_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    render._packer_version_cache.clear()
    with pytest.raises(render.ToolMissing, match=r"packer is not installed .*Packer >= 1\.7.*\./dev setup"):
        render.packer_version()


@pytest.mark.parametrize(("tool", "provider"), [
    ("ansible-playbook", "ansible-core, a dependency of the factory itself"),
    ("ksvalidator", "pykickstart, in the [build] extra"),
    ("ansible-lint", "ansible-lint, in the [build] extra"), ("qemu-img", "apt-get install qemu-utils"),
    ("qemu-system-x86_64", "dnf install qemu-system-x86"), ("packer", "HashiCorp's signed repository"),
])
def test_a_missing_tool_names_what_provides_it(tool: str, provider: str, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(render, "venv_bin", lambda: tmp_path)
    with pytest.raises(render.ToolMissing) as err:
        render.require_tool(tool)
    assert str(err.value).startswith(f"{tool} is not installed") and provider in str(err.value)


def _copy_factory_sources(dst: Path) -> None:
    """What an image with factory: true builds the factory's wheel from (the repository's own files)."""
    for rel in render.FACTORY_WHEEL_SOURCES + (render.FACTORY_LOCK,):
        if (dst / rel).exists():
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (REPO_ROOT / rel).is_dir() else shutil.copy2
        copy(REPO_ROOT / rel, dst / rel)


@pytest.mark.parametrize("name", [*fedora_images(), "debian-lab-uefi", "debian-lab-builder"])
def test_every_fedora_image_passes_the_real_validators(name: str, tmp_path: Path) -> None:
    """packer validate + fmt -check (Debian's packer), ksvalidator -v F<release>, ansible-lint; and the
    UEFI cloud fixture, the one template rendering a seed CD of its own, and the builder image, the one with
    a playbook (and role) of its own."""
    if shutil.which("packer") is None:
        pytest.skip("packer not installed (./dev setup installs it)")
    _copy_repo_inputs(tmp_path)
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "builds")}, root=tmp_path)
    image = load_site(REPO_ROOT / "ansible/inventory", settings.images).images[name]
    if image.factory:
        _copy_factory_sources(tmp_path)
    result = render.render_image(settings, image)
    try:
        rendercheck.validate(result, settings)
        if image.mode == "iso":
            assert result.kickstart is not None and result.kickstart.exists()
    finally:
        result.cleanup()


def test_validate_reports_the_tools_message_with_file_and_line(repo: Settings, catalogue: dict[str, Image]) -> None:
    if shutil.which("packer") is None:
        pytest.skip("packer not installed")
    result = _render(repo, catalogue["fedora-44"])
    try:
        text = result.hcl.read_text().replace('  format           = "qcow2"\n',
                                              '  format           = "qcow2"\n  no_such_option   = 1\n')
        result.hcl.write_text(text)
        with pytest.raises(render.RenderError) as exc:
            rendercheck.validate_packer(result)
        msg = str(exc.value)
        assert "packer validate" in msg and "no_such_option" in msg and "line" in msg
        assert str(result.hcl) in msg
    finally:
        result.cleanup()


def test_ksvalidator_rejects_a_broken_kickstart(repo: Settings, catalogue: dict[str, Image]) -> None:
    result = _render(repo, catalogue["fedora-44-iso"])
    try:
        assert result.kickstart is not None
        result.kickstart.write_text(result.kickstart.read_text() + "\nbogus_command --nope\n")
        pattern = r"(?s)ksvalidator -v F44 rejected .*ks.cfg.*line \d+.*bogus_command"
        with pytest.raises(render.RenderError, match=pattern):
            rendercheck.validate_kickstart(result)
    finally:
        result.cleanup()


def test_ksvalidator_leaves_no_copy_of_the_kickstart_behind(repo: Settings, catalogue: dict[str, Image],
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pykickstart writes what it validates to $TMPDIR and never removes it; the merged kickstart holds the
    build user's password hash."""
    shared_tmp = tmp_path / "shared-tmp"
    shared_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(shared_tmp))
    result = _render(repo, catalogue["fedora-45-iso"])
    try:
        rendercheck.validate_kickstart(result)
    finally:
        result.cleanup()
    assert [p.name for p in shared_tmp.rglob("*")] == []


def test_rendered_output_files_are_not_secret(repo: Settings, catalogue: dict[str, Image]) -> None:
    result = _render(repo, catalogue["fedora-44"])
    try:
        for p in result.files:
            assert stat.S_IMODE(p.stat().st_mode) & 0o044, "public render output is world-readable"
        assert os.access(result.hcl, os.R_OK)
    finally:
        result.cleanup()


def test_debian_fixture_validates_before_the_base_image_exists(repo: Settings, catalogue: dict[str, Image]) -> None:
    """`build.render --all` works on a fresh checkout: the fixture's checksum file is not needed yet."""
    if shutil.which("packer") is None:
        pytest.skip("packer not installed")
    assert not repo.resolve("builds/base/debian-13-base.qcow2.sha256").exists()
    result = _render(repo, catalogue["debian-lab"])
    try:
        assert result.inputs["source_checksum"] == "missing"
        rendercheck.validate_packer(result)
    finally:
        result.cleanup()


def test_uefi_renders_ovmf_on_q35_and_an_efi_partition_bios_a_biosboot_one(
        repo: Settings, catalogue: dict[str, Image]) -> None:
    uefi = _render(repo, catalogue["fedora-45-iso"])
    bios = _render(repo, catalogue["fedora-44-iso"])
    try:
        hcl = uefi.hcl.read_text()
        assert 'machine_type = "q35,smm=on"' in hcl  # fedora-45-iso boots Secure Boot: OVMF's SMM code
        assert "if=pflash,format=raw,unit=0,readonly=on,file=${var.ovmf_code}" in hcl
        assert "unit=1,file=${var.work_dir}/efivars.fd" in hcl
        assert uefi.kickstart is not None and "part /boot/efi --fstype=efi" in uefi.kickstart.read_text()
        assert "biosboot" not in uefi.kickstart.read_text()
        assert 'ovmf_code = ""' in uefi.var_file.read_text()
        assert "pflash" not in bios.hcl.read_text() and "machine_type" not in bios.hcl.read_text()
        assert bios.kickstart is not None and "part biosboot" in bios.kickstart.read_text()
    finally:
        uefi.cleanup()
        bios.cleanup()


def _qemuargs(hcl: str) -> list[list[str]]:
    block = hcl[hcl.index("  qemuargs = [\n"):]
    block = block[:block.index("\n  ]\n")]
    return [re.findall(r'"((?:[^"\\]|\\.)*)"', line) for line in block.splitlines()[1:]]


def _attribute(hcl: str, name: str) -> str | None:
    m = re.search(rf"^  {name} +=\s*(.+)$", hcl, re.MULTILINE)
    return m[1].strip().strip('"') if m else None


def test_uefi_iso_gets_its_disk_and_cd_on_both_packers(repo: Settings, catalogue: dict[str, Image]) -> None:
    """Any -drive in qemuargs makes the qemu builder (1.6.6's and plugin 1.1.x's getDeviceAndDriveArgs alike)
    leave out its own disk and CD: 1.6 gets them named in qemuargs, the plugin its own efi_* options instead."""
    old = _render(repo, catalogue["fedora-45-iso"], (1, 6, 6))
    hcl = old.hcl.read_text()  # before the next render writes over it
    new = _render(repo, catalogue["fedora-45-iso"], (1, 11, 2))
    try:
        drives = [a[1] for a in _qemuargs(hcl) if a[0] == "-drive"]
        disk = f"{_attribute(hcl, 'output_directory')}/{_attribute(hcl, 'vm_name')}"
        assert disk == "${var.work_dir}/output/fedora-45-iso.qcow2"
        assert drives[0] == (f"file={disk},if=virtio,cache=writeback,discard=unmap,format=qcow2,"
                             "detect-zeroes=unmap")  # as the builder writes its own (disk_* options above)
        assert _attribute(hcl, "iso_target_path") == "var.install_iso"
        assert drives[1] == "file=${var.install_iso},media=cdrom"
        assert [d.split(",")[:3] for d in drives[2:]] == [["if=pflash", "format=raw", "unit=0"],
                                                          ["if=pflash", "format=raw", "unit=1"]]
        assert 'install_iso = ""' in old.var_file.read_text()

        hcl = new.hcl.read_text()
        assert all(a[0] != "-drive" for a in _qemuargs(hcl))  # the plugin keeps its own disk and CD
        assert _attribute(hcl, "efi_boot") == "true" and _attribute(hcl, "machine_type") == "q35,smm=on"
        assert _attribute(hcl, "efi_firmware_code") == "var.ovmf_code"
        assert _attribute(hcl, "efi_firmware_vars") == "var.ovmf_vars"
        assert _attribute(hcl, "iso_target_path") is None and "install_iso" not in hcl
        # efi_boot and efi_firmware_* came with packer-plugin-qemu 1.0.7 (builder: add EFI-specific boot values)
        assert tuple(map(int, render.PLUGIN_VERSIONS["qemu"].split("."))) >= (1, 0, 7)
    finally:
        old.cleanup()
        new.cleanup()


FAKE_QEMU = """#!/bin/sh
case "$1" in -version|--version) exec qemu-system-x86_64.real -version;; esac
printf '%s\\n' "$@" > "$QEMU_ARGV"
exit 1
"""


def _packer_qemu_argv(settings: Settings, image: Image, tmp_path: Path, tpm_socket: str = "") -> list[str]:
    """The QEMU command line Packer 1.6 builds for ``image``: a real `packer build` whose qemu-system-x86_64
    records its arguments and stops there (Packer asks the real one for its version)."""
    from image_factory.image import packerrun

    real = shutil.which("qemu-system-x86_64")
    if shutil.which("packer") is None or real is None or render.packer_version() >= render.PLUGIN_PACKER:
        pytest.skip("needs Packer 1.6 and qemu-system-x86_64 (./dev setup installs them)")
    fake = tmp_path / "fakebin"
    fake.mkdir(exist_ok=True)
    (fake / "qemu-system-x86_64.real").unlink(missing_ok=True)
    (fake / "qemu-system-x86_64.real").symlink_to(real)
    (fake / "qemu-system-x86_64").write_text(FAKE_QEMU)
    (fake / "qemu-system-x86_64").chmod(0o755)
    result = render.render_image(settings, image, packer_version=(1, 6, 6))
    work = tmp_path / f"work-{image.name}"
    work.mkdir()
    render.set_var(result, "work_dir", str(work))
    if tpm_socket:
        render.set_var(result, "tpm_socket", tpm_socket)
    if image.firmware == "uefi":
        render.set_var(result, "ovmf_code", str(tmp_path / "CODE.fd"))
        render.set_var(result, "ovmf_vars", str(tmp_path / "VARS.fd"))
        if not image.source.is_local and image.mode == "iso":
            render.set_var(result, "install_iso", str(packerrun.install_iso_path(result.out_dir, image)))
    argv = tmp_path / f"argv-{image.name}"
    env = {**render.tool_env(), "QEMU_ARGV": str(argv), "PACKER_CACHE_DIR": str(tmp_path / "cache")}
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    try:
        subprocess.run(["packer", "build", "-color=false", f"-var-file={result.var_file}", result.hcl.name],
                       cwd=result.out_dir, env=env, capture_output=True, text=True, timeout=120)
    finally:
        result.cleanup()
    assert argv.exists(), f"packer never started qemu for {image.name}"
    return argv.read_text().splitlines()


def _drives(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]


@pytest.mark.parametrize("where", ["local", "download"])
def test_packer_1_6_starts_a_uefi_install_with_the_disk_the_cd_and_ovmf(
        repo: Settings, catalogue: dict[str, Image], tmp_path: Path, loopback_http: Any, where: str) -> None:
    """Packer 1.6.6 itself assembles QEMU's command line: the UEFI install has the same disk and CD the BIOS
    one gets from the builder, plus the two pflash drives."""
    from image_factory.site.inventory import Source

    iso = tmp_path / "netinst.iso"
    iso.write_bytes(os.urandom(4096))
    checksum = "sha256:" + hashlib.sha256(iso.read_bytes()).hexdigest()
    with loopback_http({"/netinst.iso": iso.read_bytes()}) as base:
        url = str(iso) if where == "local" else f"{base}/netinst.iso"
        images = {name: catalogue[name].model_copy(update={"source": Source(url=url, checksum=checksum)})
                  for name in ("fedora-44-iso", "fedora-45-iso")}
        bios = _packer_qemu_argv(repo, images["fedora-44-iso"], tmp_path)
        uefi = _packer_qemu_argv(repo, images["fedora-45-iso"], tmp_path)
    cd = str(iso) if where == "local" else str(repo.builds_dir / ".packer_cache/fedora-45-iso-install.iso")
    own, drives = _drives(bios), _drives(uefi)
    assert len(own) == 2 and own[1].endswith(",media=cdrom")  # the builder's own disk and CD (BIOS)
    assert drives[0] == own[0].replace("fedora-44-iso", "fedora-45-iso")
    assert drives[1] == f"file={cd},media=cdrom"
    if where == "local":
        assert drives[1] == own[1]
    assert _drives(uefi)[2:] == [f"if=pflash,format=raw,unit=0,readonly=on,file={tmp_path}/CODE.fd",
                                 f"if=pflash,format=raw,unit=1,file={tmp_path}/work-fedora-45-iso/efivars.fd"]
    assert uefi[uefi.index("-machine") + 1].startswith("type=q35")
    if where == "download":
        assert Path(cd).read_bytes() == iso.read_bytes()  # Packer kept the download where the CD names it


def test_uefi_cloud_gets_its_disk_and_seed_cd_on_both_packers(repo: Settings, catalogue: dict[str, Image]) -> None:
    """A cloud image booted under UEFI (debian-lab-uefi): with 1.6 qemuargs names the disk Packer made from
    the cloud image and a seed CD the factory made (Packer's own cd_files CD has a random path, and with any
    -drive in qemuargs it would not be attached); with the plugin its own efi_* options and cd_files."""
    image = catalogue["debian-lab-uefi"]
    assert image.mode == "cloud" and image.firmware == "uefi"
    old = _render(repo, image, (1, 6, 6))
    hcl = old.hcl.read_text()
    new = _render(repo, image, (1, 11, 2))
    try:
        drives = [a[1] for a in _qemuargs(hcl) if a[0] == "-drive"]
        disk = f"{_attribute(hcl, 'output_directory')}/{_attribute(hcl, 'vm_name')}"
        assert disk == "${var.work_dir}/output/debian-lab-uefi.qcow2"
        assert drives[0] == (f"file={disk},if=virtio,cache=writeback,discard=unmap,format=qcow2,"
                             "detect-zeroes=unmap")
        assert drives[1] == f"file=${{var.secret_dir}}/{render.SEED_ISO},media=cdrom"
        assert [d.split(",")[:3] for d in drives[2:]] == [["if=pflash", "format=raw", "unit=0"],
                                                          ["if=pflash", "format=raw", "unit=1"]]
        assert _attribute(hcl, "cd_files") is None and _attribute(hcl, "disk_image") == "true"
        assert "install_iso" not in hcl and "install_iso" not in old.var_file.read_text()
        seed = old.var_file.parent / render.SEED_ISO
        listing = subprocess.run(["xorriso", "-indev", str(seed), "-pvd_info", "-find", "/", "-type", "f"],
                                 capture_output=True, text=True, check=True)
        assert "Volume Id    : cidata" in listing.stdout
        assert sorted(listing.stdout.split()[-3:]) == ["'/meta-data'", "'/network-config'", "'/user-data'"]
        assert oct(seed.stat().st_mode & 0o777) == "0o600"

        hcl = new.hcl.read_text()
        assert all(a[0] != "-drive" for a in _qemuargs(hcl))
        assert _attribute(hcl, "efi_boot") == "true" and _attribute(hcl, "machine_type") == "q35,smm=on"
        assert _attribute(hcl, "cd_label") == "cidata" and _attribute(hcl, "cd_files") is not None
        assert not (new.var_file.parent / render.SEED_ISO).exists()
    finally:
        old.cleanup()
        new.cleanup()


def test_packer_1_6_starts_a_uefi_cloud_build_with_the_disk_the_seed_and_ovmf(
        repo: Settings, catalogue: dict[str, Image], tmp_path: Path) -> None:
    """Packer 1.6.6 itself: the UEFI cloud build's QEMU gets the disk the BIOS one gets from the builder,
    the seed CD and the pflash drives."""
    from image_factory.site.inventory import Source

    base = tmp_path / "cloud.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    checksum = "sha256:" + hashlib.sha256(base.read_bytes()).hexdigest()
    images = {name: catalogue[name].model_copy(update={"source": Source(url=str(base), checksum=checksum)})
              for name in ("debian-lab", "debian-lab-uefi")}
    own = _drives(_packer_qemu_argv(repo, images["debian-lab"], tmp_path))
    uefi = _packer_qemu_argv(repo, images["debian-lab-uefi"], tmp_path)
    drives = _drives(uefi)
    assert len(own) == 2 and own[1].endswith(",media=cdrom")
    assert drives[0] == own[0].replace("debian-lab", "debian-lab-uefi")
    assert drives[1].startswith("file=/") and drives[1].endswith(f"/{render.SEED_ISO},media=cdrom")
    assert [d.split(",")[0] for d in drives[2:]] == ["if=pflash", "if=pflash"]
    assert uefi[uefi.index("-machine") + 1].startswith("type=q35")


def _option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == option]


def test_packer_1_6_boots_secure_boot_on_smm_with_the_tpm(
        repo: Settings, catalogue: dict[str, Image], tmp_path: Path) -> None:
    """Packer 1.6.6 itself: the Secure Boot + vTPM fixture's QEMU gets SMM, the SMM-only variable flash and the
    swtpm socket as a TPM 2.0 device (tpm-tis); the BIOS fixture gets none of them."""
    from image_factory.site.inventory import Source

    base = tmp_path / "cloud.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    checksum = "sha256:" + hashlib.sha256(base.read_bytes()).hexdigest()
    images = {name: catalogue[name].model_copy(update={"source": Source(url=str(base), checksum=checksum)})
              for name in ("debian-lab", "debian-lab-uefi")}
    assert images["debian-lab-uefi"].secure_boot and images["debian-lab-uefi"].tpm
    bios = _packer_qemu_argv(repo, images["debian-lab"], tmp_path)
    uefi = _packer_qemu_argv(repo, images["debian-lab-uefi"], tmp_path, tpm_socket="/tmp/swtpm-x/swtpm.sock")
    assert _option_values(uefi, "-machine")[0].split(",")[:2] == ["type=q35", "smm=on"]
    assert _option_values(uefi, "-global") == ["driver=cfi.pflash01,property=secure,value=on"]
    assert _option_values(uefi, "-chardev")[-1] == "socket,id=chrtpm,path=/tmp/swtpm-x/swtpm.sock"
    assert _option_values(uefi, "-tpmdev") == ["emulator,id=tpm0,chardev=chrtpm"]
    assert "tpm-tis,tpmdev=tpm0" in _option_values(uefi, "-device")
    assert "virtio-net,netdev=user.0,mac=52:54:00:fa:c7:01" in _option_values(uefi, "-device")
    for option in ("-global", "-tpmdev"):
        assert option not in bios
    assert "smm" not in _option_values(bios, "-machine")[0]


def test_plugin_renders_secure_boot_and_its_own_vtpm(repo: Settings, catalogue: dict[str, Image]) -> None:
    """Packer >= 1.7: the qemu plugin runs swtpm itself (vtpm, plugin >= 1.0.7); SMM through machine_type (the
    plugin writes -machine type=<machine_type>,accel=...) and the secure flash through qemuargs."""
    image = catalogue["debian-lab-uefi"]
    new = _render(repo, image, (1, 11, 2))
    hcl = new.hcl.read_text()  # before the next render writes over it
    plain = _render(repo, image.model_copy(update={"secure_boot": False, "keys": None, "tpm": False}), (1, 11, 2))
    try:
        assert _attribute(hcl, "vtpm") == "true" and _attribute(hcl, "machine_type") == "q35,smm=on"
        assert ["-global", "driver=cfi.pflash01,property=secure,value=on"] in _qemuargs(hcl)
        assert all(a[0] not in ("-chardev", "-tpmdev") for a in _qemuargs(hcl))
        assert "tpm_socket" not in hcl and "tpm_socket" not in new.var_file.read_text()
        hcl = plain.hcl.read_text()
        assert _attribute(hcl, "vtpm") is None and _attribute(hcl, "machine_type") == "q35"
        assert all(a[0] != "-global" for a in _qemuargs(hcl))
    finally:
        new.cleanup()
        plain.cleanup()


def test_a_missing_ovmf_names_the_package(tmp_path: Path) -> None:
    from image_factory.image import firmware
    with pytest.raises(firmware.FirmwareError, match="apt-get install ovmf"):
        firmware.locate_ovmf(((str(tmp_path / "CODE.fd"), str(tmp_path / "VARS.fd")),))
    (tmp_path / "CODE.fd").write_bytes(b"c")
    (tmp_path / "VARS.fd").write_bytes(b"v")
    code, variables = firmware.locate_ovmf(((str(tmp_path / "CODE.fd"), str(tmp_path / "VARS.fd")),))
    copy = firmware.private_vars(tmp_path / "work", variables)
    assert copy.read_bytes() == b"v" and oct(copy.stat().st_mode & 0o777) == "0o600"
    assert firmware.qemu_args(code, copy)[1].endswith(f"readonly=on,file={code}")


def _with_extra_repository(image: Image, tmp_path: Path, key_text: str, fingerprint: str, **extra: object) -> Image:
    key = tmp_path / "team.asc"
    key.write_text(key_text)
    repo = {"kind": "debian", "uri": "http://127.0.0.1:8080/team", "suite": "stable", "key": str(key),
            "fingerprint": fingerprint, "packages": ["team-agent"], "build_only": True, **extra}
    return Image.model_validate({**image.model_dump(), "repositories": [repo]})


def test_extra_repository_reaches_the_build_vm_with_its_key(repo: Settings, catalogue: dict[str, Image],
                                                            tmp_path: Path) -> None:
    signer = generate_key("Team <team@example.org>")
    image = _with_extra_repository(catalogue["debian-lab"], tmp_path, str(public_key(signer)), signer.fingerprint)
    result = _render(repo, image)
    try:
        data = json.loads((result.secret_dir / render.BUILD_VARS_FILE).read_text())
        (extra,) = data["factory_repositories"]
        # loopback on this machine is QEMU's gateway for the build VM
        assert extra["uri"] == "http://10.0.2.2:8080/team" and extra["suite"] == "stable"
        assert extra["packages"] == ["team-agent"] and extra["build_only"] is True
        assert extra["key"].startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
        assert "PRIVATE" not in extra["key"]
        assert f'"@${{var.secret_dir}}/{render.BUILD_VARS_FILE}"' in result.hcl.read_text()
        assert any(k.startswith("input:") and k.endswith("team.asc") for k in result.inputs)
    finally:
        result.cleanup()
    # another key under the same name is another build
    other = generate_key("Team <team@example.org>")
    (tmp_path / "team.asc").write_text(str(public_key(other)))
    image = _with_extra_repository(catalogue["debian-lab"], tmp_path, str(public_key(other)), other.fingerprint)
    again = _render(repo, image)
    again.cleanup()
    assert again.fingerprint != result.fingerprint


def test_extra_repository_key_must_have_the_pinned_fingerprint(repo: Settings, catalogue: dict[str, Image],
                                                               tmp_path: Path) -> None:
    signer, mallory = generate_key("Team <team@example.org>"), generate_key("Mallory <m@example.org>")
    image = _with_extra_repository(catalogue["debian-lab"], tmp_path, str(public_key(mallory)), signer.fingerprint)
    before = set((repo.builds_dir).rglob("*")) if repo.builds_dir.exists() else set()
    with pytest.raises(render.RenderError, match=r"repositories\[0\]\.key: .*team\.asc: fingerprint .* is not the "
                                                 r"pinned"):
        _render(repo, image)
    after = set((repo.builds_dir).rglob("*")) if repo.builds_dir.exists() else set()
    assert after == before, "nothing written for a refused key"
    (tmp_path / "team.asc").unlink()
    with pytest.raises(render.RenderError, match=r"repositories\[0\]\.key: .*team\.asc does not exist"):
        _render(repo, image)


# A Packer >= 1.10 as a fresh runner has it: no plugin bundled, so `validate` (and `build`) refuse a template
# until `packer init` installed its required_plugins; it remembers which directories were initialised.
STUB_PACKER = """#!/bin/sh
echo "$*" >> "{log}"
case "$1" in
  version) echo "Packer v{version}" ;;
  init) [ -n "$FAIL_INIT" ] && {{ echo 'Failed getting the "github.com/hashicorp/qemu" plugin: no route to host' >&2;
        exit 1; }}; pwd >> "{log}.initialised" ;;
  fmt) exit 0 ;;
  validate) grep -qxF "$(pwd)" "{log}.initialised" 2>/dev/null && exit 0
            echo 'Error: Missing plugins' >&2
            echo 'The following plugins are required, but not installed: github.com/hashicorp/qemu' >&2; exit 1 ;;
esac
"""


@pytest.fixture
def stub_packer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    bindir = tmp_path / "stub-bin"
    bindir.mkdir()
    log = tmp_path / "packer.calls"
    exe = bindir / "packer"
    exe.write_text(STUB_PACKER.format(log=log, version="1.11.2"))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("FAIL_INIT", raising=False)
    render._packer_version_cache.clear()
    yield log
    render._packer_version_cache.clear()


def test_the_stub_packer_refuses_a_template_whose_plugins_are_not_installed(stub_packer: Path, tmp_path: Path) -> None:
    """The stub is only worth its tests if it refuses what Packer >= 1.10 refuses."""
    import subprocess

    proc = subprocess.run(["packer", "validate", "x.pkr.hcl"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 1 and "Missing plugins" in proc.stderr


def test_packer_init_precedes_validate_for_packer_1_7_and_later(
        stub_packer: Path, repo: Settings, catalogue: dict[str, Image]) -> None:
    result = _render(repo, catalogue["fedora-44"], render.packer_version())
    try:
        assert result.packer_version == (1, 11, 2) and "required_plugins {" in result.hcl.read_text()
        rendercheck.validate_packer(result)
    finally:
        result.cleanup()
    calls = [ln.split()[0] for ln in stub_packer.read_text().splitlines()]
    assert calls == ["version", "init", "fmt", "validate"]


def test_packer_1_6_validates_without_init(stub_packer: Path, repo: Settings, catalogue: dict[str, Image]) -> None:
    result = _render(repo, catalogue["fedora-44"], (1, 6, 6))
    try:
        with pytest.raises(render.RenderError, match="Missing plugins"):
            rendercheck.validate_packer(result)  # this stub is a 1.11: 1.6.6 would have passed with its bundled plugins
    finally:
        result.cleanup()
    assert "init" not in [ln.split()[0] for ln in stub_packer.read_text().splitlines()]


def test_packer_init_offline_names_the_pins_and_the_way_out(
        stub_packer: Path, repo: Settings, catalogue: dict[str, Image], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAIL_INIT", "1")
    result = _render(repo, catalogue["fedora-44"], (1, 11, 2))
    try:
        with pytest.raises(render.ToolMissing) as err:
            rendercheck.validate_packer(result)
    finally:
        result.cleanup()
    message = str(err.value)
    assert f"qemu {render.PLUGIN_VERSIONS['qemu']}" in message and "no route to host" in message
    assert "packer plugins install" in message
    assert "validate" not in stub_packer.read_text(), "validate is pointless without the plugins"


def test_factory_image_carries_the_factory_in_its_fingerprint_and_build_vars(repo: Settings,
                                                                             catalogue: dict[str, Image]) -> None:
    """factory: true (debian-lab-builder): every file the factory's wheel is made of, and the lock, is a build
    input, and the playbook gets the bundle's path in the secret directory; other images do not depend on them."""
    builder, plain = catalogue["debian-lab-builder"], catalogue["debian-lab"]
    assert builder.factory and not plain.factory
    with pytest.raises(render.RenderError, match="no pyproject.toml"):
        _render(repo, builder)
    _copy_factory_sources(repo.root)
    first = _render(repo, builder)
    plain_first = _render(repo, plain)
    try:
        assert {"factory:src/image_factory/image/build.py", "factory:requirements/build.txt",
                "factory:pyproject.toml"} <= set(first.inputs)
        assert not any(k.startswith("factory:") for k in plain_first.inputs)
        variables = json.loads((first.var_file.parent / render.BUILD_VARS_FILE).read_text())
        assert variables["factory_bundle"] == str(first.var_file.parent / render.FACTORY_BUNDLE_DIR)
        assert "factory_bundle" not in json.loads((plain_first.var_file.parent / render.BUILD_VARS_FILE).read_text())
    finally:
        first.cleanup()
        plain_first.cleanup()
    source = repo.root / "src/image_factory/errors.py"
    source.write_text(source.read_text() + "\n# changed\n")
    changed, plain_again = _render(repo, builder), _render(repo, plain)
    changed.cleanup()
    plain_again.cleanup()
    assert changed.fingerprint != first.fingerprint
    assert plain_again.fingerprint == plain_first.fingerprint
