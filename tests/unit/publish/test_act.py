"""publish.act: a host's error is reported without the host's name, classified by the error's type."""

from __future__ import annotations

import pytest

from image_factory.errors import FactoryError, RemoteError
from image_factory.publish.act import host_reason
from image_factory.publish.model import HostFailed
from image_factory.pve.hostlock import LockBusy

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("error", "reason"), [
    (HostFailed("pve-mgmt", "no free VMID"), "no free VMID"),
    (RemoteError("pve-mgmt", "VM 9000 already exists"), "VM 9000 already exists"),
    (RemoteError("pve-tenant", "refused"), "pve-tenant: refused"),  # another host's error keeps its name
    (LockBusy("pve-mgmt: in progress by ci run 7"), "in progress by ci run 7"),
    (FactoryError("pve-mgmt: not host-scoped by type"), "pve-mgmt: not host-scoped by type"),
])
def test_host_reason_by_type(error: FactoryError, reason: str) -> None:
    assert host_reason(error, "pve-mgmt") == reason
