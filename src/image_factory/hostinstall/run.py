"""The stage's entry points for tasks/host.py: write answers, serve them, prepare install media."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

from image_factory.errors import bad_flag
from image_factory.files import write_atomic
from image_factory.hostinstall.answer import AnswerError
from image_factory.hostinstall.firstboot import FIRST_BOOT_HOOK
from image_factory.hostinstall.gather import rendered_answers
from image_factory.hostinstall.media import MediaPlan, find_assistant, prepare, read_sums
from image_factory.hostinstall.model import RenderedAnswer
from image_factory.hostinstall.server import AnswerServer, certificate_fingerprint, ensure_certificate
from image_factory.site.inventory import Hypervisor, Site
from image_factory.site.secrets import read_secret

TOKEN_ENV = "FACTORY_ANSWER_TOKEN"  # noqa: S105 - the variable's name, not a secret
DEFAULT_PORT = 8443


def hosts_dir(builds_dir: Path) -> Path:
    return builds_dir / "hosts"


def installable(site: Site, names: list[str] | None) -> list[Hypervisor]:
    chosen = site.select_hypervisors(names)
    with_install = [hv for hv in chosen if hv.install is not None]
    if names and len(with_install) < len(chosen):
        missing = ", ".join(hv.name for hv in chosen if hv.install is None)
        raise AnswerError(f"{missing}: the inventory has no pve.install mapping (see docs/host-install.md)")
    if not with_install:
        raise AnswerError(f"no hypervisor in {site.inventory_path} has a pve.install mapping "
                          "(see docs/host-install.md)")
    return with_install


def write_first_boot_hook(builds_dir: Path) -> Path:
    return write_atomic(hosts_dir(builds_dir) / "first-boot.sh", FIRST_BOOT_HOOK, mode=0o755)


@dataclass(frozen=True)
class WrittenAnswer:
    hypervisor: str
    path: Path
    macs: tuple[str, ...]


def write_answers(site: Site, names: list[str] | None, builds_dir: Path,
                  output: Path | None = None) -> list[WrittenAnswer]:
    """Each answer rendered and checked before any is written; written 0600 (it holds the root password hash)."""
    answers = rendered_answers(installable(site, names))
    if output is not None and len(answers) != 1:
        raise bad_flag("--output", "names one file: give one hypervisor")
    written = []
    for answer in answers:
        path = output or hosts_dir(builds_dir) / answer.hypervisor / "answer.toml"
        write_atomic(path, answer.toml, mode=0o600)
        written.append(WrittenAnswer(answer.hypervisor, path, answer.macs))
    return written


def read_token(token_env: str | None, token_file: str | None) -> str:
    return read_secret(env=token_env or (None if token_file else TOKEN_ENV), file=token_file,
                       what="answer-server token")


@dataclass(frozen=True)
class ServerSetup:
    server: AnswerServer
    fingerprint: str
    cert: Path
    cert_made: bool
    answers: list[RenderedAnswer]


def answer_server(site: Site, builds_dir: Path, bind: str, port: int, names: list[str], cert: Path | None,
                  key: Path | None, token: str, log: Callable[[str], None]) -> ServerSetup:
    """Everything read, rendered and checked before the port opens."""
    answers = rendered_answers(installable(site, None))
    if (cert is None) != (key is None):
        raise bad_flag("--cert/--key", "give both, or neither (a certificate is then made and kept)")
    tls_dir = hosts_dir(builds_dir) / "answer-server"
    cert, key = cert or tls_dir / "cert.pem", key or tls_dir / "key.pem"
    made = ensure_certificate(cert, key, names or [bind])
    server = AnswerServer((bind, port), answers, token, cert, key, log)
    return ServerSetup(server, certificate_fingerprint(cert.read_bytes()), cert, made, answers)


def fingerprint_of(cert: Path) -> str:
    try:
        return certificate_fingerprint(cert.expanduser().read_bytes())
    except OSError as exc:
        raise bad_flag("--cert", f"{cert}: cannot read it: {exc.strerror}") from None
    except ValueError:
        raise bad_flag("--cert", f"{cert}: not a PEM certificate") from None


def answer_url(url: str, token: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query=urlencode({"token": token})))


def make_media(site: Site, builds_dir: Path, *, iso: Path, sums: str, fetch_from: str, hypervisor: str | None,
               url: str | None, fingerprint: str | None, token: str | None, output: Path | None) -> Path:
    """The plan checked and the assistant found first (cheap), the answer rendered, then the sums read, the ISO
    verified and prepared."""
    if fetch_from == "http" and hypervisor:
        raise bad_flag("--hypervisor", "--fetch-from http serves every hypervisor from the answer server: drop it")
    if fetch_from == "partition" and not hypervisor:
        raise bad_flag("--hypervisor", "--fetch-from partition: name the hypervisor whose answer.toml goes onto "
                                       "the partition")
    answer_file = hosts_dir(builds_dir) / hypervisor / "answer.toml" if hypervisor else None
    suffix = hypervisor if fetch_from == "iso" and hypervisor else fetch_from
    plan = MediaPlan(iso=iso, output=output or hosts_dir(builds_dir) / f"{iso.stem}-auto-{suffix}.iso",
                     fetch_from=fetch_from,  # type: ignore[arg-type]  # MediaPlan checks it
                     first_boot_hook=hosts_dir(builds_dir) / "first-boot.sh", answer_file=answer_file,
                     url=answer_url(url, token) if url and token else url, cert_fingerprint=fingerprint)
    assistant = find_assistant()
    if hypervisor:
        write_answers(site, [hypervisor], builds_dir)
    write_first_boot_hook(builds_dir)
    return prepare(plan, read_sums(sums), sums, assistant=assistant)
