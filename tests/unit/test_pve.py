"""pve.py: the parts that need no server (error texts)."""

from __future__ import annotations

import pytest

from image_factory.tls import ssl_reason as _ssl_reason

pytestmark = pytest.mark.unit

WRAP = "HTTPSConnectionPool(host='127.0.0.1', port=8006): Max retries exceeded with url: /api2/json/version ({})"


@pytest.mark.parametrize(("inner", "reason"), [
    ("Caused by SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
     "self-signed certificate in certificate chain (_ssl.c:1006)'))",
     "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate in certificate chain"),
    ("Caused by SSLError(SSLError('Fingerprints did not match. Expected \"3f9a61\", got \"0b1c2d\"'))",
     'Fingerprints did not match. Expected "3f9a61", got "0b1c2d"'),
    ("Caused by SSLError(CertificateError(\"hostname 'pve-mgmt' doesn't match 'pve1.example'\"))",
     "hostname 'pve-mgmt' doesn't match 'pve1.example'"),
    ("Caused by NewConnectionError('<urllib3.connection.HTTPSConnection object at 0x7f>: Failed to establish a new "
     "connection: [Errno 111] Connection refused')",
     "Failed to establish a new connection: [Errno 111] Connection refused"),
])
def test_tls_and_connection_reasons_are_whole_sentences(inner: str, reason: str) -> None:
    got = _ssl_reason(Exception(WRAP.format(inner)))
    assert got.startswith(reason), got
    assert got == reason


def test_unknown_long_text_is_cut_at_a_word_boundary() -> None:
    text = "word " * 100
    got = _ssl_reason(Exception(text))
    assert got.endswith(" ...") and all(w in ("word", "...") for w in got.split())


def test_ipv6_api_url_keeps_its_brackets(monkeypatch: pytest.MonkeyPatch) -> None:
    from image_factory.pve.client import PveClient
    from image_factory.site.inventory import Hypervisor

    hv = Hypervisor.model_validate({
        "name": "pve6", "role": "mgmt", "node": "pve6", "api_url": "https://[fd00::10]:8006",
        "token_id": "factory@pve!image-factory", "token_secret_env": "PVE6_SECRET",
        "tls_fingerprint": ":".join(["AB"] * 32),
        "ssh": {"host": "fd00::10",
                "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBIKjPbOcAwqThWzRa5Ex/b92J/o3wlQ7KdlVFOwg5BD"},
        "template_vmids": {"first": 9000, "last": 9099}, "vm_vmids": {"first": 1000, "last": 1999},
    })
    client = PveClient(hv, secret="x")  # noqa: S106 - not a real secret
    assert client.api._store["base_url"] == "https://[fd00::10]:8006/api2/json"


def test_a_failed_task_shows_the_end_of_its_log() -> None:
    from image_factory.pve.client import TASK_LOG_LINES, PveClient, TaskFailed, Upid

    upid = "UPID:pve1:00001234:00005678:6543210F:qmcreate:100:factory@pve!image-factory:"
    log = [{"n": i, "t": f"line {i}"} for i in range(1, 901)] + [{"n": 901, "t": "TASK ERROR: the real reason"}]
    asked: list[dict[str, object]] = []

    def fake_get(path: str, **params: object) -> object:
        if path.endswith("/status"):
            return {"status": "stopped", "exitstatus": "the real reason"}
        asked.append(params)
        start, limit = int(params.get("start", 0)), int(params.get("limit", 50))  # PVE pages from the start
        return log[start:start + limit]

    client = PveClient.__new__(PveClient)
    client.name = "pve1"
    client.get = fake_get  # type: ignore[method-assign]
    with pytest.raises(TaskFailed) as err:
        client.wait_task(upid, timeout=5)
    assert asked == [{"start": 0, "limit": TASK_LOG_LINES}]
    assert err.value.log_tail[-1] == "TASK ERROR: the real reason" and "line 1" not in err.value.log_tail
    assert Upid.parse(upid).node == "pve1"


def _noticed_at(task_length: float, interval: float) -> tuple[float, int]:
    """(when wait_task's polls first see a task of this length stopped, how many polls it took)."""
    from image_factory.pve.client import poll_delay

    clock, polls = 0.0, 1
    while clock < task_length:
        clock += poll_delay(clock, interval)
        polls += 1
    return clock, polls


@pytest.mark.parametrize("length", [0.03, 0.3, 0.7, 1.5, 4.0])
def test_a_short_task_is_noticed_within_a_tenth_of_its_length(length: float) -> None:
    # the last host's import ends a publish: every poll interval it oversleeps is the run's wall time
    noticed, _ = _noticed_at(length, interval=0.5)
    assert noticed <= length * 1.1 + 0.05 + 1e-9, noticed


def test_a_long_task_costs_few_requests() -> None:
    noticed, polls = _noticed_at(600.0, interval=0.5)
    assert noticed <= 600.5
    assert polls < 600 / 0.5 + 40  # the interval caps the rate: about two requests a second at most


def test_a_pinned_context_loads_no_ca_store_and_speaks_tls_12_or_later() -> None:
    """The pin is the whole check: the system's CA bundle would cost every client 20 ms of CPU for nothing."""
    import ssl

    from image_factory.tls import VerifiedTlsAdapter

    ctx = VerifiedTlsAdapter(fingerprint=":".join(["AB"] * 32))._ctx
    assert ctx.cert_store_stats()["x509_ca"] == 0
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION


def test_running_tasks_are_those_without_an_endtime_whatever_the_status_case() -> None:
    """pve-manager's node_tasks with source=active: running tasks say "RUNNING", just-ended unarchived ones carry
    an endtime and their exit status (API2/Tasks.pm)."""
    from image_factory.pve.client import PveClient

    answer = [
        {"upid": "a", "id": "9001", "type": "qmcreate", "user": "factory@pve", "tokenid": "image-factory",
         "starttime": 1, "status": "RUNNING"},
        {"upid": "b", "id": "9002", "type": "qmtemplate", "starttime": 1, "status": "running"},
        {"upid": "c", "id": "9003", "type": "qmconfig", "starttime": 1},
        {"upid": "d", "id": "9004", "type": "qmcreate", "starttime": 1, "endtime": 2, "status": "OK"},
        {"upid": "e", "id": "9005", "type": "qmcreate", "starttime": 1, "status": "unable to create VM 9005"},
        {"upid": "f", "id": "", "type": "imgcopy", "starttime": 1, "status": "RUNNING"},
    ]
    asked: list[dict[str, object]] = []

    def fake_get(path: str, **params: object) -> object:
        asked.append(params)
        return answer

    client = PveClient.__new__(PveClient)
    client.node = "pve1"
    client.get = fake_get  # type: ignore[method-assign]
    assert client.active_task_vmids() == {9001, 9002, 9003}
    assert asked[0]["source"] == "active"
