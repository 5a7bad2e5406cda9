"""The seal's boot-entry step (ansible/roles/seal): its own shell, run against a scratch tree laid out as a
Fedora build leaves /boot and /etc (a cloud image's vendor entry, the build VM's entries, a rescue entry,
grubenv), with grub2-editenv and uname standing in for the guest's. Fedora's kernel-install itself is
exercised on a booted clone by tests/image/test_fedora.py."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from image_factory.settings import REPO_ROOT

pytestmark = pytest.mark.unit

STEP = "Name every boot entry after one fixed token kernel-install keeps using (Fedora)"
BUILD_MID = "1" * 32
VENDOR_MID = "2" * 32
OLD, NEW = "6.17.1-300.fc45.x86_64", "6.17.7-300.fc45.x86_64"

FAKE_EDITENV = """#!/bin/sh
# grub2-editenv FILE list|set NAME=VALUE, on $GRUBENV (FILE is "-": the default grubenv)
case "$2" in
  list) cat "$GRUBENV" ;;
  set) name=${3%%=*}; grep -v "^$name=" "$GRUBENV" > "$GRUBENV.new" || true
       printf '%s\\n' "$3" >> "$GRUBENV.new"; mv "$GRUBENV.new" "$GRUBENV" ;;
  *) exit 2 ;;
esac
"""


def seal_script(root: Path) -> str:
    tasks = yaml.safe_load((REPO_ROOT / "ansible/roles/seal/tasks/main.yml").read_text())
    script = next(t["ansible.builtin.shell"] for t in tasks if t.get("name") == STEP)
    return re.sub(r"(?<![\w.])/(boot|etc)/", rf"{root}/\1/", script)


def lay_out(tmp: Path, entries: list[str], saved: str | None, machine_info: str = "") -> Path:
    root = tmp / "root"
    (root / "boot/loader/entries").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc/machine-id").write_text(BUILD_MID + "\n")
    if machine_info:
        (root / "etc/machine-info").write_text(machine_info)
    for name in entries:
        version = name.split("-", 1)[1].removesuffix(".conf")
        (root / "boot/loader/entries" / name).write_text(f"title Fedora ({version})\nversion {version}\n"
                                                          f"linux /vmlinuz-{version}\n")
    for rescue in ("vmlinuz-0-rescue-" + BUILD_MID, "initramfs-0-rescue-" + BUILD_MID + ".img"):
        (root / "boot" / rescue).write_text("x")
    (root / "grubenv").write_text(f"saved_entry={saved}\nboot_success=0\n" if saved else "boot_success=0\n")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "grub2-editenv").write_text(FAKE_EDITENV)
    (bin_dir / "uname").write_text(f"#!/bin/sh\necho {NEW}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return root


def run_seal(tmp: Path, root: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{tmp / 'bin'}:/usr/bin:/bin", "GRUBENV": str(root / "grubenv")}
    return subprocess.run(["/bin/bash", "-c", seal_script(root)], env=env, capture_output=True, text=True)


def saved_entry(root: Path) -> str | None:
    m = re.search(r"^saved_entry=(.*)$", (root / "grubenv").read_text(), re.MULTILINE)
    return m[1] if m else None


# (case, entries before, saved_entry before, /etc/machine-info before, saved_entry's kernel after)
CASES = [
    ("cloud image: the vendor's kernel and the update's", [f"{VENDOR_MID}-{OLD}.conf", f"{BUILD_MID}-{NEW}.conf",
                                                           f"{BUILD_MID}-0-rescue.conf"], f"{BUILD_MID}-{NEW}", "",
     NEW),
    ("cloud image without updates: saved_entry on the vendor's entry", [f"{VENDOR_MID}-{OLD}.conf"],
     f"{VENDOR_MID}-{OLD}", "", OLD),
    ("iso install", [f"{BUILD_MID}-{NEW}.conf", f"{BUILD_MID}-0-rescue.conf"], f"{BUILD_MID}-{NEW}", "", NEW),
    ("saved_entry naming no entry", [f"{BUILD_MID}-{NEW}.conf"], "gone-entry", "", NEW),
    ("machine-info with other settings", [f"{BUILD_MID}-{NEW}.conf"], f"{BUILD_MID}-{NEW}",
     'PRETTY_HOSTNAME="x"\nKERNEL_INSTALL_MACHINE_ID=not-an-id\n', NEW),
    ("no saved_entry", [f"{BUILD_MID}-{NEW}.conf"], None, "", None),
]


@pytest.mark.parametrize(("case", "entries", "saved", "machine_info", "default"), CASES, ids=[c[0] for c in CASES])
def test_every_entry_gets_the_one_token_kernel_install_reads(
        tmp_path: Path, case: str, entries: list[str], saved: str | None, machine_info: str,
        default: str | None) -> None:
    root = lay_out(tmp_path, entries, saved, machine_info)
    done = run_seal(tmp_path, root)
    assert done.returncode == 0, done.stderr
    token = (root / "etc/kernel/entry-token").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{32}", token) and token not in (BUILD_MID, VENDOR_MID)
    info = (root / "etc/machine-info").read_text().splitlines()
    assert [line for line in info if line.startswith("KERNEL_INSTALL_MACHINE_ID=")] == \
        [f"KERNEL_INSTALL_MACHINE_ID={token}"]
    if "PRETTY_HOSTNAME" in machine_info:
        assert 'PRETTY_HOSTNAME="x"' in info
    kernels = sorted({e.split("-", 1)[1] for e in entries if "rescue" not in e})
    assert sorted(p.name for p in (root / "boot/loader/entries").iterdir()) == [f"{token}-{k}" for k in kernels]
    assert not list((root / "boot").glob("*rescue*"))
    assert saved_entry(root) == (f"{token}-{default}" if default else None)

    again = run_seal(tmp_path, root)  # a second seal (a re-run) keeps the token and changes nothing
    assert again.returncode == 0, again.stderr
    assert (root / "etc/kernel/entry-token").read_text().strip() == token
    assert sorted(p.name for p in (root / "boot/loader/entries").iterdir()) == [f"{token}-{k}" for k in kernels]


def test_a_saved_entry_with_no_kernel_to_fall_back_on_stops_the_seal(tmp_path: Path) -> None:
    root = lay_out(tmp_path, [f"{BUILD_MID}-{OLD}.conf"], "gone-entry")
    done = run_seal(tmp_path, root)
    assert done.returncode != 0 and "saved_entry: no boot entry" in done.stderr
