"""The preflight checks, in run order, with what each needs and whether deploy runs it; the check groups."""

from __future__ import annotations

from image_factory.preflight import access, capability, guests, network, storage
from image_factory.preflight.model import (
    CHECK_BRIDGE,
    CHECK_FIRMWARE,
    CHECK_MACS,
    CHECK_PRIVILEGES,
    CHECK_SPACE,
    CHECK_SSH,
    CHECK_STORAGE,
    CHECK_TAGS,
    CHECK_TLS,
    CHECK_TOKEN,
    CHECK_VERSION,
    CHECK_VMIDS,
)
from image_factory.preflight.registry import CHECKS, Check, declare

for _entry in (
    Check(CHECK_TLS, access.check_tls, needs=()),
    Check(CHECK_SSH, access.check_ssh, needs=()),  # deploy too: it takes its host lock over SSH
    Check(CHECK_TOKEN, access.check_token, needs=(), after=(CHECK_TLS,)),
    Check(CHECK_VERSION, capability.check_version),
    Check(CHECK_PRIVILEGES, access.check_privileges),
    Check(CHECK_STORAGE, storage.check_storage),
    Check(CHECK_SPACE, storage.check_space, needs=(CHECK_TLS, CHECK_TOKEN, CHECK_SSH), deploy=False),
    Check(CHECK_BRIDGE, network.check_bridge),
    Check(CHECK_VMIDS, guests.check_vmids),
    Check(CHECK_MACS, guests.check_macs),
    Check(CHECK_TAGS, guests.check_tags),
    Check(CHECK_FIRMWARE, capability.check_firmware, needs=(CHECK_TLS, CHECK_TOKEN, CHECK_VERSION, CHECK_STORAGE),
          deploy=False),
):
    declare(_entry)

ALL_CHECKS: tuple[str, ...] = tuple(CHECKS)
# publish uploads over SSH and registers templates through the API: everything.
PUBLISH_CHECKS: tuple[str, ...] = ALL_CHECKS
# deploy clones and configures through the API and holds its host lock over SSH: no upload space.
DEPLOY_CHECKS: tuple[str, ...] = tuple(c.name for c in CHECKS.values() if c.deploy)
CHECK_GROUPS: dict[str, tuple[str, ...]] = {"all": ALL_CHECKS, "publish": PUBLISH_CHECKS, "deploy": DEPLOY_CHECKS}
