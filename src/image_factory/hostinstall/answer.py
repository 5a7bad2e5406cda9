"""Render a hypervisor's answer.toml from the site model: a pure function of the model and the secrets.

Field names, values and rules are proxmox-auto-installer's (src/answer.rs, src/utils.rs), see
docs/host-install.md; the rendered text is re-read with tomllib and compared before it is returned.
"""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any

from image_factory.errors import FactoryError
from image_factory.hostinstall.model import FIRST_BOOT_ORDERING, AnswerSecrets, RenderedAnswer
from image_factory.site.inventory import HostInstall, Hypervisor

BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
CRYPT_HASH_RE = re.compile(r"^\$[0-9a-z]+\$[!-~]+$")
# The udev property the installer's network filter matches on: "enx" and the MAC's 12 hex digits.
NIC_FILTER_KEY = "ID_NET_NAME_MAC"


class AnswerError(FactoryError):
    """An answer could not be rendered from the model (a missing install: mapping, a bad secret): bad input."""

    exit_code = 2


def answer_document(hv: Hypervisor, secrets: AnswerSecrets) -> dict[str, Any]:
    """The answer as the installer reads it (kebab-case keys, the installer's enum values)."""
    install = _install_of(hv)
    if not CRYPT_HASH_RE.match(secrets.root_password_hash):
        raise AnswerError(f"{hv.name}: the root password hash is not a crypt(3) hash ('$y$...', '$6$...'); "
                          "make one with: mkpasswd -m yescrypt")
    if not secrets.root_ssh_keys:
        raise AnswerError(f"{hv.name}: no root SSH key (install.root_ssh_keys / root_ssh_key_files)")
    return {
        "global": {
            "keyboard": install.keyboard,
            "country": install.country,
            "fqdn": hv.install_fqdn,
            "mailto": install.mailto,
            "timezone": install.timezone,
            "root-password-hashed": secrets.root_password_hash,
            "root-ssh-keys": list(secrets.root_ssh_keys),
            "reboot-on-error": False,
        },
        "network": _network(install),
        "disk-setup": _disk_setup(install),
        "first-boot": {"source": "from-iso", "ordering": FIRST_BOOT_ORDERING},
    }


def render_answer(hv: Hypervisor, secrets: AnswerSecrets) -> RenderedAnswer:
    document = answer_document(hv, secrets)
    text = f"# Proxmox VE automated installation answer for {hv.name}, rendered by deevnet-image-factory " \
           "(invoke host.answer) from the site model; do not edit, re-render.\n" + to_toml(document)
    if tomllib.loads(text) != document:
        raise AnswerError(f"{hv.name}: the rendered answer does not read back as written (TOML writer defect)")
    return RenderedAnswer(hv.name, tuple(_install_of(hv).macs), text)


def _install_of(hv: Hypervisor) -> HostInstall:
    if hv.install is None:
        raise AnswerError(f"{hv.name}: the inventory has no pve.install mapping for this hypervisor "
                          "(see docs/host-install.md)")
    return hv.install


def _network(install: HostInstall) -> dict[str, Any]:
    net = install.network
    if net.source == "dhcp":
        return {"source": "from-dhcp"}
    return {
        "source": "from-answer",
        "cidr": net.address,
        "gateway": net.gateway,
        "dns": net.dns,
        "filter": {NIC_FILTER_KEY: "*" + install.management_mac.replace(":", "")},
    }


def _disk_setup(install: HostInstall) -> dict[str, Any]:
    disk = install.disk
    setup: dict[str, Any] = {"filesystem": disk.filesystem, "disk-list": list(disk.disks)}
    sizes = {k: v for k, v in (("hdsize", disk.hdsize), ("swapsize", disk.swapsize)) if v is not None}
    if disk.filesystem == "zfs":
        setup["zfs"] = {"raid": disk.zfs_raid, **sizes}
    elif sizes:
        setup["lvm"] = sizes
    return setup


# ------------------------------------------------------------------------------------------ TOML


def to_toml(document: dict[str, Any]) -> str:
    """TOML for a mapping of tables whose values are scalars, lists of scalars or nested mappings
    (written as dotted keys, the form Proxmox's own examples use: ``zfs.raid = "raid1"``)."""
    out: list[str] = []
    for name, table in document.items():
        if not isinstance(table, dict):
            raise TypeError(f"top-level {name!r} must be a table")
        out.append(f"\n[{_key(name)}]")
        out.extend(_pairs((), table))
    return "\n".join(out).lstrip("\n") + "\n"


def _pairs(prefix: tuple[str, ...], table: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for key, value in table.items():
        path = (*prefix, key)
        if isinstance(value, dict):
            lines.extend(_pairs(path, value))
        else:
            lines.append(f"{'.'.join(_key(k) for k in path)} = {_value(value)}")
    return lines


def _key(key: str) -> str:
    return key if BARE_KEY_RE.match(key) else json.dumps(key)


def _value(value: Any) -> str:
    # bool before int: bool is an int subclass.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON's string escapes (\" \\ \n \uXXXX ...) are all valid in a TOML basic string.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")
