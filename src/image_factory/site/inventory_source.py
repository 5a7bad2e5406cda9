"""An Ansible inventory, read by ansible-core itself: what ``ansible-inventory -i PATH --list`` shows.

YAML, INI and TOML inventory files (one file, or a directory of them), ``group_vars/`` and ``host_vars/``
beside them (files or directories), Ansible's variable precedence, and vault-encrypted values: inline
``!vault`` values and whole vaulted files. The vault password comes from Ansible's own settings
(ANSIBLE_VAULT_PASSWORD_FILE / ANSIBLE_VAULT_IDENTITY_LIST, or vault_password_file / vault_identity_list
in ansible.cfg); there is no prompt.

Only static inventories are read: inventory scripts and plugin configurations (the ``script`` and
``auto`` plugins) would run code or open connections, and reading the site model does neither.

ansible-core costs about 0.3 s to import, so it is imported here, when an inventory is read, and never
by commands that read none. Values come back as plain Python data (a vaulted string as ``Vaulted``),
each with the file it came from, so an error names ``host_vars/pve-mgmt.yml``, not the directory.
The file of a value is ansible-core's own origin tag (a diagnostic it keeps for its error messages);
where a later ansible-core drops it, errors name the file that declares the host instead.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from image_factory.errors import Problem
from image_factory.settings import REPO_ROOT

STATIC_PLUGINS = ("yaml", "ini", "toml")
YAML_SUFFIXES = (".yml", ".yaml", ".json")
NO_PASSWORD_HINT = ("no vault password is configured: set ANSIBLE_VAULT_PASSWORD_FILE (or "  # noqa: S105 - advice
                    "vault_password_file in ansible.cfg) to a 0600 file outside the repository that holds it")
_ORIGIN_RE = re.compile(r"^Origin: (?P<path>.+?)(?::(?P<line>\d+)(?::\d+)?)?$", re.MULTILINE)


class Vaulted(str):
    """A string that is encrypted at rest: an inline ``!vault`` value or one from a vault-encrypted file."""

    __slots__ = ()


class YamlIntForm(int):
    """An integer written in a form only YAML 1.1 reads as this number (0156 octal, 0x6e, 0b1, 1:50 sexagesimal,
    1_10): the same number to every reader of the site model, remembered so a tenant's id and VLAN can refuse it."""

    text: str


_DECIMAL = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_SCALAR = re.compile(r"[^\s,\]}#]+")


@dataclass
class HostVars:
    """One host: its groups (with every ancestor) and the variables asked for, after Ansible's precedence."""

    name: str
    file: str  # the inventory file that declares the host
    groups: frozenset[str]
    vars: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # variable -> the file its value came from

    def source(self, key: str) -> str:
        return self.sources.get(key, self.file)


@dataclass
class Inventory:
    hosts: dict[str, HostVars] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)  # a group's own variables asked for
    group_sources: dict[str, dict[str, str]] = field(default_factory=dict)


def read(path: Path, problems: list[Problem], *, host_keys: Collection[str], group_keys: Collection[str],
         only_groups: Collection[str] | None = None) -> Inventory:
    """The inventory at ``path``: for every host (of ``only_groups``, if given) the variables ``host_keys``, for
    every group its own ``group_keys``; what cannot be read becomes a Problem naming the file."""
    if not path.exists():
        problems.append(Problem(str(path), "", "", "file not found"))
        return Inventory()
    reader = _Reader(path, problems)
    return reader.run(host_keys, group_keys, only_groups)


def flat(path: Path, problems: list[Problem]) -> dict[str, dict[str, Any]]:
    """Every group of the inventory with its own variables and its hosts' own variables (inventory files,
    group_vars/ and host_vars/ merged per entity, as ``ansible-inventory --list --export`` keeps them)."""
    if not path.exists():
        problems.append(Problem(str(path), "", "", "file not found"))
        return {}
    return _Reader(path, problems).flat()


# ------------------------------------------------------------------------------------------ reading


class _Reader:
    def __init__(self, path: Path, problems: list[Problem]):
        # ansible-core takes 0.3 s to import: only when an inventory is read (module docstring)
        from ansible.parsing.dataloader import DataLoader

        self.path = path
        self.problems = problems
        self.loader = DataLoader()
        # VariableManager also reads group_vars/ and host_vars/ beside "the playbook", its loader's basedir: that
        # is the current directory unless set. The inventory's own directory makes those the same files (read
        # once more, same precedence), so the directory a command runs from changes nothing.
        self.loader.set_basedir(str(path if path.is_dir() else path.parent))
        self.vault_notes: list[str] = []
        self.secrets = self._vault_secrets()
        self.loader.set_vault_secrets(self.secrets)
        self._encrypted_files: dict[str, bool] = {}
        self._lines: dict[str, list[str]] = {}
        self._seen: set[Problem] = set()

    def _problem(self, problem: Problem) -> None:
        if problem not in self._seen:
            self._seen.add(problem)
            self.problems.append(problem)

    # ---------------------------------------------------------------- parsing
    def _inventory(self) -> Any:
        # ansible-core takes 0.3 s to import: only when an inventory is read (module docstring)
        from ansible.inventory.manager import InventoryManager

        failures: list[tuple[str, str, BaseException]] = []

        class _Recording:
            """A static inventory plugin whose failures are kept for the error report."""

            def __init__(self, plugin: Any):
                self._plugin = plugin

            def __getattr__(self, name: str) -> Any:
                return getattr(self._plugin, name)

            def parse(self, inventory: Any, loader: Any, source: str, cache: bool = False) -> Any:
                try:
                    return self._plugin.parse(inventory, loader, source, cache=cache)
                except Exception as exc:
                    failures.append((source, self._plugin._load_name, exc))
                    raise

        class _StaticInventory(InventoryManager):
            def _fetch_inventory_plugins(self) -> list[Any]:
                return [_Recording(p) for p in super()._fetch_inventory_plugins()
                        if str(getattr(p, "_load_name", "")).rsplit(".", 1)[-1] in STATIC_PLUGINS]

        with _quiet() as warnings:
            inventory = _StaticInventory(loader=self.loader, sources=[str(self.path)])
        parsed = set(inventory._inventory.processed_sources)
        for source in dict.fromkeys(src for src, _, _ in failures if src not in parsed):
            mine = [(plugin, exc) for src, plugin, exc in failures if src == source]
            preferred = "yaml" if Path(source).suffix in YAML_SUFFIXES else "ini"
            plugin, exc = next(((p, e) for p, e in mine if p == preferred), mine[0])
            line = _yaml_line(exc)
            self._problem(Problem(source, "", f"line {line}" if line else "",
                                  f"not readable as an Ansible inventory ({plugin}): {self._reason(exc)}"))
        for text, context in warnings:
            if text.startswith("Found duplicate mapping key"):
                where = _ORIGIN_RE.search(context or "")
                key = re.search(r"'(.*)'", text)
                self._problem(Problem(where["path"] if where else str(self.path), "",
                                      f"line {where['line']}" if where and where["line"] else "",
                                      f"duplicate key {key[1]!r}" if key else text))
        return inventory

    def _reason(self, exc: BaseException) -> str:
        text = _first_line(exc)
        if any(_is_vault_error(e) for e in _chain(exc)) or "vault" in text.lower():
            if not self.secrets:
                return f"is vault-encrypted and {self._vault_hint()}"
            text = f"{text.rstrip('.')}; {self._vault_hint()}"
        return text

    def _vault_hint(self) -> str:
        return "; ".join(self.vault_notes) if self.vault_notes else (
            NO_PASSWORD_HINT if not self.secrets else "the configured vault password does not decrypt it")

    # ---------------------------------------------------------------- vault
    def _vault_secrets(self) -> list[tuple[str, Any]]:
        """Ansible's configured vault passwords; a password file readable by others, or inside the repository, is
        refused (noted for the error a vaulted value then meets), as every secret file of the factory is."""
        # ansible-core takes 0.3 s to import: only when an inventory is read (module docstring)
        from ansible.errors import AnsibleError
        from ansible.parsing.vault import get_file_vault_secret

        from ansible import constants as C  # type: ignore[attr-defined]  # noqa: N812 - ansible's own name

        sources: list[tuple[str, str, str]] = []
        for entry in C.config.get_config_value("DEFAULT_VAULT_IDENTITY_LIST") or []:
            name, _, source = str(entry).rpartition("@")
            sources.append((name or C.DEFAULT_VAULT_IDENTITY, source, f"vault identity {entry}"))
        password_file = C.config.get_config_value("DEFAULT_VAULT_PASSWORD_FILE")
        if password_file:
            sources.append((C.DEFAULT_VAULT_IDENTITY, str(password_file), "vault password file"))
        secrets: list[tuple[str, Any]] = []
        for vault_id, source, what in sources:
            if source in ("prompt", "prompt_ask_vault_pass"):
                self.vault_notes.append(f"{what}: a prompt is not supported here; use a password file")
                continue
            refused = _refused_password_file(Path(source).expanduser())
            if refused:
                self.vault_notes.append(f"{what} {source} {refused}")
                continue
            try:
                secret = get_file_vault_secret(filename=source, vault_id=vault_id, loader=self.loader)
                secret.load()
            except AnsibleError as exc:
                self.vault_notes.append(f"{what} {source}: {_first_line(exc)}")
                continue
            secrets.append((vault_id, secret))
        return secrets

    def _encrypted_file(self, path: str | None) -> bool:
        if not path:
            return False
        if path not in self._encrypted_files:
            try:
                with open(path, "rb") as fh:
                    self._encrypted_files[path] = fh.read(len(b"$ANSIBLE_VAULT;")) == b"$ANSIBLE_VAULT;"
            except OSError:
                self._encrypted_files[path] = False
        return self._encrypted_files[path]

    def _decrypt(self, value: Any) -> str:
        # ansible-core takes 0.3 s to import: only when an inventory is read (module docstring)
        from ansible.parsing.vault import VaultHelper, VaultLib

        ciphertext = VaultHelper.get_ciphertext(value, with_tags=False)
        if not self.secrets:
            raise ValueError(self._vault_hint())
        try:
            return VaultLib(self.secrets).decrypt(ciphertext).decode("utf-8")
        except Exception as exc:  # ansible raises AnsibleError, cryptography its own: both mean "not decrypted"
            raise ValueError(f"cannot be decrypted: {_first_line(exc)}; {self._vault_hint()}") from None

    # ---------------------------------------------------------------- values
    def plain(self, value: Any, file: str, entry: str, key: str) -> Any:
        """``value`` as plain Python data, vaulted strings decrypted (as Vaulted); a value that cannot be
        decrypted becomes a Problem naming its file and key, and an empty Vaulted (present, so that the one problem
        is not followed by a "missing" one)."""
        # ansible-core takes 0.3 s to import: only when an inventory is read (module docstring)
        from ansible.parsing.vault import EncryptedString

        if isinstance(value, EncryptedString):
            try:
                return Vaulted(self._decrypt(value))
            except ValueError as exc:
                self._problem(Problem(_origin(value) or file, entry, key, f"is vault-encrypted and {exc}"))
                return Vaulted("")
        if isinstance(value, Mapping):
            return {(str(k) if isinstance(k, str) else k): self.plain(v, file, entry, f"{key}.{k}")
                    for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.plain(v, file, entry, f"{key}.{i}") for i, v in enumerate(value)]
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, int):
            written = self._written(value)
            if written is None or _DECIMAL.fullmatch(written):
                return int(value)
            form = YamlIntForm(int(value))
            form.text = written
            return form
        if isinstance(value, float):
            return float(value)
        if isinstance(value, str):
            return Vaulted(value) if self._encrypted_file(_origin(value)) else str(value)
        return value

    def _written(self, value: Any) -> str | None:
        """The text a YAML value was written as (its origin's line and column), where ansible-core kept them."""
        try:
            # ansible-core takes 0.3 s to import: only when an inventory is read (module docstring)
            from ansible._internal._datatag._tags import Origin
        except ImportError:  # a later ansible-core: integers then read as YAML 1.1 reads them
            return None
        tag = Origin.get_tag(value)
        if tag is None or not tag.path or not tag.line_num or not tag.col_num or self._encrypted_file(tag.path):
            return None
        if tag.path not in self._lines:
            try:
                self._lines[tag.path] = Path(tag.path).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError):
                self._lines[tag.path] = []
        lines = self._lines[tag.path]
        found = _SCALAR.match(lines[tag.line_num - 1][tag.col_num - 1:]) if tag.line_num <= len(lines) else None
        return found[0] if found else None

    def _keys(self, variables: Mapping[str, Any], keys: Collection[str], fallback: str,
              entry: str) -> tuple[dict[str, Any], dict[str, str]]:
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for key in keys:
            if key in variables:
                sources[key] = _origin(variables[key]) or fallback
                values[key] = self.plain(variables[key], sources[key], entry, key)
        return values, sources

    # ---------------------------------------------------------------- entry points
    def run(self, host_keys: Collection[str], group_keys: Collection[str],
            only_groups: Collection[str] | None) -> Inventory:
        # ansible-core takes 0.3 s to import: only when an inventory is read (module docstring)
        from ansible.vars.manager import VariableManager

        inventory = self._inventory()
        variables = VariableManager(loader=self.loader, inventory=inventory)
        out = Inventory()
        with _quiet():
            for group in inventory.groups.values():
                own = self._group_vars(inventory, group)
                if own is None:
                    continue
                name = str(group.name)
                out.groups[name], out.group_sources[name] = self._keys(own, group_keys, self._declared(None),
                                                                       f"group {name}")
            for host in inventory.get_hosts():
                groups = frozenset(str(g.name) for g in host.get_groups())
                if only_groups is not None and not groups & set(only_groups):
                    continue
                declared = self._declared(host)
                try:
                    merged = variables.get_vars(host=host, include_hostvars=False, stage="all")
                except Exception as exc:  # ansible-core raises AnsibleError and, from plugins, anything
                    self._unreadable(exc, declared)
                    continue
                name = str(host.name)
                vals, sources = self._keys(merged, host_keys, declared, name)
                out.hosts[name] = HostVars(name, declared, groups, vals, sources)
        return out

    def flat(self) -> dict[str, dict[str, Any]]:
        # ansible-core takes 0.3 s to import: only when an inventory is read (module docstring)
        from ansible.vars.plugins import get_vars_from_inventory_sources

        inventory = self._inventory()
        out: dict[str, dict[str, Any]] = {}
        with _quiet():
            for group in inventory.groups.values():
                if group.name in ("all", "ungrouped") and not group.hosts:
                    continue
                own = self._group_vars(inventory, group) or {}
                body: dict[str, Any] = {"vars": self.plain(_public(own), str(self.path), f"group {group.name}", ""),
                                        "hosts": {}}
                for host in group.hosts:
                    try:
                        host_vars = {**host.vars, **get_vars_from_inventory_sources(
                            self.loader, inventory._sources, [host], "all")}
                    except Exception as exc:  # as in run()
                        self._unreadable(exc, self._declared(host))
                        continue
                    body["hosts"][str(host.name)] = self.plain(_public(host_vars), self._declared(host),
                                                               str(host.name), "")
                out[str(group.name)] = body
        return out

    def _group_vars(self, inventory: Any, group: Any) -> dict[str, Any] | None:
        # ansible-core takes 0.3 s to import: only when an inventory is read (module docstring)
        from ansible.vars.plugins import get_vars_from_inventory_sources

        try:
            return {**group.get_vars(), **get_vars_from_inventory_sources(
                self.loader, inventory._sources, [group], "all")}
        except Exception as exc:  # as in run()
            self._unreadable(exc, str(self.path))
            return None

    def _unreadable(self, exc: BaseException, fallback: str) -> None:
        """A variables file ansible-core could not read: one problem per file, however many hosts it serves."""
        file, line = _error_place(exc)
        self._problem(Problem(file or fallback, "", line, self._reason(exc)))

    def _declared(self, host: Any) -> str:
        return str((host.vars.get("inventory_file") if host is not None else None) or self.path)


# ------------------------------------------------------------------------------------------ helpers


class _quiet:  # noqa: N801 - used as a context manager like contextlib's
    """Ansible's warnings during a read are collected (as (message, origin context)), never printed: what
    matters becomes a Problem."""

    def __enter__(self) -> list[tuple[str, str | None]]:
        self.found: list[tuple[str, str | None]] = []
        try:
            # ansible-core takes 0.3 s to import: only when an inventory is read (module docstring)
            from ansible._internal._display_utils import DeferredWarningContext
        except ImportError:  # a later ansible-core: its warnings are then printed, nothing else changes
            self.ctx = None
            return self.found
        self.ctx = DeferredWarningContext(variables={})
        self.ctx.__enter__()
        return self.found

    def __exit__(self, *exc: object) -> None:
        if self.ctx is None:
            return
        for warning in self.ctx.get_warnings():
            event = warning.event
            self.found.append((str(event.msg), event.formatted_source_context))
        self.ctx.__exit__(*exc)


def _origin(value: Any) -> str | None:
    try:
        # ansible-core takes 0.3 s to import: only when an inventory is read (module docstring)
        from ansible._internal._datatag._tags import Origin
    except ImportError:  # a later ansible-core: errors then name the file that declares the host
        return None
    tag = Origin.get_tag(value)
    return str(tag.path) if tag is not None and tag.path else None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _is_vault_error(exc: BaseException) -> bool:
    return type(exc).__name__ == "AnsibleVaultError"


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _yaml_line(exc: BaseException) -> int | None:
    for cur in _chain(exc):
        mark = getattr(cur, "problem_mark", None)
        if mark is not None and getattr(mark, "line", None) is not None:
            return int(mark.line) + 1
    return None


def _error_place(exc: BaseException) -> tuple[str | None, str]:
    """The file an ansible-core error is about and "line N" where it says, else (None, "")."""
    line = _yaml_line(exc)
    for cur in _chain(exc):
        obj: Any = getattr(cur, "obj", None)
        if type(obj).__name__ == "Origin" and getattr(obj, "path", None):
            line = line or obj.line_num
            return str(obj.path), f"line {line}" if line else ""
        found = re.search(r"(/[^\s'\"]+\.(?:ya?ml|json|ini|toml))", str(cur))
        path = _origin(obj) or getattr(cur, "file_name", None) or (found[1] if found else None)
        if path:
            return str(path), f"line {line}" if line else ""
    return None, ""


def _public(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Without what ansible-core adds to every host (inventory_file, inventory_dir)."""
    return {k: v for k, v in variables.items() if k not in ("inventory_file", "inventory_dir")}


def _refused_password_file(path: Path) -> str | None:
    """Why a vault password file may not be used, or None. An executable one is a script that prints the
    password (ansible runs it): it holds no secret, so only its being inside the repository matters."""
    try:
        st = path.stat()
    except OSError:
        return None  # ansible-core's own error names it
    try:
        path.resolve().relative_to(REPO_ROOT.resolve())
    except ValueError:
        pass
    else:
        return "is inside the repository; keep secrets outside it"
    executable = st.st_mode & stat.S_IXUSR
    if not executable and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"is readable by group/others (mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
    return None
