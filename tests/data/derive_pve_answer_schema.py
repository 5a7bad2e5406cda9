"""Derive the JSON Schema of Proxmox's automated-installer answer file from the installer's own source.

    python tests/data/derive_pve_answer_schema.py <git dir of proxmox/pve-installer> <commit> <release> \
        > tests/data/pve-answer-<release>.schema.json

The session used ``fetch github:proxmox/pve-installer`` (the snapshot has no tags; releases are the
"bump version to X" commits): 8.4.6 = faebafd (2025-04-09), 9.1.7 = c10cceb (2026-03-31), the last release before
answer.rs moved into the separate proxmox-installer-types crate (174fa9e, 2026-04-30).

Mechanical part, read with ``git show <commit>:<path>``: every serde struct and enum of
proxmox-auto-installer/src/answer.rs and the enums it uses from proxmox-installer-common/src/options.rs become
``$defs``: a struct's fields under its ``rename_all``/``rename`` names and their ``alias`` names
(``deny_unknown_fields``: no other key), a field is required unless it is an ``Option`` or has ``#[serde(default)]``;
``try_from = "X"`` takes X's fields; an enum is its variants' names (``rename_all``, or a variant's
``rename(deserialize = ...)``) and aliases; an ``untagged`` enum is one of its variants' types. The hand rules name
kebab-case keys and, where the installer checks a field that has an alias, the alias too.

Hand part (RULES below, each naming the code it transcribes): what the installer checks after deserialising, in the
``TryFrom`` impls of answer.rs and the ``verify_*`` functions of proxmox-auto-installer/src/utils.rs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

ANSWER_RS = "proxmox-auto-installer/src/answer.rs"
OPTIONS_RS = "proxmox-installer-common/src/options.rs"
ATTR = r'#\[(?:[^\[\]"]|"[^"]*"|\[[^\]]*\])*\]'
ITEM = re.compile(rf"((?:{ATTR}\s*)*)(?:pub(?:\(crate\))?\s+)?(struct|enum)\s+(\w+)\s*\{{(.*?)\n\}}", re.DOTALL)
CIDR_PATTERN = r"^[0-9A-Fa-f.:]+/[0-9]{1,3}$"
# proxmox-installer-common/src/utils.rs Fqdn::from: at least two alphanumeric-and-dash labels, a non-numeric host.
LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
FQDN_PATTERN = rf"^(?=.{{1,253}}$)(?![0-9]+(\.|$)){LABEL}(\.{LABEL})+$"
SCALARS: dict[str, dict[str, Any]] = {
    "String": {"type": "string"},
    "bool": {"type": "boolean"},
    "usize": {"type": "integer", "minimum": 0},
    "f64": {"type": "number"},
    "IpAddr": {"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]},
    "CidrAddress": {"type": "string", "pattern": CIDR_PATTERN},
    "Fqdn": {"type": "string", "pattern": FQDN_PATTERN},
}


def git_show(git_dir: str, commit: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, "show", f"{commit}:{path}"],
                          check=True, capture_output=True, text=True).stdout


def strip_comments(src: str) -> str:
    return re.sub(r"//[^\n]*", "", src)


def serde_args(attrs: str) -> str:
    return " ".join(re.findall(r"#\[serde\(((?:[^\[\]\"]|\"[^\"]*\")*)\)\]", attrs, re.DOTALL))


def case(name: str, rule: str | None) -> str:
    words = re.findall(r"[A-Z][a-z0-9]*|[a-z0-9]+", name)
    if rule == "kebab-case":
        return "-".join(w.lower() for w in words)
    if rule == "lowercase":
        return name.lower()
    if rule == "snake_case" or rule is None:
        return name
    raise ValueError(f"rename_all {rule!r} not handled")


def rename_all(args: str) -> str | None:
    m = re.search(r'rename_all\s*=\s*"([^"]+)"', args) or re.search(r'rename_all\(deserialize\s*=\s*"([^"]+)"', args)
    return m.group(1) if m else None


def split_members(body: str) -> list[tuple[str, str]]:
    """(attributes, declaration) per member: a comma at bracket depth 0 ends a declaration."""
    members, depth, start = [], 0, 0
    text = strip_comments(body)
    i = 0
    while i < len(text):
        m = re.compile(ATTR).match(text, i)
        if m:
            i = m.end()
            continue
        ch = text[i]
        if ch in "<([":
            depth += 1
        elif ch in ">)]":
            depth -= 1
        elif ch == "," and depth == 0:
            members.append(text[start:i])
            start = i + 1
        i += 1
    members.append(text[start:])
    out = []
    for member in members:
        attrs = "".join(re.findall(ATTR, member))
        decl = re.sub(ATTR, "", member).strip()
        if decl:
            out.append((attrs, decl))
    return out


def parse_items(src: str) -> dict[str, dict[str, Any]]:
    items: dict[str, dict[str, Any]] = {}
    for m in ITEM.finditer(strip_comments(src)):
        attrs, kind, name, body = m.groups()
        items[name] = {"kind": kind, "args": serde_args(attrs), "members": split_members(body)}
    return items


def type_schema(rust: str, items: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """(schema, optional) for a Rust type."""
    rust = rust.replace(" ", "")
    if m := re.fullmatch(r"Option<(.+)>", rust):
        return type_schema(m.group(1), items)[0], True
    if m := re.fullmatch(r"Vec<(.+)>", rust):
        return {"type": "array", "items": type_schema(m.group(1), items)[0]}, False
    if m := re.fullmatch(r"(?:BTreeMap|HashMap)<String,(.+)>", rust):
        return {"type": "object", "additionalProperties": type_schema(m.group(1), items)[0]}, False
    if rust in SCALARS:
        return dict(SCALARS[rust]), False
    if rust in items:
        return {"$ref": f"#/$defs/{rust}"}, False
    raise ValueError(f"type {rust!r} not handled")


def struct_schema(name: str, items: dict[str, dict[str, Any]]) -> dict[str, Any]:
    item = items[name]
    if m := re.search(r'try_from\s*=\s*"(\w+)"', item["args"]):
        return {"$ref": f"#/$defs/{m.group(1)}"}
    rule = rename_all(item["args"])
    props: dict[str, Any] = {}
    required = []
    for attrs, decl in item["members"]:
        field, rust = (p.strip() for p in decl.removeprefix("pub ").split(":", 1))
        args = serde_args(attrs)
        renamed = re.search(r'(?<![_\w])rename\s*=\s*"([^"]+)"', args)
        key = renamed.group(1) if renamed else case_field(field, rule)
        schema, optional = type_schema(rust, items)
        props[key] = schema
        for alias in re.findall(r'alias\s*=\s*"([^"]+)"', args):
            props[alias] = schema
        if not optional and not re.search(r"\bdefault\b", args):
            required.append(key)
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    if "deny_unknown_fields" in item["args"]:
        out["additionalProperties"] = False
    return out


def case_field(field: str, rule: str | None) -> str:
    return field.replace("_", "-") if rule == "kebab-case" else field


def enum_schema(name: str, items: dict[str, dict[str, Any]]) -> dict[str, Any]:
    item = items[name]
    if "untagged" in item["args"]:
        variants = [re.fullmatch(r"\w+\((\w+)\)", decl) for _, decl in item["members"]]
        return {"oneOf": [type_schema(v.group(1), items)[0] for v in variants if v]}
    rule = rename_all(item["args"])
    values = []
    for attrs, decl in item["members"]:
        args = serde_args(attrs)
        renamed = (re.search(r'rename\(deserialize\s*=\s*"([^"]+)"', args)
                   or re.search(r'(?<![_\w])rename\s*=\s*"([^"]+)"', args))
        values.append(renamed.group(1) if renamed else case(decl, rule))
        values.extend(re.findall(r'alias\s*=\s*"([^"]+)"', args))
    return {"type": "string", "enum": values}


def derive(answer_rs: str, options_rs: str, release: str, commit: str) -> dict[str, Any]:
    items = {**parse_items(options_rs), **parse_items(answer_rs)}
    used = reachable("Answer", items)
    defs = {name: (struct_schema(name, items) if items[name]["kind"] == "struct" else enum_schema(name, items))
            for name in sorted(used) if name != "Answer"}
    root = struct_schema("Answer", items)
    for rule in RULES:
        if rule["since"] <= release:
            target = root if rule["def"] == "Answer" else defs[rule["def"]]
            target.setdefault("allOf", []).append({"$comment": rule["source"], **rule["schema"](release)})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"Proxmox VE automated installer answer file, installer {release}",
        "$comment": f"derived by tests/data/derive_pve_answer_schema.py from proxmox/pve-installer {commit}",
        **root,
        "$defs": defs,
    }


def reachable(name: str, items: dict[str, dict[str, Any]], seen: set[str] | None = None) -> set[str]:
    seen = set() if seen is None else seen
    if name in seen:
        return seen
    seen.add(name)
    item = items[name]
    refs = set(re.findall(r'try_from\s*=\s*"(\w+)"', item["args"]))
    if not refs:  # a try_from type is read as its source type only
        for _, decl in item["members"]:
            refs.update(w for w in re.findall(r"\w+", decl) if w in items)
    for ref in refs:
        reachable(ref, items, seen)
    return seen


def _not_set(*keys: str) -> dict[str, Any]:
    return {"not": {"anyOf": [{"required": [k]} for k in keys]}}


def _network_dhcp(release: str) -> dict[str, Any]:
    # 8.4: filter is an Option and must be absent; 9.1: a map defaulting to empty, which must stay empty.
    rule = _not_set("cidr", "dns", "gateway")
    if release < "9":
        rule = _not_set("cidr", "dns", "gateway", "filter")
        return rule
    return {"allOf": [rule, {"properties": {"filter": {"maxProperties": 0}}}]}


def _min_disks(release: str) -> dict[str, Any]:
    # proxmox-installer-common/src/options.rs ZfsRaidLevel/BtrfsRaidLevel::get_min_disks
    zfs = {"raid0": 1, "raid1": 2, "raid10": 4, "raidz-1": 3, "raidz-2": 4, "raidz-3": 5}
    btrfs = {"raid0": 1, "raid1": 2, "raid10": 4}
    rules = [{"if": {"required": ["zfs", "disk-list"], "properties": {"zfs": {"properties": {"raid": {"const": k}},
                                                                               "required": ["raid"]}}},
              "then": {"properties": {"disk-list": {"minItems": n}}}} for k, n in zfs.items()]
    rules += [{"if": {"required": ["btrfs", "disk-list"],
                      "properties": {"btrfs": {"properties": {"raid": {"const": k}}, "required": ["raid"]}}},
               "then": {"properties": {"disk-list": {"minItems": n}}}} for k, n in btrfs.items()]
    return {"allOf": rules, "properties": {"disk-list": {"uniqueItems": True}}}


def _filesystem(release: str) -> dict[str, Any]:
    lvm = {"properties": {"filesystem": {"enum": ["ext4", "xfs"]}}}
    return {"allOf": [
        {"if": lvm, "then": {**_not_set("zfs", "btrfs"), "properties": {"disk-list": {"maxItems": 1}}}},
        {"if": {"properties": {"filesystem": {"const": "zfs"}}},
         "then": {"allOf": [_not_set("lvm", "btrfs"), {"required": ["zfs"],
                                                       "properties": {"zfs": {"required": ["raid"]}}}]}},
        {"if": {"properties": {"filesystem": {"const": "btrfs"}}},
         "then": {"allOf": [_not_set("lvm", "zfs"), {"required": ["btrfs"],
                                                     "properties": {"btrfs": {"required": ["raid"]}}}]}},
    ]}


RULES: list[dict[str, Any]] = [
    {"def": "Global", "since": "8.4",
     "source": "utils.rs verify_email_and_root_password_settings: exactly one of root-password, "
               "root-password-hashed; a clear-text password of at least ROOT_PASSWORD_MIN_LENGTH (8)",
     "schema": lambda r: {"oneOf": [{"anyOf": [{"required": ["root-password"]}, {"required": ["root_password"]}]},
                                    {"anyOf": [{"required": ["root-password-hashed"]},
                                               {"required": ["root_password_hashed"]}]}],
                          "properties": {"root-password": {"minLength": 8}, "root_password": {"minLength": 8}}}},
    {"def": "NetworkInAnswer", "since": "8.4",
     "source": "answer.rs TryFrom<NetworkInAnswer> for Network: from-answer needs cidr, dns, gateway and a filter; "
               "from-dhcp (the default) takes none of them",
     "schema": lambda r: {"if": {"properties": {"source": {"const": "from-answer"}}, "required": ["source"]},
                          "then": {"required": ["cidr", "dns", "gateway", "filter"],
                                   "properties": {"filter": {"minProperties": 1}}},
                          "else": _network_dhcp(r)}},
    {"def": "DiskSetup", "since": "8.4",
     "source": "answer.rs TryFrom<DiskSetup> for Disks: disk-list or filter (not both, not neither)",
     "schema": lambda r: {"oneOf": [{"anyOf": [{"required": ["disk-list"]}, {"required": ["disk_list"]}],
                                     "properties": {"disk-list": {"minItems": 1}, "disk_list": {"minItems": 1}},
                                     **_not_set("filter")},
                                    {"required": ["filter"], "properties": {"filter": {"minProperties": 1}},
                                     **_not_set("disk-list", "disk_list")}]}},
    {"def": "DiskSetup", "since": "8.4",
     "source": "answer.rs TryFrom<DiskSetup> for Disks: ext4/xfs take lvm options and one disk; zfs needs zfs.raid "
               "and btrfs btrfs.raid, each with only its own options",
     "schema": _filesystem},
    {"def": "DiskSetup", "since": "9",
     "source": "utils.rs verify_disks_settings: a RAID level's minimum number of disks, no disk twice",
     "schema": _min_disks},
    {"def": "FirstBootHookInfo", "since": "8.4",
     "source": "utils.rs verify_first_boot_settings: source from-url needs url",
     "schema": lambda r: {"if": {"properties": {"source": {"const": "from-url"}}},
                          "then": {"required": ["url"]}}},
]


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    git_dir, commit, release = argv[1:]
    schema = derive(git_show(git_dir, commit, ANSWER_RS), git_show(git_dir, commit, OPTIONS_RS), release, commit)
    print(json.dumps(schema, indent=1, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
