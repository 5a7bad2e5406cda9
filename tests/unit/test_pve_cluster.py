"""A PVE cluster as a hypervisor entry: its API endpoints tried in order, its nodes read from /cluster/resources,
a node that is down reported as such (fakepve's three-node cluster: an offline node's calls get 595)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakepve.certs import make_cert
from fakepve.pytest_plugin import _Serving
from fakepve.server import FakePve
from pydantic import ValidationError

from image_factory.errors import RemoteError
from image_factory.pve.client import ApiError, PveClient
from image_factory.site.inventory import Hypervisor

pytestmark = pytest.mark.unit
TOKEN_ID = "factory@pve!image-factory"  # noqa: S105 - an id, not a secret
NODES = ("pve-c1", "pve-c2", "pve-c3")
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBIKjPbOcAwqThWzRa5Ex/b92J/o3wlQ7KdlVFOwg5BD"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[FakePve, str]]:
    cert, key, _ = make_cert(str(tmp_path), hosts=("127.0.0.1",))
    pve = FakePve(host="127.0.0.1", port=0)
    for node in NODES:
        pve.add_node(node)
    pve.nodes.pop("pve1", None)
    pve.apitokens[TOKEN_ID] = "s3cret"
    serving = _Serving(pve, cert, key)
    try:
        yield pve, cert
    finally:
        serving.stop()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def entry(api_url: str, **more: Any) -> Hypervisor:
    return Hypervisor.model_validate({
        "name": "pve-cluster", "role": "tenant", "node": "pve-c1", "api_url": api_url,
        "token_id": TOKEN_ID, "token_secret_env": "UNUSED", "ssh": {"host": "127.0.0.1", "host_key": HOST_KEY},
        "template_vmids": {"first": 9000, "last": 9099}, "vm_vmids": {"first": 2000, "last": 2999}, **more})


def test_endpoints_are_tried_in_order_and_the_first_that_answers_serves(cluster: tuple[FakePve, str]) -> None:
    pve, cert = cluster
    down = f"https://127.0.0.1:{closed_port()}"
    up = f"https://127.0.0.1:{pve.port}"
    client = PveClient(entry(down, api_urls=[up], tls_ca_file=cert), secret="s3cret")  # noqa: S106 - the fake's
    assert client.version()["repoid"] == "fakepve"  # read over the second endpoint
    assert client.api_url == up
    upid = client.create_vm(vmid=2001, name="made-via-the-second", memory=512)  # a write not sent to the first
    assert upid and pve.vm(2001) is not None
    assert client.cluster_nodes() == dict.fromkeys(NODES, True)

    nobody = PveClient(entry(down, api_urls=[f"https://127.0.0.1:{closed_port()}"], tls_ca_file=cert),
                       secret="x")  # noqa: S106 - not a secret
    with pytest.raises(RemoteError, match="no API endpoint answers: cannot reach https://127.0.0.1:.*; cannot reach"):
        nobody.version()


def test_an_offline_node_is_reported_by_its_peers_and_its_own_calls_fail(cluster: tuple[FakePve, str]) -> None:
    pve, cert = cluster
    client = PveClient(entry(f"https://127.0.0.1:{pve.port}", tls_ca_file=cert), secret="s3cret")  # noqa: S106
    pve.set_node_offline("pve-c2")
    assert client.cluster_nodes() == {"pve-c1": True, "pve-c2": False, "pve-c3": True}
    with pytest.raises(ApiError) as err:
        client.get("/nodes/pve-c2/qemu")
    assert err.value.status == 595
    assert client.get("/nodes/pve-c3/qemu") == []  # the other nodes still answer
    pve.set_node_offline("pve-c2", offline=False)
    assert all(client.cluster_nodes().values())


@pytest.mark.parametrize(("more", "fragment"), [
    ({"api_urls": ["https://a:8006", "https://a:8006/"]}, "an endpoint is listed twice"),
    ({"api_urls": ["http://a:8006"]}, "must be 'https://host[:port]'"),
    ({"api_urls": ["https://pve-c1:8006"]}, "api_urls repeats api_url"),
    ({"api_urls": ["https://a:8006"], "tls_ca_file": None, "tls_fingerprint": ":".join(["AB"] * 32)},
     "api_urls needs tls_ca_file"),
])
def test_bad_endpoints_are_refused(more: dict[str, Any], fragment: str, tmp_path: Path) -> None:
    fields = {"tls_ca_file": str(tmp_path / "ca.pem"), **more}
    with pytest.raises(ValidationError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        entry("https://pve-c1:8006", **fields)
