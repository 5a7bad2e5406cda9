"""Derive the JSON Schema the tofu tests validate exports with, from bpg/terraform-provider-proxmox's own source.

    python tests/data/derive_bpg_schema.py <git dir of bpg/terraform-provider-proxmox> v0.111.1 \
        > tests/data/bpg-proxmox-0.111.1.schema.json

It reads, at that tag (``git show <tag>:<path>``), the terraform-plugin-sdk/v2 schema literals of

- the provider block: ``createSchema()`` in proxmoxtf/provider/schema.go (the muxed framework provider declares the
  same attributes);
- ``proxmox_virtual_environment_vm``: ``VM()`` in proxmoxtf/resource/vm/vm.go, merged with ``disk.Schema()`` and
  ``network.Schema()`` as VM() merges them,

and turns every argument into JSON Schema: its name (the ``mk*`` constant's value), its type, nested blocks (an
object or a list of objects: Terraform's JSON syntax takes either; only the list where ``ConfigMode`` makes the block
an attribute), ``Required``, ``MaxItems``, and an ``enum``
where the argument is validated by ``validation.StringInSlice`` (inline, or as the only rule of a named validator
of the same package); attributes that are only ``Computed`` cannot be set and are left out. ``Default`` values are
kept as ``default`` (documentation: what the provider assumes for an argument left out). The envelope (terraform,
variable, provider, resource, import) is Terraform's JSON configuration syntax, limited to what
image_factory.handoffs.tofu writes. No network: the repository is a local clone (the session used ``fetch`` of the
GitHub snapshot).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

TOKEN = re.compile(r"""
    (?P<ws>\s+) | (?P<comment>//[^\n]*|/\*.*?\*/) | (?P<str>"(?:[^"\\\n]|\\.)*"|`[^`]*`) | (?P<rune>'(?:[^'\\]|\\.)*')
    | (?P<num>\d+(?:\.\d+)?) | (?P<ident>[A-Za-z_]\w*) | (?P<op>:=|&&|\|\||==|!=|\.\.\.|[^\sA-Za-z0-9_])
""", re.VERBOSE | re.DOTALL)
CONST = re.compile(r'^\s*(\w+)\s*=\s*("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?|true|false)\s*(?://.*)?$', re.MULTILINE)
TYPES = {"TypeString": "string", "TypeInt": "integer", "TypeFloat": "number", "TypeBool": "boolean"}


def tokens(src: str) -> list[str]:
    return [m.group() for m in TOKEN.finditer(src) if m.lastgroup not in ("ws", "comment")]


@dataclass
class Package:
    files: dict[str, str]
    consts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for src in self.files.values():
            for block in re.findall(r"^const \((.*?)^\)", src, re.MULTILINE | re.DOTALL):
                for name, value in CONST.findall(block):
                    self.consts[name] = json.loads(value.replace("`", '"'))

    def value(self, toks: list[str], others: dict[str, Package]) -> Any:
        """A literal, a constant of this package, or pkg.Constant of another one."""
        if len(toks) == 3 and toks[1] == "." and toks[0] in others:
            return others[toks[0]].consts[toks[2]]
        if len(toks) == 2 and toks[0] == "-" and toks[1][0].isdigit():
            return -json.loads(toks[1])
        if len(toks) != 1:
            return None
        tok = toks[0]
        if tok[0] in "\"`" or tok[0].isdigit() or tok in ("true", "false"):
            return json.loads(tok if tok[0] != "`" else json.dumps(tok[1:-1]))
        return self.consts.get(tok)

    def function_body(self, name: str) -> list[str] | None:
        for src in self.files.values():
            m = re.search(rf"^func {name}\(\)[^{{]*\{{", src, re.MULTILINE)
            if m:
                toks = tokens(src[m.end() - 1:])
                return toks[:_close(toks, 0) + 1]
        return None


def _close(toks: list[str], i: int) -> int:
    """Index of the bracket closing the one at i."""
    pairs = {"{": "}", "(": ")", "[": "]"}
    depth, opener, closer = 0, toks[i], pairs[toks[i]]
    for j in range(i, len(toks)):
        depth += (toks[j] == opener) - (toks[j] == closer)
        if depth == 0:
            return j
    raise ValueError("unbalanced")


def _split(toks: list[str], sep: str = ",") -> list[list[str]]:
    """Top-level pieces of a bracket's contents."""
    parts: list[list[str]] = []
    cur: list[str] = []
    depth = 0
    for tok in toks:
        depth += (tok in ("{", "(", "[")) - (tok in ("}", ")", "]"))
        if tok == sep and depth == 0:
            parts.append(cur)
            cur = []
        else:
            cur.append(tok)
    return [p for p in parts + [cur] if p]


def _enum(toks: list[str], pkg: Package) -> list[str] | None:
    """The allowed strings of a StringInSlice validator, inline or as the only rule of a named validator."""
    if len(toks) >= 3 and toks[1] == "(" and toks[2] == ")" and toks[0].endswith("Validator"):
        body = pkg.function_body(toks[0])
        return _enum(body, pkg) if body else None
    if toks.count("StringInSlice") != 1 or {"Any", "All", "Or", "StringMatch", "StringIsNotEmpty"} & set(toks):
        return None
    i = toks.index("StringInSlice")
    start = toks.index("{", i)
    return [json.loads(t) for t in toks[start + 1:_close(toks, start)] if t.startswith('"')]


def parse_map(toks: list[str], pkg: Package, others: dict[str, Package]) -> dict[str, dict[str, Any]]:
    """``map[string]*schema.Schema{ key: {Field: value, ...}, ... }`` -> name -> parsed field values."""
    start = toks.index("{")
    out = {}
    for entry in _split(toks[start + 1:_close(toks, start)]):
        colon = entry.index(":")
        name = pkg.value(entry[:colon], others)
        if not isinstance(name, str):
            raise ValueError(f"cannot resolve schema key {' '.join(entry[:colon])}")
        out[name] = parse_fields(entry[colon + 1:], pkg, others)
    return out


def parse_fields(toks: list[str], pkg: Package, others: dict[str, Package]) -> dict[str, Any]:
    """``{Type: ..., Optional: true, Elem: ..., ...}`` of one schema.Schema."""
    if toks[0] == "&":
        toks = toks[toks.index("{"):]
    fields: dict[str, Any] = {}
    for part in _split(toks[1:_close(toks, 0)]):
        key, value = part[0], part[2:]
        if key == "Type":
            fields["type"] = value[-1]
        elif key in ("Optional", "Required", "Computed", "ForceNew", "Sensitive"):
            fields[key.lower()] = value == ["true"]
        elif key == "ConfigMode":
            fields["attribute_mode"] = value[-1] == "SchemaConfigModeAttr"
        elif key in ("MaxItems", "MinItems"):
            fields[key.lower()] = pkg.value(value, others)
        elif key == "Default":
            fields["default"] = pkg.value(value, others)
        elif key in ("ValidateDiagFunc", "ValidateFunc"):
            fields["enum"] = _enum(value, pkg)
        elif key == "Elem" and "Resource" in value[:4]:
            inner = value[value.index("{") + 1:]
            schema_at = inner.index("Schema")
            fields["block"] = parse_map(inner[schema_at + 2:], pkg, others)
        elif key == "Elem":
            fields["elem"] = parse_fields(value, pkg, others)
    return fields


def to_json_schema(attrs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for name, f in sorted(attrs.items()):
        if not (f.get("optional") or f.get("required")):
            continue  # computed only: not an argument
        props[name] = _attribute(f)
    required = sorted(n for n, f in attrs.items() if f.get("required"))
    return {"type": "object", "additionalProperties": False, "properties": props,
            **({"required": required} if required else {})}


def _attribute(f: dict[str, Any]) -> dict[str, Any]:
    kind = f["type"]
    if "block" in f:
        block = to_json_schema(f["block"])
        many: dict[str, Any] = {"type": "array", "items": block}
        if f.get("maxitems"):
            many["maxItems"] = f["maxitems"]
        return many if f.get("attribute_mode") else {"anyOf": [block, many]}
    if kind in ("TypeList", "TypeSet"):
        return {"type": "array", "items": _attribute(f["elem"]) if "elem" in f else {}}
    if kind == "TypeMap":
        return {"type": "object", "additionalProperties": _attribute(f["elem"]) if "elem" in f else {}}
    out: dict[str, Any] = {"type": TYPES[kind]}
    if f.get("enum"):
        out["enum"] = f["enum"]
    if f.get("default") is not None:
        out["default"] = f["default"]
    return out


def package(git_dir: str, ref: str, path: str) -> Package:
    names = subprocess.run(["git", "--git-dir", git_dir, "ls-tree", "--name-only", f"{ref}:{path}"],
                           check=True, capture_output=True, text=True).stdout.split()
    return Package({n: subprocess.run(["git", "--git-dir", git_dir, "show", f"{ref}:{path}/{n}"], check=True,
                                      capture_output=True, text=True).stdout
                    for n in names if n.endswith(".go") and not n.endswith("_test.go")})


def schema_literal(pkg: Package, func: str, marker: list[str]) -> list[str]:
    body = pkg.function_body(func)
    if body is None:
        raise SystemExit(f"no func {func}() in the package")
    at = next(i for i in range(len(body)) if body[i:i + len(marker)] == marker)
    start = body.index("{", at)
    return body[at:_close(body, start) + 1]


MAP = ["map", "[", "string", "]", "*", "schema", ".", "Schema", "{"]
IDENT = "^[A-Za-z_][A-Za-z0-9_-]*$"
REF = "^proxmox\\.[A-Za-z_][A-Za-z0-9_-]*$"


def derive(git_dir: str, ref: str) -> dict[str, Any]:
    version = ref.removeprefix("v")
    vm, disk, net = (package(git_dir, ref, f"proxmoxtf/resource/vm{sub}") for sub in ("", "/disk", "/network"))
    provider = package(git_dir, ref, "proxmoxtf/provider")
    others = {"disk": disk, "network": net}
    attrs = parse_map(schema_literal(vm, "VM", MAP), vm, others)
    attrs |= parse_map(schema_literal(disk, "Schema", MAP), disk, others)
    attrs |= parse_map(schema_literal(net, "Schema", MAP), net, others)
    vm_schema = to_json_schema(attrs)
    vm_schema["properties"] |= {
        "provider": {"type": "string", "pattern": REF},
        "lifecycle": {"type": "object", "additionalProperties": False, "properties": {
            "ignore_changes": {"type": "array", "items": {"type": "string"}},
            "prevent_destroy": {"type": "boolean"}, "create_before_destroy": {"type": "boolean"}}},
    }
    provider_schema = to_json_schema(parse_map(schema_literal(provider, "createSchema", MAP), provider, {}))
    provider_schema["properties"]["alias"] = {"type": "string", "pattern": IDENT}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": f"Terraform/OpenTofu JSON configuration for bpg/proxmox {version}, derived by "
                    f"tests/data/derive_bpg_schema.py from the provider's source at {ref} (provider block: "
                    "proxmoxtf/provider/schema.go; proxmox_virtual_environment_vm: proxmoxtf/resource/vm/vm.go, "
                    "disk/schema.go, network/schema.go). Do not edit: re-derive.",
        "type": "object", "additionalProperties": False, "required": ["terraform", "provider", "resource"],
        "properties": {
            "terraform": {"type": "object", "additionalProperties": False, "required": ["required_providers"],
                          "properties": {"required_providers": {
                              "type": "object", "additionalProperties": False, "required": ["proxmox"],
                              "properties": {"proxmox": {
                                  "type": "object", "additionalProperties": False, "required": ["source", "version"],
                                  "properties": {"source": {"const": "bpg/proxmox"},
                                                 "version": {"type": "string",
                                                             "pattern": f"^(~> )?{re.escape(version)}$"}}}}}}},
            "variable": {"type": "object", "propertyNames": {"pattern": IDENT}, "additionalProperties": {
                "type": "object", "additionalProperties": False, "properties": {
                    "type": {"type": "string"}, "sensitive": {"type": "boolean"},
                    "description": {"type": "string"}}}},
            "provider": {"type": "object", "additionalProperties": False,
                         "properties": {"proxmox": {"type": "array", "minItems": 1, "items": provider_schema}}},
            "resource": {"type": "object", "additionalProperties": False, "properties": {
                "proxmox_virtual_environment_vm": {"type": "object", "propertyNames": {"pattern": IDENT},
                                                   "additionalProperties": vm_schema}}},
            "import": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["to", "id"], "properties": {
                    "to": {"type": "string", "pattern": "^proxmox_virtual_environment_vm\\.[A-Za-z_][A-Za-z0-9_-]*$"},
                    "id": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9.-]*/[0-9]+$"},
                    "provider": {"type": "string", "pattern": REF}}}},
        },
    }


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(json.dumps(derive(sys.argv[1], sys.argv[2]), indent=1, sort_keys=True))
