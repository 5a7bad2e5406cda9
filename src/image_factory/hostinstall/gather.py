"""Read what an answer needs from outside the repository: the root password hash and root SSH key files."""

from __future__ import annotations

from pathlib import Path

from image_factory.errors import SecretError
from image_factory.hostinstall.answer import AnswerError, render_answer
from image_factory.hostinstall.model import AnswerSecrets, RenderedAnswer
from image_factory.site.inventory import Hypervisor, _ssh_public_key
from image_factory.site.secrets import read_secret


def answer_secrets(hv: Hypervisor) -> AnswerSecrets:
    install = hv.install
    if install is None:
        raise AnswerError(f"{hv.name}: the inventory has no pve.install mapping for this hypervisor "
                          "(see docs/host-install.md)")
    password_hash = read_secret(env=install.root_password_hash_env, file=install.root_password_hash_file,
                                what=f"{hv.name} root password hash")
    keys = list(install.root_ssh_keys)
    for file in install.root_ssh_key_files:
        keys.extend(_public_keys(hv.name, Path(file).expanduser()))
    return AnswerSecrets(password_hash, tuple(dict.fromkeys(keys)))


def _public_keys(host: str, path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SecretError(f"{host}: install.root_ssh_key_files: cannot read {path}: {exc.strerror}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                keys.append(_ssh_public_key(line.strip()))
            except ValueError as exc:
                raise SecretError(f"{host}: install.root_ssh_key_files: {path} line {number}: {exc}") from None
    if not keys:
        raise SecretError(f"{host}: install.root_ssh_key_files: {path} holds no public key")
    return keys


def rendered_answers(hypervisors: list[Hypervisor]) -> list[RenderedAnswer]:
    """Every hypervisor's answer, each read and rendered before any is written or served."""
    return [render_answer(hv, answer_secrets(hv)) for hv in hypervisors]
