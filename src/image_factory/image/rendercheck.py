"""Validate rendered files with their real consumers: ksvalidator (the family's installer validator),
``packer init``/``fmt``/``validate`` and ansible-lint; a rejection is a RenderError quoting the tool."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

from image_factory import families
from image_factory.image.render import (
    ANSIBLE_DIR,
    PLUGIN_PACKER,
    PLUGIN_VERSIONS,
    REMOTE_CHECKSUM_RE,
    RenderError,
    RenderResult,
    ToolMissing,
    require_tool,
    tool_env,
    write_file,
)
from image_factory.settings import Settings


def ansible_env(settings: Settings) -> dict[str, str]:
    env = tool_env()
    env["ANSIBLE_CONFIG"] = str(settings.data / ANSIBLE_DIR / "ansible.cfg")
    env["ANSIBLE_ROLES_PATH"] = str(settings.data / ANSIBLE_DIR / "roles")
    return env


def _run_tool(cmd: list[str], what: str, cwd: Path, files_hint: str, env: dict[str, str] | None = None) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env or tool_env(), timeout=600)
    except subprocess.TimeoutExpired:
        raise RenderError(f"{what} timed out after 600 s ({files_hint})") from None
    if proc.returncode != 0:
        msg = (proc.stdout + proc.stderr).strip()
        raise RenderError(f"{what} rejected {files_hint} (exit {proc.returncode}):\n{msg}")


def _hcl_message_with_lines(msg: str, hcl: Path) -> str:
    """Packer 1.6 prints `on FILE line N: (source code not available)`; add the line itself."""
    lines = hcl.read_text(encoding="utf-8").splitlines()

    def add(m: re.Match[str]) -> str:
        n = int(m[2])
        src = lines[n - 1].strip() if 0 < n <= len(lines) else ""
        return f"{m[1]} line {n}:\n  {n}: {src}"

    return re.sub(r"(on \S+) line (\d+):\n\s*\(source code not available\)", add, msg)


def validate_kickstart(result: RenderResult) -> None:
    """The family's installer validator on the rendered installer file (and, for a kickstart, on it with the
    per-build include in place, as Anaconda sees it)."""
    installer = families.get(result.image.family).installer
    if result.kickstart is None or installer is None or installer.validator is None:
        return
    tool, *args = installer.validator
    exe = require_tool(tool)
    version = f"F{result.image.release}"

    def argv(path: Path) -> list[str]:
        return [exe, *(a.format(release=result.image.release, file=path) for a in args)]

    # pykickstart leaves a copy of every file it validates in $TMPDIR (its preprocess step), and the merged
    # one holds the build user's password hash and key: give it a private directory, removed afterwards.
    with tempfile.TemporaryDirectory(prefix="ksvalidator-") as scratch:
        env = {**tool_env(), "TMPDIR": scratch}
        _run_tool(argv(result.kickstart), f"ksvalidator -v {version}", result.out_dir, str(result.kickstart), env)
        if result.secret_dir is not None and installer.file_name.endswith(".cfg"):
            inc = result.secret_dir / "http" / installer.build_user_file
            merged = result.secret_dir / "merged.ks"
            text = result.kickstart.read_text(encoding="utf-8").replace(
                "%include /tmp/factory-build-user.ks", inc.read_text(encoding="utf-8"))
            write_file(merged, text, 0o600)
            try:
                _run_tool(argv(merged), f"ksvalidator -v {version}",
                          result.out_dir, f"{result.kickstart} with its per-build user include", env)
            finally:
                merged.unlink(missing_ok=True)


def packer_init(exe: str, result: RenderResult) -> None:
    """Packer >= 1.7 reads required_plugins: install the pinned qemu and ansible plugins (a no-op once they
    are there), before anything else reads the template. Packer 1.6 has both built in and no `init` for HCL."""
    if result.packer_version < PLUGIN_PACKER:
        return
    pins = ", ".join(f"{k} {v}" for k, v in PLUGIN_VERSIONS.items())
    proc = subprocess.run([exe, "init", result.hcl.name], cwd=result.out_dir, capture_output=True, text=True,
                          timeout=600, env=tool_env())
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise ToolMissing(
            f"packer init could not install the pinned plugins ({pins}) for {result.hcl}: "
            f"{detail[-1] if detail else 'exit ' + str(proc.returncode)}. Offline? Install them on a "
            "connected machine with `packer plugins install github.com/hashicorp/<name> <version>` and copy "
            "~/.config/packer/plugins (or set PACKER_PLUGIN_PATH)")


def validate_packer(result: RenderResult) -> None:
    exe = require_tool("packer")
    cwd = result.out_dir
    packer_init(exe, result)  # validate refuses a template whose plugins are not installed yet
    try:
        _run_tool([exe, "fmt", "-check", "-diff", result.hcl.name], "packer fmt -check", cwd, str(result.hcl))
        cmd = [exe, "validate", f"-var-file={result.var_file}"]
        ck = result.image.source.checksum
        local_ck = ck[len("file:"):] if ck.startswith("file:") and not REMOTE_CHECKSUM_RE.match(ck) else None
        if ck == "refresh" or REMOTE_CHECKSUM_RE.match(ck) or (
                local_ck is not None and result.inputs.get("source_checksum") == "missing"):
            # packer validate would download a remote checksum file (this machine must contact
            # nothing but loopback), fail on a local fixture not made yet, or on media not pinned yet:
            # validation checks everything else, and the build verifies the checksum (clear message).
            cmd.append("-var=source_checksum=none")
        _run_tool([*cmd, result.hcl.name], "packer validate", cwd, str(result.hcl))
    except RenderError as exc:
        raise RenderError(_hcl_message_with_lines(str(exc), result.hcl)) from None


def validate_ansible(settings: Settings, playbook: Path) -> None:
    exe = require_tool("ansible-lint")
    env_cfg = settings.data / ".ansible-lint"
    # An installed package has no .ansible-lint (a file at the repository's top): the same two settings as flags.
    cmd = [exe, "--nocolor", "-q", *(["-c", str(env_cfg)] if env_cfg.exists() else ["--offline", "--profile",
                                                                                     "production"])]
    _run_tool([*cmd, str(playbook)], "ansible-lint", settings.root, str(playbook), env=ansible_env(settings))


_lint_cache: dict[str, bool] = {}


def validate(result: RenderResult, settings: Settings) -> None:
    """Validate rendered files with their real consumers; raises RenderError with the tool's message."""
    validate_kickstart(result)
    validate_packer(result)
    playbook = settings.resolve(result.image.playbook)
    # ansible-lint is slow (seconds); lint each distinct playbook+roles state once per process.
    key = json.dumps({k: v for k, v in result.inputs.items() if k.startswith("input:ansible")}, sort_keys=True)
    key += str(playbook)
    if key not in _lint_cache:
        validate_ansible(settings, playbook)
        _lint_cache[key] = True
