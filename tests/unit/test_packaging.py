"""The wheel, installed where no checkout is: `image-factory` runs from a fresh venv outside the repository
against a site directory of its own (the example site's inventory and catalogue, copied).

Offline and honest: the wheel is built from a copy of the sources with this venv's locked setuptools
(no build isolation, nothing downloaded) and installed with --no-deps into a new venv whose only view of
this venv is its dependencies' site-packages directory (a .pth line, as a system site would be; the
editable install of the checkout is not on it). The tools the build extra provides (ksvalidator,
ansible-lint) come from this venv's bin on PATH, packer and QEMU from the system's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from setuptools import find_packages

import image_factory
from image_factory.settings import REPO_ROOT

pytestmark = [pytest.mark.unit, pytest.mark.packaging]

SOURCES = ("pyproject.toml", "README.md", "LICENSE", "src", "packer", "kickstart", "ansible", "tests/image")


def test_every_source_package_is_in_the_wheel_list() -> None:
    """pyproject.toml lists packages by hand (the data directories are mapped in): a new package must join."""
    listed = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(find_packages(str(REPO_ROOT / "src"))) == sorted(p for p in listed if ".data." not in p)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv outside the repository with the freshly built wheel: its bin directory."""
    top = tmp_path_factory.mktemp("wheel")
    src = top / "src-copy"
    for rel in SOURCES:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (REPO_ROOT / rel).is_dir() else shutil.copy2
        copy(REPO_ROOT / rel, src / rel, **({"ignore": shutil.ignore_patterns("__pycache__", "*.egg-info")}
                                           if (REPO_ROOT / rel).is_dir() else {}))
    quiet = {**os.environ, "PYTHONWARNINGS": "ignore"}
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(top / "dist"), str(src)], check=True, env=quiet, capture_output=True, timeout=300)
    wheel = next((top / "dist").glob("deevnet_image_factory-*.whl"))
    venv = top / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.run([str(venv / "bin/python"), "-c", purelib], check=True, capture_output=True,
                               text=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, env=quiet, capture_output=True, timeout=300)
    print(f"wheel built and installed in {time.monotonic() - t0:.1f} s")
    return venv / "bin"


VAULT_PASSWORD = "correct horse battery"  # noqa: S105 - the test's own vault


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """An operator's site directory: the example site's inventory (group_vars/, host_vars/) and the catalogue,
    with pve-tenant's token secret kept as an inline ansible-vault value, its password in a 0600 file."""
    from ansible.parsing.vault import VaultLib, VaultSecret

    inventory = tmp_path / "site/ansible/inventory"
    shutil.copytree(REPO_ROOT / "ansible/inventory", inventory)
    assert (inventory / "group_vars").is_dir() and (inventory / "host_vars").is_dir()
    (tmp_path / "site/packer").mkdir()
    # the whole catalogue, the builder image too (it carries the factory's wheel, built from a checkout: this site
    # runs the installed wheel, docs/images.md)
    shutil.copy2(REPO_ROOT / "packer/images.yml", tmp_path / "site/packer/images.yml")
    secret = VaultLib([("default", VaultSecret(VAULT_PASSWORD.encode()))]).encrypt("0123-token-uuid").decode()
    host_vars = inventory / "host_vars/pve-tenant.yml"
    text = host_vars.read_text()
    assert "  token_secret_env: PVE_TENANT_TOKEN_SECRET\n" in text
    vaulted = "  token_secret: !vault |\n" + "".join(f"    {line}\n" for line in secret.splitlines())
    host_vars.write_text(text.replace("  token_secret_env: PVE_TENANT_TOKEN_SECRET\n", vaulted))
    password = tmp_path / "vault-password"
    password.write_text(VAULT_PASSWORD + "\n")
    password.chmod(0o600)
    return tmp_path / "site"


def _run(bindir: Path, site: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INVOKE_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the build extra's tools
    env["HOME"] = str(site.parent)
    env["ANSIBLE_VAULT_PASSWORD_FILE"] = str(site.parent / "vault-password")
    cwd = site.parent if "INVOKE_FACTORY_SITE_DIR" in env_extra else site
    return subprocess.run([str(bindir / "image-factory"), *args], cwd=cwd, env={**env, **env_extra},
                          capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)


def test_the_installed_command_runs_a_site_outside_the_repository(installed: Path, site: Path) -> None:
    where = subprocess.run([str(installed / "python"), "-c", "import image_factory; print(image_factory.__file__)"],
                           check=True, capture_output=True, text=True, cwd=site).stdout
    assert where.startswith(str(installed.parent)), f"not the wheel's copy: {where}"

    version = _run(installed, site, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"image-factory {image_factory.__version__}"
    helped = _run(installed, site, "--help")
    assert helped.returncode == 0 and "Usage: image-factory" in helped.stdout
    listed = _run(installed, site, "--list")
    assert "build.render" in listed.stdout and "inventory.check" in listed.stdout

    checked = _run(installed, site, "inventory.check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "fedora-44" in checked.stdout + checked.stderr
    assert "0123-token-uuid" not in checked.stdout + checked.stderr
    locked = _run(installed, site, "inventory.check", ANSIBLE_VAULT_PASSWORD_FILE="")
    assert locked.returncode == 2, locked.stdout + locked.stderr
    assert "pve.token_secret" in locked.stderr and "vault" in locked.stderr
    (site / "invoke.yaml").write_text("factory:\n  builds_dir: out\n")  # the site's own settings file
    named = _run(installed, site, "build.render", "--image", "debian-lab", "--no-validate",
                 INVOKE_FACTORY_SITE_DIR=str(site))  # from elsewhere, the site named by the setting
    assert named.returncode == 0, named.stdout + named.stderr
    assert (site / "out/debian-lab/debian-lab.pkr.hcl").is_file()
    (site / "invoke.yaml").unlink()

    builders = [k for k, v in yaml.safe_load((site / "packer/images.yml").read_text())["images"].items()
                if v.get("factory")]
    assert builders, "the catalogue has an image that carries the factory"
    t0 = time.monotonic()
    rendered = _run(installed, site, "build.render", "--all")
    print(f"build.render --all from the wheel: {time.monotonic() - t0:.1f} s")
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    for name in builders:  # --all renders the rest and says why it left these out
        assert f"{name}: skipped: an image with factory: true" in " ".join((rendered.stdout + rendered.stderr).split())
        assert not (site / "builds" / name).exists()
    alone = _run(installed, site, "build.render", "--image", builders[0], "--no-validate")
    assert alone.returncode != 0 and "build it from a git clone of the factory" in alone.stdout + alone.stderr
    hcl = site / "builds/fedora-44/fedora-44.pkr.hcl"
    assert "rendered and valid" in rendered.stdout + rendered.stderr and hcl.is_file()
    data = installed.parent / "lib"
    assert str(data) in hcl.read_text(), "the playbook and roles come from the installed package"
    assert not (site / "builds/fedora-44").is_relative_to(REPO_ROOT)
