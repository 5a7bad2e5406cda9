"""Access: privilege-separated tokens, the ACL, each node's own API schema, bridges and the tag policy."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from fakepve import PveError

from image_factory.lab.privileges import catalogue
from image_factory.lab.pve.base import (
    LabNodeBase,
)
from image_factory.lab.pve.formats import check_property_strings, reprinted_drives
from image_factory.lab.pve.props import split_tags

# Parameters of the endpoints PveClient calls that a node's own qemu-server does not know yet: (method, path
# template) -> {parameter: the first qemu-server release whose schema has it}. From the API schemas of
# qemu-server 8.3.12 and 9.2.0 diffed (docs/pve-facts.md, "Schemas by version"); pve-manager's and pve-storage's
# endpoints the client calls did not change. fakepve validates against the newest schema; a node refuses these as
# its own (older) schema does.
_CONFIG_KEYS_SINCE: dict[str, tuple[int, ...]] = {"intel-tdx": (9, 0, 25), "allow-ksm": (9, 0, 27)}
NEWER_PARAMETERS: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {
    ("POST", "/nodes/{node}/qemu"): {"ha-managed": (9, 0, 24), **_CONFIG_KEYS_SINCE},
    ("POST", "/nodes/{node}/qemu/{vmid}/config"): _CONFIG_KEYS_SINCE,
    ("PUT", "/nodes/{node}/qemu/{vmid}/config"): _CONFIG_KEYS_SINCE,
    ("POST", "/nodes/{node}/qemu/{vmid}/status/start"): {"with-conntrack-state": (9, 0, 10),
                                                         "nets-host-mtu": (9, 0, 20)},
    ("GET", "/nodes/{node}/qemu/{vmid}/agent/file-read"): {"count": (9, 1, 5), "decode": (9, 1, 5),
                                                           "offset": (9, 1, 5)},
}
# The endpoints whose VM options carry property strings each node parses with its own formats (formats.py).
TAKES_VM_OPTIONS = frozenset({("POST", "/nodes/{node}/qemu"), ("POST", "/nodes/{node}/qemu/{vmid}/config"),
                              ("PUT", "/nodes/{node}/qemu/{vmid}/config")})


class Access(LabNodeBase):  # a concern of LabPve (node.py)
    def allowed(self, user: str, path: str, priv: str) -> bool:
        """Privilege-separated tokens: the intersection of the token's and the user's rights."""
        if self.acl is None or (user or "").split("!")[0] == "root@pam":
            return True
        if "|" in priv:  # PVE's check_vm_perm(..., any=1): one of them suffices
            return any(self.allowed(user, path, one) for one in priv.split("|"))
        if "!" in user:
            return self._holds(user, path, priv) and self._holds(user.split("!")[0], path, priv)
        return self._holds(user, path, priv)

    def _holds(self, who: str, path: str, priv: str) -> bool:
        """fakepve's path logic (a grant covers the path and everything under it), for one ACL subject."""
        paths = [path]
        if path.startswith("/vms/"):
            vmid = int(path.split("/")[2])
            paths += ["/vms"] + ["/pool/" + name for name, ids in self.pools.items() if vmid in ids]
        for granted, privs in (self.acl or {}).get(who, []):
            if priv in privs and (granted == "/" or any(p == granted or p.startswith(granted + "/") for p in paths)):
                return True
        return False

    async def _permissions(self, v: dict[str, Any], user: str) -> dict[str, dict[str, int]]:
        """GET /access/permissions of a privilege-separated token: its effective rights (token's ACL
        intersected with its user's), per ACL path, or for exactly `path` when given."""
        who = v.get("userid") or user
        if self.acl is None or "!" not in who or who.split("!")[0] == "root@pam":
            result: dict[str, dict[str, int]] = await super()._permissions(v, user)
            return result
        owner = who.split("!")[0]
        if v.get("path") is not None:
            paths = [str(v["path"])]
        else:
            paths = sorted({p for p, _ in self.acl.get(who, [])} | {p for p, _ in self.acl.get(owner, [])})
        out: dict[str, dict[str, int]] = {}
        for path in paths:
            try:
                held = sorted(priv for priv in catalogue(self.major) if self.allowed(who, path, priv))
            except ValueError:
                held = []
            if held or v.get("path") is not None:
                out[path] = dict.fromkeys(held, 1)
        return out

    def _verify(self, request: web.Request, values: dict[str, Any], drop: Any = ()) -> Any:
        match = self.resolve(request, "/api2/json")
        if match is not None:
            self.check_own_schema(request.method, match.template, values)
            self._print_drives(request.method, match.template, values)
        return super()._verify(request, values, drop)

    async def answer(self, request: web.Request, match: Any, params: dict[str, Any], user: str,
                     call: Any = None) -> Any:
        if match is not None:
            self.check_own_schema(request.method, match.template, params)
            self._print_drives(request.method, match.template, params)
        return await super().answer(request, match, params, user, call)

    def _print_drives(self, method: str, template: str, values: dict[str, Any]) -> None:
        """qemu-server re-prints each drive of a create or config request before anything reads it (Qemu.pm
        check_drive_param: print_drive): the handlers here and fakepve's find the volume first, as stored."""
        if (method, template) in TAKES_VM_OPTIONS:
            values.update(reprinted_drives(values, self.qemu_server, self.pve_common))

    def check_own_schema(self, method: str, template: str, values: dict[str, Any]) -> None:
        """PVE's JSON schema refuses what its own version does not define (additionalProperties 0): a parameter
        newer than this node's qemu-server, or a sub-key its own property-string format lacks, is a 400, as on
        the real node; every refused parameter is named at once (RESTHandler collects them)."""
        newer = NEWER_PARAMETERS.get((method, template), {})
        errors = dict.fromkeys(
            sorted(k for k in values if k in newer and not self.qemu_at_least(*newer[k])),
            "property is not defined in schema and the schema does not allow additional properties")
        if (method, template) in TAKES_VM_OPTIONS:
            errors.update(check_property_strings(values, self.qemu_server, self.pve_common))
        if errors:
            raise PveError(400, "Parameter verification failed.", errors)

    def check_permissions(self, user: str, perms: Any, values: dict[str, Any], declared: Any = None) -> None:
        """pve-access-control's check_api2_permissions: `user => 'all'` admits every authenticated user before
        any `check` (which the method then evaluates itself, e.g. get_options' Sys.Audit for the full answer)."""
        if user is not None and (perms or {}).get("user") in ("all", "world"):
            return
        super().check_permissions(user, perms, values, declared)

    def _check(self, user: str, check: Any, values: dict[str, Any], declared: Any = None) -> Any:
        """PVE 8.4's guest-agent permission: fakepve's schema is PVE 9's (VM.GuestAgent.*); 8.4 checks
        VM.Monitor on /vms/{vmid} for every agent command. A 9.x node checks what the schema says."""
        if self.major < 9 and check and check[0] == "perm" and any(
                str(p).startswith("VM.GuestAgent.") for p in check[2]):
            check = ["perm", check[1], ["VM.Monitor"]]
        return super()._check(user, check, values, declared)

    def _check_bridge_access(self, user: str, params: dict[str, Any]) -> None:
        """qemu-server's check_bridge_access: every netN's bridge (and VLAN tag) needs SDN.Use on
        /sdn/zones/localnetwork/<bridge>[/<tag>] for the calling user or token."""
        for key, value in params.items():
            if not re.fullmatch(r"net\d+", key):
                continue
            props = dict(p.split("=", 1) for p in str(value).split(",") if "=" in p)
            bridge = props.get("bridge")
            if bridge:
                path = f"/sdn/zones/localnetwork/{bridge}" + (f"/{props['tag']}" if props.get("tag") else "")
                self.require(user, path, "SDN.Use")

    def _may_see_bridge(self, user: str, bridge: str) -> bool:
        """pve-access-control's check_sdn_bridge(..., ['SDN.Audit', 'SDN.Use']): the bridge, or one of its VLANs."""
        path = f"/sdn/zones/localnetwork/{bridge}"
        if self.allowed(user, path, "SDN.Audit|SDN.Use"):
            return True
        vlans = {p for who in (user, user.split("!")[0]) for p, _ in (self.acl or {}).get(who, [])
                 if p.startswith(path + "/")}
        return any(self.allowed(user, vlan, "SDN.Audit|SDN.Use") for vlan in vlans)

    def tag_policy(self) -> tuple[str, set[str], set[str]]:
        """datacenter.cfg's user-tag-access (user-allow, user-allow-list) and registered-tags."""
        access = dict(p.split("=", 1) for p in self.cluster_options.get("user-tag-access", "").split(",") if "=" in p)
        allow_list = {t for t in access.get("user-allow-list", "").split(";") if t}
        registered = {t for t in self.cluster_options.get("registered-tags", "").split(";") if t}
        return access.get("user-allow", "free"), allow_list, registered

    def assert_tag_permissions(self, user: str, vmid: int, old: Any, new: Any) -> None:
        """pve-guest-common's assert_tag_permissions: VM.Config.Options on the VM; every tag added or removed
        needs Sys.Modify on / unless the policy lets users set it (free, on the list, or existing on a guest
        the user can see) and it is not registered."""
        self.require(user, f"/vms/{vmid}", "VM.Config.Options")
        if self.allowed(user, "/", "Sys.Modify"):
            return
        allow, _allow_list, registered = self.tag_policy()
        allowed = self.allowed_tags(user)
        before, after = split_tags(old), split_tags(new)
        for tag in sorted(set(before) | set(after)):
            if before.count(tag) == after.count(tag):
                continue
            if (tag not in allowed and allow != "free") or tag in registered:
                raise PveError(403, f"Permission check failed (/, Sys.Modify for modifying tag '{tag}')")

    def tag_policy_restrictive(self) -> bool:
        allow, _allow_list, registered = self.tag_policy()
        return allow != "free" or bool(registered)

    def allowed_tags(self, user: str) -> set[str]:
        """pve-guest-common's get_allowed_tags: the tags this user may set and see."""
        privileged = self.allowed(user, "/", "Sys.Modify")
        allow, allow_list, registered = self.tag_policy()
        tags = set(allow_list) if allow != "none" or privileged else set()
        if allow in ("free", "existing") or privileged:
            for vm in self.vms:
                if privileged or self.allowed(user, f"/vms/{vm.vmid}", "VM.Audit"):
                    tags.update(split_tags(vm.config.get("tags")))
        return tags | registered if privileged else tags - registered

