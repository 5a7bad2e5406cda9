"""Shared pytest configuration: markers are declared in pyproject.toml."""

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings

from image_factory.lab.aptrepo import serve_files

# Property tests assert behaviour, never speed: Hypothesis' default 200 ms deadline per example turns a loaded
# machine into a failure (test_mac's allocation property took 771 ms at load 16). No deadline, for every test.
hypothesis_settings.register_profile("factory", deadline=None)
hypothesis_settings.load_profile("factory")

# The two-hypervisor lab: fixtures `lab` (session) and `fresh_lab` (function), with fault hooks.
pytest_plugins = ["image_factory.lab.pytest_plugin"]


# ------------------------------------------------------------------ the whole suite on the machine's cores

WORKERS_ENV = "FACTORY_TEST_WORKERS"
MAX_WORKERS = 4  # each worker may boot a TCG guest (1-2 GiB, one busy core): more than 4 only queue on the CPU
UNLISTED_COST = 0.2  # seconds: about what a unit test takes; orders the module units by their size

# Wall seconds of the long tests on a quiet 2-core machine (the parallel CI run's --durations, 2026-12-06: two
# guests share the two cores). A parallel run
# starts them first, each on its own, spread over the workers, and fills the gaps with the module units. A new
# test above ~10 s belongs here; a stale entry only loses its place in the order.
COSTS: dict[str, float] = {
    "tests/e2e/test_build_e2e.py::test_xfs_variant_builds_passes_its_image_test_and_the_offline_checks": 407,
    "tests/lab/test_firmware_lab.py::test_a_clone_of_a_secure_boot_vtpm_template_boots_with_secure_boot_enabled_and_a_tpm":
        107,
    "tests/e2e/test_nightly_e2e.py::test_four_nights_against_a_repository_the_test_controls": 1138,
    # measured at load 5 (other helpers' runs); the like boot above took 107 s on a quiet machine
    "tests/lab/test_own_efi_vars_lab.py::test_a_clone_of_a_microsoft_2023_template_boots_with_secure_boot_and_only_the_2023_cas":
        285,
    "tests/e2e/test_build_e2e.py::test_release_build_applies_the_updates_and_boots_their_kernel": 570,
    "tests/e2e/test_build_e2e.py::test_real_build_cache_hit_and_force": 341,
    "tests/e2e/test_build_e2e.py::test_uefi_build_boots_under_ovmf_and_passes_its_image_test": 436,
    # measured at a load average of 6-8 (other sessions' guests on the two cores): publish, deploy, one real boot
    "tests/e2e/test_secure_boot_e2e.py::test_a_clone_of_the_built_secure_boot_vtpm_fixture_boots_as_its_image_test_did":
        234,
    "tests/e2e/test_pipeline_e2e.py::test_whole_path_against_the_two_host_lab": 228,
    "tests/e2e/test_imagetest.py::test_broken_image_fails_exactly_the_expected_tests": 159,
    "tests/lab/test_lab_vm.py::test_static_ip_and_second_nic_as_jump01_has_them": 122,
    "tests/lab/test_deploy_lab.py::test_really_booted_guest_has_its_inventory_mac": 112,
    "tests/e2e/test_imagetest.py::test_base_image_passes_common_and_hygiene": 161,
    "tests/lab/test_lab_vm.py::test_started_vm_boots_and_answers_ssh_with_its_inventory_mac": 95,
    "tests/unit/test_packaging.py::test_the_installed_command_runs_a_site_outside_the_repository": 13,
    # measured at load 8 on 2 cores (20 s when the machine was quieter)
    "tests/lab/test_publish_delta.py::test_v2_is_sent_as_a_delta_and_a_corrupted_base_falls_back_to_the_full_image": 40,
}


def default_workers() -> int:
    """Workers for a whole-suite run: $FACTORY_TEST_WORKERS, else one per core up to MAX_WORKERS; 0 is serial."""
    raw = os.environ.get(WORKERS_ENV, "").strip()
    if raw:
        if not raw.isdigit():
            raise pytest.UsageError(f"{WORKERS_ENV}={raw!r}: not a number of workers (0 runs the tests serially)")
        return int(raw)
    cores = len(os.sched_getaffinity(0))
    return min(cores, MAX_WORKERS) if cores > 1 else 0


# Long tests that share a session fixture join one work unit, so one worker runs them one after the other and the
# second reuses what the first made (tests/e2e/conftest.py's uefi_fixture: one build, one image test boot) instead
# of another worker making it again. Test -> the listed test whose unit it joins.
SHARED_UNITS: dict[str, str] = {
    "tests/e2e/test_secure_boot_e2e.py::test_a_clone_of_the_built_secure_boot_vtpm_fixture_boots_as_its_image_test_did":
        "tests/e2e/test_build_e2e.py::test_uefi_build_boots_under_ovmf_and_passes_its_image_test",
}


def work_unit(nodeid: str) -> str:
    """What one worker runs in one go: a listed long test alone (with the tests that share its fixtures,
    SHARED_UNITS), else the test's whole module (its module fixtures are set up once)."""
    nodeid = SHARED_UNITS.get(nodeid, nodeid)
    return nodeid if nodeid in COSTS else nodeid.split("::", 1)[0]


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """The whole suite (no test paths given: `./dev test`) runs on default_workers(); a developer naming a file or
    a test runs it in this process, with no worker start-up. `-n N` chooses, `-n 0` is serial. Without an
    explicit --dist, a parallel run hands out work units (work_unit), costliest first."""
    # pytest's capture imports readline, and readline exports COLUMNS and LINES at the C level, not into os.environ:
    # workers and subprocesses would start with COLUMNS=80 where this process has none (console.py sizes its
    # output by it). What os.environ does not hold leaves the C environment too.
    for name in ("COLUMNS", "LINES"):
        if name not in os.environ:
            os.unsetenv(name)
    option = config.option
    if not hasattr(option, "numprocesses") or hasattr(config, "workerinput"):
        return  # -p no:xdist, or inside a worker
    if option.numprocesses is None:
        whole_suite = config.args_source == pytest.Config.ArgsSource.TESTPATHS
        if not whole_suite or option.collectonly or option.usepdb:
            return
        option.numprocesses = default_workers()
        if not option.numprocesses:
            return
        option.tx = ["popen"] * option.numprocesses
    distribution_given = any(arg.split("=", 1)[0] in ("--dist", "-d", "--distload")
                             for arg in config.invocation_params.args)
    if option.numprocesses and not distribution_given:
        option.dist = "loadscope"  # by work unit: see pytest_xdist_make_scheduler
        option.loadscopereorder = False  # keep the costliest-first order the workers collect in
        option.factory_work_units = True


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if not getattr(config.option, "factory_work_units", False):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return WorkUnits(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """A worker parses the command line it was given, not the choices made above: tell it."""
    node.workerinput["factory_work_units"] = getattr(node.config.option, "factory_work_units", False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a worker of a parallel run: the tests in work units, costliest unit first (ties keep their order), so
    the long boots start at once and the short units fill the gaps until the workers end together. Every worker
    computes the same order from the same collection, as xdist requires."""
    if not getattr(config, "workerinput", {}).get("factory_work_units"):
        return
    units: dict[str, list[pytest.Item]] = {}
    for item in items:
        units.setdefault(work_unit(item.nodeid), []).append(item)
    ordered = sorted(units.values(), key=lambda members: -sum(COSTS.get(i.nodeid, UNLISTED_COST) for i in members))
    items[:] = [item for members in ordered for item in members]


@pytest.fixture
def greeter() -> Iterator[Callable[[bytes], int]]:
    """Start loopback TCP servers that send a fixed greeting to every client; returns their ports."""
    servers: list[socket.socket] = []

    def start(payload: bytes) -> int:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        servers.append(srv)

        def serve() -> None:
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                with conn:
                    conn.sendall(payload)

        threading.Thread(target=serve, daemon=True).start()
        return int(srv.getsockname()[1])

    yield start
    for srv in servers:
        srv.close()


FinalNameWatch = Callable[[Path, int], contextlib.AbstractContextManager[list[int]]]


@pytest.fixture
def watch_final_name() -> FinalNameWatch:
    """While the block runs, poll a file that must only ever exist complete; yields the other sizes seen."""

    @contextlib.contextmanager
    def watch(final: Path, size: int) -> Iterator[list[int]]:
        bad: list[int] = []
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                try:
                    seen = final.stat().st_size
                    if seen != size:
                        bad.append(seen)
                except FileNotFoundError:
                    pass
                time.sleep(0.002)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        try:
            yield bad
        finally:
            stop.set()
            watcher.join()

    return watch


@pytest.fixture
def small_tmpfs() -> Iterator[Callable[[Path, int], Path]]:
    """Mount a tmpfs of the given MiB at a directory (made if missing): a small real filesystem for full-disk
    tests. Skips where mounting is not allowed; everything mounted is unmounted afterwards."""
    import subprocess

    mounted: list[Path] = []

    def mount(where: Path, mib: int) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0777", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


# ------------------------------------------------------------------ a loopback HTTP(S) server for unit tests

@pytest.fixture
def loopback_http() -> Any:
    """``with loopback_http(files[, cert_and_key=(cert, key)]) as base_url:`` serves path -> body (404 otherwise)."""
    return serve_files



def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C as a terminal gives it, in this process and the children its tests start (exec resets a handler to the
    default, but keeps an ignored signal ignored): a suite started in the background of a non-interactive shell (a
    CI runner's `cmd &`) has SIGINT ignored from birth, which Python keeps, and then the Ctrl-C tests' interrupt,
    and the SIGINT the build sends a stand-in packer, would do nothing."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
