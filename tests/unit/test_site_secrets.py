"""Secrets (site/secrets.py): only from the environment, a 0600 file outside the repository or the vault; every
value read is masked in what is printed; a damaged one is refused naming where it came from, never echoing it."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from image_factory.console import MASK, mask
from image_factory.errors import SecretError
from image_factory.site.secrets import private_file, read_key_pair, read_secret

pytestmark = pytest.mark.unit
# the names of the environment variables a key pair is read from (names, not secrets)
PAIR_ENV = {"key_env": "FACTORY_TEST_KEY", "secret_env": "FACTORY_TEST_SECRET"}


def fresh() -> str:
    """A secret no other test registered with the console (the mask set is process-wide)."""
    return f"s{uuid.uuid4().hex}"


def secret_file(directory: Path, text: str, mode: int = 0o600) -> Path:
    path = directory / "secret"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def test_a_secret_from_the_environment_is_returned_stripped_and_masked_from_then_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    value = fresh()
    monkeypatch.setenv("FACTORY_TEST_SECRET", f"  {value}\n")
    assert read_secret(env="FACTORY_TEST_SECRET", file=None, what="pve-mgmt") == value
    assert mask(f"token {value}") == f"token {MASK}"


def test_an_unset_or_empty_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACTORY_TEST_SECRET", "  ")
    with pytest.raises(SecretError, match="pve-mgmt: environment variable FACTORY_TEST_SECRET is not set or empty"):
        read_secret(env="FACTORY_TEST_SECRET", file=None, what="pve-mgmt")
    with pytest.raises(SecretError, match="no token_secret_env, token_secret_file or vaulted token_secret"):
        read_secret(env=None, file=None, what="pve-mgmt")


def test_a_secret_with_whitespace_inside_is_refused_and_each_part_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = fresh(), fresh()
    monkeypatch.setenv("FACTORY_TEST_SECRET", f"{first}\n{second}")
    with pytest.raises(SecretError, match="environment variable FACTORY_TEST_SECRET holds whitespace") as err:
        read_secret(env="FACTORY_TEST_SECRET", file=None, what="pve-mgmt")
    assert first not in str(err.value) and second not in str(err.value)
    assert mask(f"{first} {second}") == f"{MASK} {MASK}"


def test_a_0600_file_outside_the_repository_is_read(tmp_path: Path) -> None:
    value = fresh()
    path = secret_file(tmp_path, f"{value}\n")
    assert read_secret(env=None, file=path, what="pve-mgmt", repo_root=tmp_path / "repo") == value


@pytest.mark.parametrize(("mode", "where", "message"), [
    (0o640, "outside", "accessible by group/others (mode 0640); run: chmod 600"),
    (0o604, "outside", "accessible by group/others (mode 0604)"),
    (0o600, "inside", "is inside the repository; keep secrets outside it"),
])
def test_a_readable_or_repository_file_is_refused_with_the_fix(tmp_path: Path, mode: int, where: str,
                                                                  message: str) -> None:
    path = secret_file(tmp_path, fresh(), mode)
    repo = tmp_path if where == "inside" else tmp_path / "repo"
    with pytest.raises(SecretError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_secret(env=None, file=path, what="pve-mgmt", repo_root=repo)


def test_a_missing_or_empty_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match=f"secret file {tmp_path / 'absent'} does not exist"):
        private_file(tmp_path / "absent", "pve-mgmt", tmp_path / "repo")
    path = secret_file(tmp_path, "\n")
    with pytest.raises(SecretError, match="is empty"):
        read_secret(env=None, file=path, what="pve-mgmt", repo_root=tmp_path / "repo")


def test_a_key_pair_file_gives_key_and_secret_and_names_a_missing_line(tmp_path: Path) -> None:
    key, secret = fresh(), fresh()
    path = secret_file(tmp_path, f"key={key}\nsecret={secret}\n")
    assert read_key_pair(**PAIR_ENV, file=path, what="opnsense", repo_root=tmp_path / "r") == (
        key, secret)
    assert mask(secret) == MASK
    path.write_text(f"key={key}\n", encoding="utf-8")
    with pytest.raises(SecretError, match=r"has no secret= line \(expected key=\.\.\. and secret=\.\.\.\)"):
        read_key_pair(**PAIR_ENV, file=path, what="opnsense", repo_root=tmp_path / "r")


def test_a_key_pair_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    key, secret = fresh(), fresh()
    monkeypatch.setenv("FACTORY_TEST_KEY", key)
    monkeypatch.setenv("FACTORY_TEST_SECRET", secret)
    assert read_key_pair(**PAIR_ENV, file=None, what="opnsense") == (key, secret)
