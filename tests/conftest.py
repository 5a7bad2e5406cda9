"""Shared pytest configuration: markers are declared in pyproject.toml."""

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from image_factory.lab.aptrepo import serve_files

# The two-hypervisor lab: fixtures `lab` (session) and `fresh_lab` (function), with fault hooks.
pytest_plugins = ["image_factory.lab.pytest_plugin"]


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
