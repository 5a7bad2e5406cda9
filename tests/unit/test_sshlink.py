"""sshlink.py: the parts that need no SSH server (the control link's socket)."""

from __future__ import annotations

import socket

import pytest

from image_factory.pve.sshlink import TCP_QUICKACK, PromptAcks

pytestmark = pytest.mark.unit


def _quickack_after_each_reply(adopt: bool) -> list[int]:
    """Request/reply over loopback TCP, as SSH's control traffic goes; the client's quick-ACK state after each."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname()[:2], timeout=5)
    peer, _ = server.accept()
    sock = PromptAcks.adopt(client) if adopt else client
    assert sock.gettimeout() == 5  # adopting keeps the socket's mode
    states = []
    try:
        for _ in range(6):
            sock.sendall(b"q")
            peer.recv(1)
            peer.sendall(b"r")
            assert sock.recv(1) == b"r"
            states.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK))
    finally:
        for s in (sock, peer, server):
            s.close()
    return states


@pytest.mark.skipif(TCP_QUICKACK is None, reason="TCP_QUICKACK is Linux's")
def test_the_control_link_acknowledges_every_read_at_once() -> None:
    # the kernel turns a request/reply connection to delayed ACKs (40 ms), which made sshd's Nagle hold back
    # the confirmation of the first channel: the plain socket shows the switch, the adopted one never makes it
    assert 0 in _quickack_after_each_reply(adopt=False)
    assert _quickack_after_each_reply(adopt=True) == [1] * 6
