"""Upload: pve-http-server's streamed multipart upload into a storage, checked as PVE checks it."""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web
from fakepve import PveError, TaskError
from fakepve.routing import param_error
from fakepve.server import USER, ok

from image_factory.lab.pve.base import (
    IMPORT_NAME,
    ISO_NAME,
    VZTMPL_NAME,
    LabNodeBase,
)

CHECKSUMS = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512")


@dataclass
class _Received:
    """What an upload request brought so far: its fields, and once the file part began, the staged file."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    staged: Path | None = None
    hasher: Any = None  # a hashlib object when a checksum was asked for

    def hash(self, data: bytes) -> None:
        if self.hasher is not None:
            self.hasher.update(data)

    def discard(self) -> None:
        if self.staged is not None:
            self.staged.unlink(missing_ok=True)

    async def append_late_part(self, request: web.Request, part: BodyPartReader) -> None:
        """pve-http-server writes everything up to the closing boundary into the file: a part after the file part
        ends up inside it."""
        assert self.staged is not None
        boundary = re.search(r'boundary="?([^";]+)', request.headers.get("Content-Type", ""))
        extra = (f"\r\n--{boundary[1] if boundary else ''}\r\nContent-Disposition: form-data; "
                 f'name="{part.name}"\r\n\r\n'.encode() + await part.read(decode=False))
        with self.staged.open("ab") as out:
            out.write(extra)
        self.hash(extra)


class Upload(LabNodeBase):  # a concern of LabPve (node.py)
    async def _read_body(self, request: web.Request) -> bytes:
        # Uploads are streamed by the upload handler itself, never read whole into memory.
        if request.method == "POST" and request.path.endswith("/upload"):
            return b""
        body: bytes = await super()._read_body(request)
        return body

    async def _upload(self, request: web.Request) -> web.Response:
        name, store = self._file_storage(request, "upload")
        user = request[USER]
        self.require(user, "/storage/" + name, "Datastore.AllocateTemplate")
        if "chunked" in request.headers.get("Transfer-Encoding", "").lower() or \
                request.headers.get("Content-Length") is None:
            raise PveError(400, "upload without Content-Length (chunked encoding) is not supported")
        if request.content_type != "multipart/form-data":
            raise PveError(400, "bad upload request - not multipart/form-data")
        received = _Received()
        try:
            await self._receive(request, received, store, name)
        except PveError:
            received.discard()
            raise
        except (ValueError, UnicodeDecodeError, ConnectionError, asyncio.IncompleteReadError) as exc:
            received.discard()
            raise PveError(400, f"bad upload request - {exc}") from None
        except OSError as exc:  # e.g. no space left in the staging directory (PVE's /var/tmp)
            received.discard()
            raise PveError(500, f"error writing upload to {received.staged}: {exc.strerror or exc}") from None
        if received.staged is None or received.filename is None:
            self._check_upload_fields(received.fields, None, store, name)
            raise param_error(filename="property is missing and it is not optional")
        return ok(await self._import_upload(user, store, received, received.staged, received.filename))

    async def _receive(self, request: web.Request, received: _Received, store: dict[str, Any], name: str) -> None:
        """The multipart body: the fields before the file part, the file part streamed into the staging file."""
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if received.staged is not None:
                await received.append_late_part(request, part)
            elif part.filename is not None:
                await self._stage_file(part, part.filename, received, store, name)
            else:
                received.fields[str(part.name)] = (await part.read(decode=False)).decode()

    async def _stage_file(self, part: BodyPartReader, given_name: str, received: _Received, store: dict[str, Any],
                          name: str) -> None:
        if part.name != "filename":
            raise PveError(500, f"wrong field name '{part.name}' for file upload, expected 'filename'")
        if len(given_name) > 255:
            raise param_error(filename="value may only be 255 characters long")
        self._check_field_order(list(received.fields))
        # PVE 8.4's upload endpoint rewrites every character outside [a-zA-Z0-9_.-] (+ and = too)
        received.filename = re.sub(r"[^a-zA-Z0-9_.-]", "_", Path(given_name).name)
        self._check_upload_fields(received.fields, received.filename, store, name)
        digest_algo = received.fields.get("checksum-algorithm")
        received.hasher = hashlib.new(digest_algo) if digest_algo else None
        self.spec.staging_dir.mkdir(parents=True, exist_ok=True)
        received.staged = self.spec.staging_dir / f"pveupload-{time.time_ns()}"
        with received.staged.open("wb") as out:
            while chunk := await part.read_chunk(1024 * 1024):
                out.write(chunk)
                received.hash(chunk)

    async def _import_upload(self, user: str, store: dict[str, Any], received: _Received, staged: Path,
                             filename: str) -> str:
        """The imgcopy task: the checksum checked, the staged file copied into the storage and removed."""
        content = received.fields["content"]
        expected = received.fields.get("checksum")
        got = received.hasher.hexdigest() if received.hasher is not None else None
        dest_dir = {"import": "import", "iso": "template/iso", "vztmpl": "template/cache"}[content]
        dest = Path(store["path"]) / dest_dir / filename
        size = staged.stat().st_size

        async def body() -> str | None:
            await self.duration("imgcopy")
            try:
                if expected is not None and got != expected.lower():
                    raise TaskError(f"checksum mismatch: got '{got}' != expect '{expected}'")
                # PVE copies (cp) the staged file into place and removes it afterwards: both copies exist
                # at once, twice the image where /var/tmp and the storage share a filesystem.
                await asyncio.to_thread(shutil.copyfile, str(staged), str(dest))
            except OSError as exc:
                dest.unlink(missing_ok=True)
                raise TaskError(f"copy '{staged}' to '{dest}' failed: {exc.strerror or exc}") from None
            finally:
                staged.unlink(missing_ok=True)
            return f"target file: {dest}"

        log_lines = [f"starting file import from: {staged}", f"target node: {self.spec.node}",
                     f"target file: {dest}", f"file size is: {size}"]
        if got is not None:
            log_lines.append("calculating checksum...OK, checksum verified" if got == (expected or "").lower()
                             else "calculating checksum...")
        upid: str = await self.task(self.spec.node, "imgcopy", "", user, body, log=log_lines)
        return upid

    @staticmethod
    def _check_field_order(names: list[str]) -> None:
        """pve-http-server's file_upload_multipart takes, before the file part, `content`, `checksum-algorithm`
        and `checksum` in this order, each at the head of what is left: a field out of order or of another name
        makes its Content-Disposition pattern span two parts, which it refuses (HTTP 500)."""
        expected = ["content", "checksum-algorithm", "checksum"]
        for name in names:
            if name not in expected:
                raise PveError(500, f"wrong Content-Disposition 'form-data; name=\"{name}\"' in multipart, "
                                    "expected 'form-data'")
            expected = expected[expected.index(name) + 1:]

    def _check_upload_fields(self, fields: dict[str, str], filename: str | None, store: dict[str, Any],
                             name: str) -> None:
        content = fields.get("content")
        errors: dict[str, str] = {}
        if content is None:
            errors["content"] = "property is missing and it is not optional"
        elif content not in ("iso", "vztmpl", "import"):
            errors["content"] = "value 'x' does not have a value in the enumeration 'iso, vztmpl, import'".replace(
                "'x'", f"'{content}'")
        algo = fields.get("checksum-algorithm")
        if algo is not None and algo not in CHECKSUMS:
            errors["checksum-algorithm"] = f"value '{algo}' does not have a value in the enumeration " \
                                           f"'{', '.join(CHECKSUMS)}'"
        if (algo is None) != (fields.get("checksum") is None):
            errors["checksum" if algo else "checksum-algorithm"] = \
                "'checksum' and 'checksum-algorithm' must be given together"
        if errors:
            raise PveError(400, "Parameter verification failed.", errors)
        if filename is not None:
            if content == "import" and not IMPORT_NAME.match(filename):
                raise param_error(filename="invalid filename or wrong extension")
            if content == "iso" and not ISO_NAME.match(filename):
                raise param_error(filename="wrong file extension")
            if content == "vztmpl" and not VZTMPL_NAME.match(filename):
                raise param_error(filename="wrong file extension")
        if content not in str(store.get("content", "")).split(","):
            raise PveError(500, f"storage '{name}' does not support '{content}' content")

