"""How `./dev test` spreads the suite (tests/conftest.py): the real pytest and pytest-xdist in a subprocess,
on a few small unit modules given as the suite's testpaths."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from image_factory.settings import REPO_ROOT

pytestmark = pytest.mark.unit

MODULES = ["tests/unit/test_files.py", "tests/unit/test_fanout.py", "tests/unit/test_console.py"]


def pytest_run(*args: str, workers: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FACTORY_TEST_WORKERS", "PYTEST_XDIST_WORKER")}
    if workers is not None:
        env["FACTORY_TEST_WORKERS"] = workers
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_the_whole_suite_runs_on_workers_by_module_and_a_named_file_in_this_process() -> None:
    whole = pytest_run("-o", f"testpaths={' '.join(MODULES)}", workers="2")
    assert whole.returncode == 0, whole.stdout[-3000:]
    assert "2 workers" in whole.stdout
    ran = re.findall(r"\[(gw\d)\] \[\s*\d+%\] PASSED (tests/unit/\S+?\.py)::", whole.stdout)
    assert {module for _, module in ran} == set(MODULES)
    for module in MODULES:  # a module's fixtures are set up once: all its tests on one worker
        assert len({worker for worker, m in ran if m == module}) == 1, (module, ran)

    named = pytest_run(MODULES[0])
    assert named.returncode == 0, named.stdout[-3000:]
    assert "workers" not in named.stdout and "[gw" not in named.stdout
    assert re.search(r"test_files\.py::\S+ PASSED", named.stdout)


def test_a_worker_count_that_is_not_a_number_is_named() -> None:
    run = pytest_run("-o", f"testpaths={MODULES[0]}", workers="two")
    assert run.returncode == 4
    assert "FACTORY_TEST_WORKERS='two': not a number of workers" in run.stderr
