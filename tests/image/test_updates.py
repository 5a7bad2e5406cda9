"""updates: the image carries every update its own package sources offer (a template that missed one
never publishes). Debian: the booted image's installed versions against the newest each suite of its
own sources offers, read from the suites' signed indexes on the test's side (image_factory.image.upstream).
Fedora: dnf itself, in the guest."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest

from image_factory.image.manifest import load
from image_factory.image.upstream import fetch_suite, offered_versions, parse_sources, pending_upgrades, suite_epoch
from image_factory.settings import REPO_ROOT

KEYS_DIR = REPO_ROOT / "packer" / "keys"


def _debian_sources(host: Any) -> tuple[str, list[str]]:
    listed = host.file("/etc/apt/sources.list")
    main = listed.content_string if listed.exists else ""
    found = host.run("find /etc/apt/sources.list.d -maxdepth 1 -name '*.sources' -o -maxdepth 1 -name '*.list'")
    extra: list[str] = []
    for path in found.stdout.split():
        text = host.file(path).content_string
        if path.endswith(".list"):
            main += "\n" + text
        else:
            extra.append(text)
    return main, extra


def test_no_pending_upgrades(host: Any, family: str | None, pytestconfig: pytest.Config) -> None:
    if family == "fedora":
        # exit 100: updates are available; 0: none. --refresh: never trust the build's cached metadata.
        result = host.run("dnf -q check-update --refresh")
        assert result.rc == 0, f"dnf check-update (exit {result.rc}):\n{result.stdout[-3000:]}"
        return
    if family != "debian":
        pytest.skip("needs --image-family")
    main, extra = _debian_sources(host)
    sources = parse_sources(main, extra)
    assert sources, "the image has no apt sources: it could never be updated"
    release = int(host.check_output(". /etc/os-release && echo ${VERSION_ID%%.*}"))
    arch = host.check_output("dpkg --print-architecture").strip()
    query = shlex.quote("${db:Status-Status}\\t${Package}\\t${Version}\\n")
    installed = [tuple(line.split("\t")[1:3]) for line in host.check_output(f"dpkg-query -W -f {query}").splitlines()
                 if line.startswith("installed\t")]
    states = {f"{s.uri} {s.suite}": fetch_suite(s, KEYS_DIR, release) for s in sources}
    offers = {name: offered_versions(state, arch) for name, state in states.items()}
    pending = pending_upgrades(installed, offers)
    # A suite the archive republished after the build read it (its signed InRelease is not the one the manifest
    # records) may offer what did not exist then: the next build takes it, as its fingerprint moved too.
    built_from = _recorded_suites(pytestconfig.getoption("artifact"))
    later = [p for p in pending if p.suite in built_from and built_from[p.suite] != suite_epoch(states[p.suite])]
    missed = [p for p in pending if p not in later]
    lines = [f"{p.package} {p.installed} -> {p.offered} ({p.suite})" for p in missed]
    assert missed == [], "pending upgrades:\n" + "\n".join(lines)
    if later:
        pytest.skip("published after the build read its suites (the next build takes them): " + ", ".join(
            f"{p.package} {p.offered} ({p.suite}: built from {built_from[p.suite]})" for p in later))


def _recorded_suites(artifact: str | None) -> dict[str, str]:
    """``<uri> <suite>`` -> the InRelease the build read, from the manifest beside the artifact."""
    m = load(Path(artifact).parent) if artifact else None
    inputs = m.inputs if m is not None else {}
    return {key.removeprefix("upstream:"): value for key, value in inputs.items() if key.startswith("upstream:")}
