"""The layering is a contract (pyproject.toml, [tool.importlinter]; docs/architecture.md)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from image_factory.settings import REPO_ROOT

pytestmark = pytest.mark.unit


def test_import_contracts_are_kept() -> None:
    exe = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(exe), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "broken" in proc.stdout and " 0 broken" in proc.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    ("deploy/act.py", "from ..lab import controller", "image_factory.deploy.act -> image_factory.lab"),
    ("deploy/decide.py", "from ..pve import client", "image_factory.deploy.decide -> image_factory.pve.client"),
    ("deploy/desired.py", "from . import act", "image_factory.deploy.desired -> image_factory.deploy.act"),
])
def test_a_broken_layer_breaks_the_contract(tmp_path: Path, module: str, line: str, broken: str) -> None:
    """The same check on a copy of the package with one import that breaks a layer: it must fail."""
    import shutil

    pkg = tmp_path / "src" / "image_factory"
    shutil.copytree(REPO_ROOT / "src" / "image_factory", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    target = pkg / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    exe = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(exe), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(tmp_path / "src"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0, proc.stdout
    assert broken in proc.stdout.replace("\n", " "), proc.stdout[-3000:]


def test_every_module_has_a_layer_and_is_held_apart_from_the_lab() -> None:
    """A module missing from the contracts would be checked by neither: each must be named in both."""
    import tomllib

    contracts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layered = {m.strip() for c in contracts[:1] for layer in c["layers"] for m in layer.split("|")}
    kept_apart = {m for c in contracts if c.get("forbidden_modules") == ["image_factory.lab"]
                  for m in c["source_modules"]}
    src = REPO_ROOT / "src" / "image_factory"
    modules = {f"image_factory.{p.stem if p.is_file() else p.name}" for p in src.iterdir()
               if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert modules - layered == set()
    assert modules - kept_apart - {"image_factory.lab", "image_factory.tasks", "image_factory.cli"} == set()


# Privilege checks name ACL paths, which look like API paths but are no calls.
ACL_PATHS = {("access.py", 'need[f"/nodes/{hv.node}"] = list(NODE_PRIVILEGES)')}
API_PATH = re.compile(r"""["'](/nodes/|/cluster/|/access/|/version|/api2/)|node_path\}/""")


def test_no_stage_builds_an_api_path() -> None:
    """The PVE client (pve/client.py) is the one place that knows the API's paths; stages call its verbs."""
    src = REPO_ROOT / "src" / "image_factory"
    offenders = []
    for path in sorted(src.rglob("*.py")):
        if path.relative_to(src).as_posix() == "pve/client.py" or "lab" in path.relative_to(src).parts:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0].strip()
            if API_PATH.search(code) and (path.name, code) not in ACL_PATHS and not code.startswith(('"', "'")):
                offenders.append(f"{path.relative_to(src)}:{number}: {code}")
    assert offenders == []


def test_the_api_path_check_would_see_one() -> None:
    assert API_PATH.search('client.get(f"{client.node_path}/qemu/{vmid}/status/current")')
    assert API_PATH.search('client.get("/cluster/resources", type="vm")')
    assert not API_PATH.search('need[f"/storage/{sid}"]')


def test_citations_resolve_inside_the_repository() -> None:
    """Comments cite docs/ (kept in the repository), never a team folder a clone does not have."""
    cited = re.compile(r"\b(docs/[\w./-]+\.md)")
    outside = re.compile(r"(\.\./)?shared/[\w-]+\.md")
    problems = []
    for path in sorted((REPO_ROOT / "src").rglob("*.py")) + sorted((REPO_ROOT / "ansible").rglob("*.yml")):
        text = path.read_text(encoding="utf-8")
        problems += [f"{path.relative_to(REPO_ROOT)}: cites {m.group(0)}" for m in outside.finditer(text)]
        problems += [f"{path.relative_to(REPO_ROOT)}: {doc} does not exist" for doc in set(cited.findall(text))
                     if not (REPO_ROOT / doc).is_file()]
    assert problems == []


MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60  # from `def` to its last line, decorators excluded

# A module ("path") or function ("path::Qualified.name") allowed past the limits, and why (none today: #33 split
# the last ones). An entry that is no longer needed fails test_size_exceptions_are_still_needed.
SIZE_EXCEPTIONS: dict[str, str] = {}


def _sizes(src: Path) -> dict[str, int]:
    """Lines of every module (by its path under src) and every function (path::qualified name) in src."""
    sizes: dict[str, int] = {}

    def visit(node: ast.AST, where: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    # lineno is the `def` line: decorators sit above it
                    sizes[f"{where}::{name}"] = (child.end_lineno or child.lineno) - child.lineno + 1
                visit(child, where, f"{name}.")
            else:
                visit(child, where, prefix)

    for path in sorted(src.rglob("*.py")):
        where = path.relative_to(src).as_posix()
        text = path.read_text(encoding="utf-8")
        sizes[where] = len(text.splitlines())
        visit(ast.parse(text), where, "")
    return sizes


def _oversized(sizes: dict[str, int]) -> dict[str, int]:
    return {name: n for name, n in sizes.items()
            if n > (MAX_FUNCTION_LINES if "::" in name else MAX_MODULE_LINES)}


def test_module_and_function_sizes() -> None:
    """No module over 600 lines, no function over 60, but the named exceptions (each with its reason)."""
    oversized = _oversized(_sizes(REPO_ROOT / "src" / "image_factory"))
    assert {name: n for name, n in oversized.items() if name not in SIZE_EXCEPTIONS} == {}


def test_size_exceptions_are_still_needed() -> None:
    """An exception outlives its reason only by mistake: one for a module or function now within the limits (or
    gone) must be removed."""
    oversized = _oversized(_sizes(REPO_ROOT / "src" / "image_factory"))
    assert sorted(set(SIZE_EXCEPTIONS) - set(oversized)) == []
    assert all(reason.strip() for reason in SIZE_EXCEPTIONS.values())


def test_the_size_check_sees_a_long_function_and_module(tmp_path: Path) -> None:
    """The measure itself: a decorated 61-line function counts 61, a nested one by its qualified name."""
    body = "\n".join(f"    x{i} = {i}" for i in range(59))
    (tmp_path / "big.py").write_text(
        "import functools\n\n\n@functools.cache\n@functools.wraps(len)\n"
        f"def long() -> None:\n{body}\n    return None\n\n\n"
        "class Outer:\n    def method(self) -> None:\n        def inner() -> None:\n            pass\n"
        + "\n" * 600
    )
    sizes = _sizes(tmp_path)
    assert sizes["big.py::long"] == 61
    assert sizes["big.py::Outer.method.inner"] == 2
    assert _oversized(sizes) == {"big.py::long": 61, "big.py": sizes["big.py"]}
    assert sizes["big.py"] > 600


def test_the_readme_links_the_architecture_and_it_names_every_room() -> None:
    """A newcomer starts at the README: it leads to the map of the code (docs/architecture.md), and the map names
    every top-level module and package of src/image_factory (a new room is drawn, or this fails)."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert re.search(r"\]\((\./)?docs/architecture\.md\)", readme)
    doc = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    src = REPO_ROOT / "src" / "image_factory"
    rooms = {p.stem if p.is_file() else p.name for p in src.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert rooms
    assert sorted(room for room in rooms if f"`{room}" not in doc) == []
