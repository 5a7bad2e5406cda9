"""Shared pytest configuration: markers are declared in pyproject.toml."""

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

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
