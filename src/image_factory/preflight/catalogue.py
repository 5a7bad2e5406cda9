"""The preflight checks, in run order, with what each needs and whether deploy runs it; the check groups."""

from __future__ import annotations

from image_factory.preflight import access, capability, guests, network, storage
from image_factory.preflight import model as name
from image_factory.preflight.registry import CHECKS, Check, declare

for _entry in (
    Check(name.CHECK_TLS, access.check_tls, needs=()),
    Check(name.CHECK_SSH, access.check_ssh, needs=()),  # deploy too: it takes its host lock over SSH
    Check(name.CHECK_TOKEN, access.check_token, needs=(), after=(name.CHECK_TLS,)),
    Check(name.CHECK_VERSION, capability.check_version),
    Check(name.CHECK_CLUSTER, capability.check_cluster),
    Check(name.CHECK_PRIVILEGES, access.check_privileges),
    Check(name.CHECK_STORAGE, storage.check_storage),
    Check(name.CHECK_SPACE, storage.check_space, needs=(name.CHECK_TLS, name.CHECK_TOKEN, name.CHECK_SSH),
          deploy=False),
    Check(name.CHECK_BRIDGE, network.check_bridge),
    Check(name.CHECK_VMIDS, guests.check_vmids),
    Check(name.CHECK_MACS, guests.check_macs),
    Check(name.CHECK_TAGS, guests.check_tags),
    Check(name.CHECK_FIRMWARE, capability.check_firmware,
          needs=(name.CHECK_TLS, name.CHECK_TOKEN, name.CHECK_VERSION, name.CHECK_STORAGE),
          deploy=False),
):
    declare(_entry)

ALL_CHECKS: tuple[str, ...] = tuple(CHECKS)
# publish uploads over SSH and registers templates through the API: everything.
PUBLISH_CHECKS: tuple[str, ...] = ALL_CHECKS
# deploy clones and configures through the API and holds its host lock over SSH: no upload space.
DEPLOY_CHECKS: tuple[str, ...] = tuple(c.name for c in CHECKS.values() if c.deploy)
CHECK_GROUPS: dict[str, tuple[str, ...]] = {"all": ALL_CHECKS, "publish": PUBLISH_CHECKS, "deploy": DEPLOY_CHECKS}
