"""Log lines where there is no terminal (CI, `./dev demo > file`)."""

from __future__ import annotations

import re

import pytest

from image_factory.console import Milestones
from image_factory.image.buildevents import BuildEvent
from image_factory.image.progress import LogLines

pytestmark = pytest.mark.unit
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def test_build_steps_and_ansible_tasks_become_timestamped_lines(capsys: pytest.CaptureFixture[str]) -> None:
    lines = LogLines("debian-lab")
    for kind, message in (
        ("step", "packer build (cloud mode, accelerator tcg)"),
        ("message", "    image: TASK [baseline : Apply the release's updates (Debian)] *********"),
        ("message", "    image: ok: [default]"),  # per-host results stay in the build log
        ("message", "    image: PLAY [Template baseline] ****"),
        ("error", "Build 'image' errored"),
    ):
        lines(BuildEvent(kind, message, 1.0))
    out = capsys.readouterr().err.splitlines()
    assert len(out) == 4, out
    assert re.fullmatch(STAMP + r" debian-lab: packer build \(cloud mode, accelerator tcg\)", out[0])
    assert out[1].endswith("debian-lab: ansible task: baseline : Apply the release's updates (Debian)")
    assert out[2].endswith("debian-lab: ansible play: Template baseline")
    assert out[3].endswith("debian-lab: error: Build 'image' errored")


def test_upload_progress_is_a_line_per_quarter_per_host(capsys: pytest.CaptureFixture[str]) -> None:
    hook = Milestones()
    total = 400 * 2**20
    for done in (10, 120, 130, 260, 399, 400):
        hook("pve-mgmt", done * 2**20, total)
    hook("pve-tenant", total, total)
    out = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 1)[1] for line in out] == [
        "pve-mgmt: 120.0/400.0 MiB (30%)", "pve-mgmt: 260.0/400.0 MiB (65%)", "pve-mgmt: 399.0/400.0 MiB (99%)",
        "pve-mgmt: 400.0/400.0 MiB (100%)", "pve-tenant: 400.0/400.0 MiB (100%)"]


def test_emoji_codes_in_values_are_printed_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    """A certificate fingerprint holds ':ab:' (an emoji code to rich): printed as an emoji it is not the pin."""
    from rich.table import Table

    from image_factory.console import console, styled

    fingerprint = "06:AB:0A:6F:77:9E:86:F6"
    console.print(styled("[green]ok[/] verified with pinned fingerprint {}", fingerprint.lower()))
    table = Table()
    table.add_column("detail")
    table.add_row(f"pinned {fingerprint.lower()} :smile:")
    console.print(table)
    err = capsys.readouterr().err
    assert err.count(fingerprint.lower()) == 2 and ":smile:" in err, err
