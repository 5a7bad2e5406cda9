"""The API transport: ``POST /nodes/{node}/storage/{storage}/upload`` with ``content=import`` and PVE's own
sha256 check, streamed as multipart with a Content-Length through the client's verified session.

upload.upload_api is its entry point (it imports this module only when an API upload happens).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import requests
from requests_toolbelt import MultipartEncoder, MultipartEncoderMonitor

from image_factory.errors import TlsVerificationFailed
from image_factory.pve.client import ApiError, PveClient
from image_factory.pve.upload_remote import UploadError

Progress = Callable[[int], None]


def send(client: PveClient, storage: str, final: str, local: Path, sha256: str, *,
         progress: Progress | None, timeout: float) -> int:
    """Stream the file to PVE's upload endpoint and wait for its task; returns the bytes sent."""
    url, call = client.upload_endpoint(storage)
    size = local.stat().st_size
    last = 0

    def tick(mon: MultipartEncoderMonitor) -> None:
        nonlocal last
        last = mon.bytes_read
        if progress:
            progress(min(last, size))

    with local.open("rb") as fh:
        encoder = MultipartEncoder(
            fields=[
                ("content", "import"),
                ("checksum-algorithm", "sha256"),
                ("checksum", sha256),
                ("filename", (final, fh, "application/octet-stream")),
            ]
        )
        monitor = MultipartEncoderMonitor(encoder, tick)
        try:
            # Bypass ProxmoxHttpSession.request (it would re-wrap the body); the session keeps the
            # token auth and our verified-TLS adapter.
            resp = requests.Session.request(
                client.session, "POST", url, data=monitor,
                headers={"Content-Type": monitor.content_type, "Content-Length": str(monitor.len)},
                timeout=(30, timeout),
            )
        except requests.exceptions.SSLError as exc:
            raise TlsVerificationFailed(client.name, f"TLS verification of {client.api_url} failed: {exc}") from None
        except requests.exceptions.RequestException as exc:
            raise UploadError(client.name, f"{call}: {exc}") from None
    if resp.status_code != 200:
        raise ApiError(client.name, call, resp.status_code, _pve_message(resp))
    upid = resp.json().get("data")
    if isinstance(upid, str) and upid.startswith("UPID:"):
        client.wait_task(upid, timeout=timeout)
    return last


def _pve_message(resp: requests.Response) -> str:
    """PVE's reason for a refused upload, with its per-field errors."""
    try:
        body = resp.json()
        message = str(body.get("message") or resp.reason).strip()
        if body.get("errors"):
            message += " " + "; ".join(f"{k}: {v}" for k, v in sorted(body["errors"].items()))
    except ValueError:
        message = resp.reason or resp.text[:300]
    return message
