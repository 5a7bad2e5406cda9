"""The Proxmox VE API client used by publish, deploy and preflight.

A thin layer over proxmoxer that adds what PVE needs and proxmoxer lacks (docs/pve-facts.md):
- TLS is always verified: with the node's CA file through an SSLContext that clears
  VERIFY_X509_STRICT (PVE CAs made before 2026 lack keyUsage), or by pinning the certificate's
  SHA-256 fingerprint, checked after the handshake and before any request byte is sent;
- the API token secret comes from the environment or a 0600 file outside the repo;
- a realistic HTTP timeout (proxmoxer's 5 s default is far too short);
- task polling on the node named inside the UPID, with a deadline, that treats
  ``WARNINGS: n`` as success and anything else as PVE's own error text;
- errors carry the host, the call and PVE's message.
"""

from __future__ import annotations

import contextlib
import copy
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from proxmoxer import ProxmoxAPI, ResourceException
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError

from image_factory.errors import RemoteError, TlsVerificationFailed
from image_factory.site.inventory import Hypervisor
from image_factory.site.secrets import read_secret
from image_factory.tls import VerifiedTlsAdapter, ssl_reason

DEFAULT_TIMEOUT = 60.0
TASK_LOG_LINES = 100_000
FIRST_POLL = 0.05
POLL_FRACTION = 0.1
LOCK_TIMEOUT_RE = re.compile(r"can't lock file .* got timeout")
# PVE's answer to a config update whose `digest` no longer matches (file changed by another writer)
CONFIG_CHANGED_RE = re.compile(r"checksum mismatch")
UPID_RE = re.compile(
    r"^UPID:(?P<node>[a-zA-Z0-9][a-zA-Z0-9.-]*):(?P<pid>[0-9A-Fa-f]{8}):(?P<pstart>[0-9A-Fa-f]{8,9}):"
    r"(?P<starttime>[0-9A-Fa-f]{8}):(?P<type>[^:\s]+):(?P<id>[^:\s]*):(?P<user>[^:\s]+):$"
)


# qemu-server's answer to a tag the datacenter tag policy keeps from this user (pve-guest-common
# assert_tag_permissions): on a config update, and from qemu-server 9.2.0 inside the create task
TAG_POLICY_RE = re.compile(r"Sys\.Modify for modifying tag '([^']*)'")


def explain(message: str) -> str:
    """PVE's message, with how to fix it where PVE's own words do not say (a refused tag)."""
    found = TAG_POLICY_RE.search(message)
    if found is None:
        return message
    return (f"{message}\n    the datacenter tag policy (user-tag-access, registered-tags) keeps the token from setting "
            f"tag '{found[1]}': on the node as root, pvesh set /cluster/options --user-tag-access user-allow=free "
            "and take the factory's tags out of registered-tags (preflight's tags check shows the policy where "
            "the token holds Sys.Audit on /)")


class TaskFailed(RemoteError):
    def __init__(self, host: str, upid: str, exitstatus: str, log_tail: list[str]):
        self.upid = upid
        self.exitstatus = exitstatus
        self.log_tail = log_tail
        tail = ("\n    " + "\n    ".join(log_tail)) if log_tail else ""
        super().__init__(host, f"task {upid} failed: {exitstatus}{tail}")


class TaskTimeout(RemoteError):
    pass


class ConfigChanged(RemoteError):
    """A config update refused because the VM's config changed since it was read: nothing was written."""


class ApiError(RemoteError):
    def __init__(self, host: str, call: str, status: int, message: str):
        self.status = status
        self.call = call
        self.pve_message = message
        super().__init__(host, f"{call}: HTTP {status}: {message}")

    @property
    def is_lock_timeout(self) -> bool:
        return bool(LOCK_TIMEOUT_RE.search(self.pve_message))


@dataclass(frozen=True)
class Upid:
    raw: str
    node: str
    type: str
    id: str
    user: str

    @classmethod
    def parse(cls, raw: str) -> Upid:
        m = UPID_RE.match(raw or "")
        if not m:
            raise ValueError(f"not a PVE task id (UPID): {raw!r}")
        return cls(raw, m["node"], m["type"], m["id"], m["user"])


@dataclass
class TaskResult:
    upid: str
    exitstatus: str
    warnings: list[str] = field(default_factory=list)
    duration_s: float = 0.0


# ------------------------------------------------------------------------------------------ client


def poll_delay(elapsed: float, interval: float) -> float:
    """Seconds to wait before asking again about a task that has run ``elapsed`` seconds.

    A tenth of its age (at least 50 ms, at most ``interval``): a task's end is noticed within about 10% of
    its length, so a short import or a template conversion does not sit finished while the run waits
    (the last host's end is a publish's end), and a long task costs few requests."""
    return min(interval, max(FIRST_POLL, POLL_FRACTION * elapsed))


class PveClient:
    """One hypervisor's API, authenticated with its privilege-separated token."""

    def __init__(self, hv: Hypervisor, *, timeout: float = DEFAULT_TIMEOUT, secret: str | None = None):
        self.hv = hv
        self.name = hv.name
        self.node = hv.node
        self.timeout = timeout
        user, token_name = hv.token_id.split("!", 1)
        if secret is None:
            secret = read_secret(
                env=hv.token_secret_env, file=hv.token_secret_file, what=f"{hv.name} API token {hv.token_id}",
                vaulted=hv.token_secret.get_secret_value() if hv.token_secret else None,
            )
        ca = Path(str(hv.tls_ca_file)).expanduser() if hv.tls_ca_file else None
        if ca is not None and not ca.is_file():
            raise RemoteError(hv.name, f"TLS CA file {ca} does not exist (tls_ca_file in the inventory)")
        adapter = VerifiedTlsAdapter(ca_file=ca, fingerprint=hv.tls_fingerprint if ca is None else None)
        # A cluster answers on every node (pveproxy forwards a call for another node): the endpoints are tried
        # in order, and the first that answers serves until it cannot be reached.
        self.endpoints = [hv.api_url, *hv.api_urls]
        self._apis = [self._api(url, user, token_name, secret, adapter) for url in self.endpoints]
        self._active = 0

    def _api(self, url: str, user: str, token_name: str, secret: str, adapter: HTTPAdapter) -> ProxmoxAPI:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"  # an IPv6 literal keeps its brackets in the URL proxmoxer builds
        api = ProxmoxAPI(f"{host}:{parts.port or 8006}", user=user, token_name=token_name, token_value=secret,
                         verify_ssl=True, timeout=self.timeout)
        api._store["session"].mount("https://", adapter)
        return api

    @property
    def api_url(self) -> str:
        """The endpoint in use."""
        return self.endpoints[self._active]

    @property
    def api(self) -> ProxmoxAPI:
        return self._apis[self._active]

    @property
    def session(self) -> requests.Session:
        session: requests.Session = self.api._store["session"]
        return session

    # -------------------------------------------------------------- raw calls
    def call(self, method: str, path: str, /, **params: Any) -> Any:
        """``call("GET", "/nodes/{node}/qemu")``: path relative to /api2/json, params as PVE names them.

        An endpoint that cannot be reached hands the call to the next: any call whose connection was never made,
        and a read that got no answer (a write that got none may have been done: it is reported, not repeated)."""
        start = self._active
        unreached: list[str] = []
        for index in [*range(start, len(self.endpoints)), *range(start)]:
            try:
                answer = self._call(self._apis[index], self.endpoints[index], method, path, params)
            except _Unreached as exc:
                unreached.append(str(exc))
                if not (exc.not_sent or method == "GET") or len(self.endpoints) == 1:
                    raise RemoteError(self.name, str(exc)) from None
                continue
            self._active = index
            return answer
        raise RemoteError(self.name, "no API endpoint answers: " + "; ".join(unreached))

    def _call(self, api: ProxmoxAPI, url: str, method: str, path: str, params: dict[str, Any]) -> Any:
        resource = api(path.strip("/"))
        label = f"{method} {path}"
        try:
            if method == "GET":
                return resource.get(**params)
            if method == "POST":
                return resource.post(**params)
            if method == "PUT":
                return resource.put(**params)
            if method == "DELETE":
                return resource.delete(**params)
        except ResourceException as exc:
            detail = str(exc.content or exc.status_message)
            if exc.errors:
                detail += " " + "; ".join(f"{k}: {v}" for k, v in sorted(exc.errors.items()))
            raise ApiError(self.name, label, exc.status_code, detail.strip()) from None
        except requests.exceptions.SSLError as exc:
            raise TlsVerificationFailed(
                self.name, f"TLS verification of {url} failed: {ssl_reason(exc)}"
            ) from None
        except requests.exceptions.ConnectTimeout:
            raise _Unreached(f"cannot reach {url}: no connection within {self.timeout:.0f}s", not_sent=True) from None
        except requests.exceptions.ConnectionError as exc:
            raise _Unreached(f"cannot reach {url}: {ssl_reason(exc)}", not_sent=_never_sent(exc)) from None
        except requests.exceptions.Timeout:
            raise _Unreached(f"{label}: no answer within {self.timeout:.0f}s ({url})", not_sent=False) from None
        raise ValueError(f"unsupported HTTP method {method}")

    def get(self, path: str, /, **params: Any) -> Any:
        return self.call("GET", path, **params)

    def post(self, path: str, /, **params: Any) -> Any:
        return self.call("POST", path, **params)

    def put(self, path: str, /, **params: Any) -> Any:
        return self.call("PUT", path, **params)

    def delete(self, path: str, /, **params: Any) -> Any:
        return self.call("DELETE", path, **params)

    @property
    def node_path(self) -> str:
        return f"/nodes/{self.node}"

    def on(self, node: str) -> PveClient:
        """This client acting on another node of its cluster: the same endpoints, token and sessions (pveproxy
        forwards a call for another node to it; an offline node's calls get 595)."""
        if node == self.node:
            return self
        other = copy.copy(self)
        other.node = node
        if self.hv.cluster is not None:
            other.name = f"{self.hv.cluster}/{node}"
        return other

    # -------------------------------------------------------------- helpers
    def version(self) -> dict[str, Any]:
        return dict(self.get("/version"))

    def vm_config(self, vmid: int) -> dict[str, Any]:
        return dict(self.get(f"{self.vm_path(vmid)}/config"))

    def list_vms(self) -> list[dict[str, Any]]:
        return list(self.get(f"{self.node_path}/qemu", full=1))

    # The API's paths live here; the stages call verbs. Writes return the task's UPID (or the API's answer
    # where PVE runs them synchronously) for wait_task.
    def vm_path(self, vmid: int) -> str:
        return f"{self.node_path}/qemu/{vmid}"

    def list_containers(self) -> list[dict[str, Any]]:
        return list(self.get(f"{self.node_path}/lxc") or [])

    def storages(self) -> list[dict[str, Any]]:
        """The node's storages: id, type, content, space."""
        return list(self.get(f"{self.node_path}/storage") or [])

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's nodes (a standalone host: itself) with status and, given Sys.Audit on the node, its
        usage: maxmem and mem in bytes, maxcpu (pve-manager API2/Nodes.pm, index)."""
        return list(self.get("/nodes") or [])

    def node_networks(self) -> list[dict[str, Any]]:
        return list(self.get(f"{self.node_path}/network") or [])

    def cluster_vms(self) -> list[dict[str, Any]]:
        """Every guest the API knows (on a standalone host: this node's)."""
        return list(self.get("/cluster/resources", type="vm") or [])

    def cluster_nodes(self) -> dict[str, bool]:
        """Every node of the cluster (a standalone host: itself) and whether it is online, from
        /cluster/resources: a node that is down answers nothing itself, its peers report it offline."""
        return {str(n["node"]): n.get("status") == "online"
                for n in self.get("/cluster/resources", type="node") or []
                if isinstance(n, dict) and n.get("type") == "node"}

    def cluster_guests(self) -> dict[int, str]:
        """Every guest id of the cluster (VMs and containers, any node, an offline node's too) and its node."""
        return {int(g["vmid"]): str(g.get("node") or "") for g in self.cluster_vms() if "vmid" in g}

    def cluster_options(self) -> Any:
        return self.get("/cluster/options")

    def permissions(self, path: str) -> Any:
        """The token's effective privileges on ``path`` (and below, as PVE answers)."""
        return self.get("/access/permissions", path=path)

    def vm_pending(self, vmid: int) -> list[dict[str, Any]]:
        return list(self.get(f"{self.vm_path(vmid)}/pending") or [])

    def vm_status(self, vmid: int) -> dict[str, Any]:
        return dict(self.get(f"{self.vm_path(vmid)}/status/current"))

    def vm_agent(self, vmid: int, command: str, **params: Any) -> Any:
        """A read-only guest agent command (network-get-interfaces, file-read)."""
        return self.get(f"{self.vm_path(vmid)}/agent/{command}", **params)

    def create_vm(self, **params: Any) -> Any:
        return self.post(f"{self.node_path}/qemu", **params)

    def clone_vm(self, vmid: int, **params: Any) -> Any:
        return self.post(f"{self.vm_path(vmid)}/clone", **params)

    def resize_vm_disk(self, vmid: int, disk: str, size: str) -> Any:
        return self.put(f"{self.vm_path(vmid)}/resize", disk=disk, size=size)

    def start_vm(self, vmid: int) -> Any:
        return self.post(f"{self.vm_path(vmid)}/status/start")

    def stop_vm(self, vmid: int) -> Any:
        return self.post(f"{self.vm_path(vmid)}/status/stop")

    def destroy_vm(self, vmid: int) -> Any:
        """Destroy with its disks, unreferenced ones included (a half-made VM's)."""
        return self.delete(self.vm_path(vmid), purge=1, **{"destroy-unreferenced-disks": 1})

    def upload_endpoint(self, storage: str) -> tuple[str, str]:
        """(URL, "POST <path>") of a storage's upload call: a multipart body the caller streams itself."""
        path = f"{self.node_path}/storage/{storage}/upload"
        return f"{self.api_url}/api2/json{path}", f"POST {path}"

    def set_vm_config(self, vmid: int, **params: Any) -> Any:
        """PUT: a synchronous config change without a digest (for the factory's own marks only)."""
        return self.put(f"{self.vm_path(vmid)}/config", **params)

    def make_template(self, vmid: int) -> Any:
        return self.post(f"{self.vm_path(vmid)}/template")

    def update_vm_config(self, vmid: int, *, digest: str | None, timeout: float, **params: Any) -> None:
        """POST a VM's config (a qmconfig task) guarded by the digest of the config it was planned from.

        A stale digest is refused as an HTTP 500 before the task forks, on every version (qemu-server
        9.1.19+ forks before locking, but checks digest and `lock:` flag early); the task's failure form is
        handled too (pve-facts.md, Tasks): both become ConfigChanged. Lock timeouts (an HTTP 500 before
        qemu-server 9.1.19, a task failure from it) keep their own form for retry_lock_timeouts.
        """
        if digest:
            params["digest"] = digest
        try:
            upid = self.post(f"{self.node_path}/qemu/{vmid}/config", **params)
            if isinstance(upid, str) and upid.startswith("UPID:"):
                self.wait_task(upid, timeout=timeout)
        except (ApiError, TaskFailed) as exc:
            message = exc.pve_message if isinstance(exc, ApiError) else exc.exitstatus
            if CONFIG_CHANGED_RE.search(message):
                raise ConfigChanged(
                    self.name, f"VM {vmid}: its config changed after this run read it (another user or tool "
                    "edited it; PVE refused the stale digest); nothing was written: re-run to plan against "
                    "the new config") from exc
            raise

    def active_task_vmids(self) -> set[int]:
        """VMIDs a task on this node is still working on.

        ``source=active`` lists the node's unarchived tasks: running ones with ``status: "RUNNING"`` (the
        per-task status endpoint says ``running``) and, until archived, just-ended ones with an ``endtime``
        and their exit status. Running means no endtime; a status other than running (any case) is the
        second signal (docs/pve-facts.md, Tasks)."""
        busy: set[int] = set()
        for task in self.get(f"{self.node_path}/tasks", source="active", limit=500) or []:
            if task.get("endtime") or str(task.get("status") or "running").lower() != "running":
                continue
            with contextlib.suppress(TypeError, ValueError):
                busy.add(int(task.get("id")))
        return busy

    def wait_task(
        self, upid: str, *, timeout: float = 600.0, interval: float = 0.5,
        on_poll: Callable[[dict[str, Any]], None] | None = None,
    ) -> TaskResult:
        """Poll the task on the node its UPID names until it stops; raise on failure or timeout."""
        parsed = Upid.parse(upid)
        started = time.monotonic()
        deadline = started + timeout
        path = f"/nodes/{parsed.node}/tasks/{upid}/status"
        while True:
            status = self.get(path)
            if on_poll:
                on_poll(status)
            if status.get("status") == "stopped":
                break
            now = time.monotonic()
            if now > deadline:
                raise TaskTimeout(self.name, f"task {upid} still running after {timeout:.0f}s")
            time.sleep(poll_delay(now - started, interval))
        exitstatus = str(status.get("exitstatus", ""))
        duration = time.monotonic() - started
        if exitstatus == "OK":
            return TaskResult(upid, exitstatus, [], duration)
        if exitstatus.startswith("WARNINGS"):
            return TaskResult(upid, exitstatus, self._task_log(parsed, warnings_only=True), duration)
        raise TaskFailed(self.name, upid, exitstatus or "no exit status", self._task_log(parsed)[-10:])

    def _task_log(self, upid: Upid, *, warnings_only: bool = False) -> list[str]:
        """The task's log lines. The endpoint pages from the start (limit 50 by default): ask for all of
        them, so a failure's reason, which PVE writes last, is in what the caller shows (the tail)."""
        try:
            lines = self.get(f"/nodes/{upid.node}/tasks/{upid.raw}/log", start=0, limit=TASK_LOG_LINES)
        except RemoteError:
            return []
        text = [str(line.get("t", "")) for line in lines]
        return [t for t in text if "WARN" in t] if warnings_only else text

    def run_task(self, method: str, path: str, *, timeout: float = 600.0, **params: Any) -> TaskResult:
        """Call an endpoint that answers with a UPID and wait for the task."""
        upid = self.call(method, path, **params)
        if not isinstance(upid, str):
            raise RemoteError(self.name, f"{method} {path}: expected a task id, got {upid!r}")
        return self.wait_task(upid, timeout=timeout)


class _Unreached(Exception):
    """An endpoint gave no answer; ``not_sent``: the request never left (its connection was not made)."""

    def __init__(self, message: str, *, not_sent: bool):
        super().__init__(message)
        self.not_sent = not_sent


def _never_sent(exc: requests.exceptions.ConnectionError) -> bool:
    """urllib3 could not open the connection (refused, no route, DNS): the request was not sent."""
    reason = exc.args[0].reason if exc.args and isinstance(exc.args[0], MaxRetryError) else None
    return isinstance(reason, (NewConnectionError, ConnectTimeoutError))


def retry_lock_timeouts(
    fn: Callable[[], Any], *, attempts: int = 5, delay: float = 2.0,
    on_retry: Callable[[str], None] | None = None, sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """Run fn (a call and its task), retrying PVE's "can't lock file ... got timeout" with a growing delay."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (ApiError, TaskFailed) as exc:
            message = exc.pve_message if isinstance(exc, ApiError) else exc.exitstatus
            if attempt == attempts or not LOCK_TIMEOUT_RE.search(message):
                raise
            if on_retry is not None:
                on_retry(message)
            sleep(delay * attempt)
    raise AssertionError("unreachable")


@contextmanager
def retry_on_lock(
    attempts: int = 5, delay: float = 2.0, sleep: Callable[[float], None] = time.sleep
) -> Iterator[Callable[[Callable[[], Any]], Any]]:
    """``with retry_on_lock() as retry: retry(lambda: client.post(...))`` retries PVE lock timeouts."""
    yield lambda fn: retry_lock_timeouts(fn, attempts=attempts, delay=delay, sleep=sleep)
