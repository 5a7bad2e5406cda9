"""The one per-host fan-out: every host at once, a FactoryError is that host's result, a bug propagates."""

from __future__ import annotations

import threading

import pytest

from image_factory.errors import FactoryError
from image_factory.fanout import per_host

pytestmark = pytest.mark.unit


def test_hosts_run_at_once_and_a_failed_host_hides_nobody() -> None:
    both_started = threading.Barrier(2, timeout=10)  # breaks (and fails the test) unless both run together

    def work(n: int) -> int:
        both_started.wait()
        if n == 2:
            raise FactoryError("pve-tenant: connection refused")
        return n * 10

    done = per_host({"pve-mgmt": 1, "pve-tenant": 2}, work)
    assert done.results == {"pve-mgmt": 10}
    assert done.failures == {"pve-tenant": "pve-tenant: connection refused"}
    assert not done.ok


def test_a_bug_is_not_swallowed_and_no_hosts_is_no_work() -> None:
    with pytest.raises(ZeroDivisionError):
        per_host({"a": 0}, lambda n: 1 // n)
    assert per_host({}, lambda n: n).ok
