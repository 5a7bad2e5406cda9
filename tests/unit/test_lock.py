"""requirements/*.txt lock every dependency pyproject.toml declares, at a version its specifier accepts, on
every Python the project supports: a dependency added or a floor raised without `./dev lock` fails here,
not on a runner that installs from the lock."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from image_factory.settings import REPO_ROOT

pytestmark = pytest.mark.unit

LOCKED = re.compile(r"^([A-Za-z0-9._-]+)==([^ ;\\]+)(?: ; ([^\\]+?))?\s*\\?$", re.M)
PYTHONS = ("3.11", "3.12", "3.13", "3.14")


def _locked(profile: str) -> dict[str, list[tuple[Version, Marker | None]]]:
    pins: dict[str, list[tuple[Version, Marker | None]]] = {}
    for name, version, marker in LOCKED.findall((REPO_ROOT / f"requirements/{profile}.txt").read_text()):
        pins.setdefault(canonicalize_name(name), []).append((Version(version), Marker(marker) if marker else None))
    return pins


def _declared(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


@pytest.mark.parametrize(("profile", "extras"), [("build", ("build",)), ("dev", ("build", "dev", "lab"))])
@pytest.mark.parametrize("python", PYTHONS)
def test_the_lock_satisfies_every_declared_dependency(profile: str, extras: tuple[str, ...], python: str) -> None:
    env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
           "platform_python_implementation": "CPython", "implementation_name": "cpython", "extra": ""}
    pins = _locked(profile)
    wrong = []
    for req in _declared(extras):
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        chosen = [v for v, when in pins.get(canonicalize_name(req.name), []) if when is None or when.evaluate(env)]
        if len(chosen) != 1 or not req.specifier.contains(chosen[0], prereleases=True):
            wrong.append(f"{req} -> {chosen or 'not locked'}")
    assert not wrong, f"requirements/{profile}.txt is stale for Python {python} (run ./dev lock): {wrong}"


def test_the_build_lock_holds_no_developer_tool() -> None:
    """The nightly installs requirements/build.txt: linters and the lab's fake PVE stay out of production."""
    assert not {"ruff", "mypy", "fakepve", "hypothesis", "import-linter"} & set(_locked("build"))
