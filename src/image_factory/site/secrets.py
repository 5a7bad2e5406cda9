"""Secrets come only from the environment or from files outside the repository.

Nothing here logs or returns a secret in a printable wrapper: callers receive the value and
pass it straight to the transport. Every value read is registered with the console, which masks it
in everything printed or written as a report. A value with whitespace inside is refused: it cannot
be a PVE token secret, and an HTTP library echoes a header it rejects (line break) in its error.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from image_factory.console import register_secret
from image_factory.errors import SecretError
from image_factory.settings import REPO_ROOT


def _checked(value: str, what: str, where: str) -> str:
    value = value.strip()
    if any(ch.isspace() for ch in value) or not value.isprintable():
        register_secret(value)
        for part in value.split():
            register_secret(part)
        raise SecretError(f"{what}: {where} holds whitespace, a line break or a control character inside the "
                          "secret (a PVE token secret is one word); fix it there")
    register_secret(value)
    return value


def read_secret(*, env: str | None, file: Path | str | None, what: str, repo_root: Path = REPO_ROOT,
                vaulted: str | None = None) -> str:
    """The secret from the environment variable ``env``, the file ``file``, or ``vaulted`` (a value the inventory
    holds vault-encrypted, already decrypted)."""
    if vaulted is not None:
        return _checked(vaulted, what, "the vault-encrypted token_secret in the inventory")
    if env:
        value = os.environ.get(env)
        if not value or not value.strip():
            raise SecretError(f"{what}: environment variable {env} is not set or empty")
        return _checked(value, what, f"environment variable {env}")
    if file is None:
        raise SecretError(f"{what}: no token_secret_env, token_secret_file or vaulted token_secret configured")
    path = private_file(file, what, repo_root)
    value = path.read_text(encoding="utf-8").strip()
    if not value:
        raise SecretError(f"{what}: secret file {path} is empty")
    return _checked(value, what, f"secret file {path}")


def private_file(file: Path | str, what: str, repo_root: Path = REPO_ROOT) -> Path:
    """A secret file's path, refused inside the repository, missing, or readable by group or others."""
    path = Path(str(file)).expanduser().resolve()
    try:
        path.relative_to(repo_root.resolve())
    except ValueError:
        pass
    else:
        raise SecretError(f"{what}: secret file {path} is inside the repository; keep secrets outside it")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SecretError(f"{what}: secret file {path} does not exist") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(
            f"{what}: secret file {path} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):04o});"
            f" run: chmod 600 {path}"
        )
    return path


def read_key_pair(*, key_env: str, secret_env: str, file: Path | str | None, what: str,
                  repo_root: Path = REPO_ROOT) -> tuple[str, str]:
    """An API key and secret: from the environment, or from a 0600 ``key=...``/``secret=...`` file outside the
    repository (the apikey.txt OPNsense hands out)."""
    if file is None:
        return (read_secret(env=key_env, file=None, what=f"{what} key", repo_root=repo_root),
                read_secret(env=secret_env, file=None, what=f"{what} secret", repo_root=repo_root))
    path = private_file(file, what, repo_root)
    fields: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() in ("key", "secret"):
            fields[name.strip()] = _checked(value, what, f"{name.strip()} in {path}")
    missing = [name for name in ("key", "secret") if not fields.get(name)]
    if missing:
        raise SecretError(f"{what}: {path} has no {' and no '.join(missing)}= line (expected key=... and secret=...)")
    return fields["key"], fields["secret"]
