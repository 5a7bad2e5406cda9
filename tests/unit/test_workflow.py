"""The nightly workflow as GitHub reads it: valid against the workflow schema (check-jsonschema's vendored copy),
actions pinned to commits, the build set installed from its lock, secrets only on the steps that use them,
and no empty matrix."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from image_factory.settings import REPO_ROOT

pytestmark = pytest.mark.unit

NIGHTLY = REPO_ROOT / ".github/workflows/nightly.yml"


def _workflow() -> dict:
    return yaml.safe_load(NIGHTLY.read_text())


def test_the_workflow_is_valid_for_github() -> None:
    exe = Path(sys.executable).parent / "check-jsonschema"
    proc = subprocess.run([str(exe), "--builtin-schema", "vendor.github-workflows", str(NIGHTLY)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actions_are_pinned_to_commits_with_their_release_named() -> None:
    uses = re.findall(r"uses:\s*(\S+)(.*)", NIGHTLY.read_text())
    assert uses
    for action, rest in uses:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", action), action
        assert re.search(r"#\s*v\d+\.\d+\.\d+", rest), f"{action}: name the release in a comment"


def test_jobs_install_the_build_lock_and_secrets_reach_only_their_steps() -> None:
    jobs = _workflow()["jobs"]
    for name, job in jobs.items():
        assert "secrets." not in str(job.get("env", {})), f"{name}: a job-wide secret reaches pip and every step"
        steps = job["steps"]
        setup = [s for s in steps if "./dev setup" in s.get("run", "")]
        assert [s["run"] for s in setup] == ["./dev setup build"], name
        assert "secrets." not in str(setup[0].get("env", {}))
        for step in steps:
            for value in step.get("env", {}).values():
                if "secrets." in str(value):
                    assert "invoke" in step.get("run", "") or "printf" in step.get("run", ""), step["name"]


def test_an_empty_image_list_skips_the_image_job() -> None:
    image = _workflow()["jobs"]["image"]
    assert "needs.plan.outputs.images != '[]'" in image["if"]


def test_every_step_that_reads_the_inventory_can_open_its_vaulted_secrets() -> None:
    """A site keeping token secrets in ansible-vault: the password (a secret) is written once per job, before
    the first step that reads the inventory; those steps get only the file's path (through $GITHUB_ENV)."""
    for name, job in _workflow()["jobs"].items():
        steps = job["steps"]
        vault = [i for i, s in enumerate(steps) if "secrets.ANSIBLE_VAULT_PASSWORD" in str(s.get("env", {}))]
        readers = [i for i, s in enumerate(steps) if "invoke" in s.get("run", "")]
        assert len(vault) == 1 and readers and vault[0] < min(readers), name
        script = steps[vault[0]]["run"]
        assert "umask 077" in script and "$RUNNER_TEMP/" in script and "ANSIBLE_VAULT_PASSWORD_FILE=" in script
        assert "$GITHUB_ENV" in script and "ANSIBLE_VAULT_PASSWORD\" >> \"$GITHUB_ENV" not in script, name
