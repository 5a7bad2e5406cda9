"""host.*: bare metal to a Proxmox VE host (docs/host-install.md): answer files, the answer server, install media."""

from __future__ import annotations

from pathlib import Path

from invoke.collection import Collection
from invoke.context import Context

from image_factory.console import console, emit_json, styled
from image_factory.errors import bad_flag
from image_factory.hostinstall import run as hostinstall
from image_factory.hostinstall.media import FETCH_MODES
from image_factory.tasks._common import SITE_HELP, handle_errors, json_help, site, task


@task(
    positional=["hypervisor"],
    help={
        "hypervisor": "the hypervisor (inventory name), or 'all': every hypervisor with pve.install",
        "output": "write the answer here instead of builds/hosts/<hypervisor>/answer.toml (one hypervisor only)",
        "json": json_help("the answers written"),
        **SITE_HELP,
    },
)
@handle_errors
def answer(c: Context, hypervisor: str | None = None, output: str | None = None, json: bool = False,
           inventory: str | None = None, catalogue: str | None = None) -> None:
    """Render each hypervisor's answer.toml for Proxmox's automated installer from the site model (0600)."""
    s, model = site(c, inventory, catalogue)
    names = None if hypervisor == "all" else [str(hypervisor)]
    written = hostinstall.write_answers(model, names, s.builds_dir, Path(output) if output else None)
    hook = hostinstall.write_first_boot_hook(s.builds_dir)
    if json:
        emit_json({"answers": [{"hypervisor": w.hypervisor, "path": str(w.path), "macs": list(w.macs)}
                               for w in written], "first_boot_hook": str(hook)})
        return
    for w in written:
        console.print(styled("[green]ok:[/] {}: {} (MACs {})", w.hypervisor, w.path, ", ".join(w.macs)))
    console.print(f"first-boot hook: {hook} (prepare-iso --on-first-boot; invoke host.media adds it)")


@task(
    iterable=["cert_name"],
    help={
        "bind": "address to listen on (required: no default exposure), e.g. 192.0.2.10 or 0.0.0.0",
        "port": f"TCP port (default {hostinstall.DEFAULT_PORT})",
        "cert_name": "DNS name or address the installers use for this server, for the certificate made on first run "
                "(repeatable; default: --bind)",
        "cert": "PEM certificate to serve (with --key); default: builds/hosts/answer-server/cert.pem, made once and "
                "kept (ISOs pin its fingerprint)",
        "key": "PEM private key of --cert",
        "token_env": f"environment variable holding the token (default {hostinstall.TOKEN_ENV})",
        "token_file": "0600 file outside the repository holding the token",
        **SITE_HELP,
    },
)
@handle_errors
def answer_server(c: Context, bind: str = "", port: int = hostinstall.DEFAULT_PORT, cert_name: list[str] | None = None,
                  cert: str | None = None, key: str | None = None, token_env: str | None = None,
                  token_file: str | None = None, inventory: str | None = None, catalogue: str | None = None) -> None:
    """Serve every hypervisor's answer over HTTPS to the installer whose NIC MACs match it (Ctrl-C stops)."""
    if not bind:
        raise bad_flag("--bind", "required: the address to listen on, e.g. 192.0.2.10 (no default exposure)")
    s, model = site(c, inventory, catalogue)
    token = hostinstall.read_token(token_env, token_file)
    setup = hostinstall.answer_server(model, s.builds_dir, bind, port, cert_name or [], Path(cert) if cert else None,
                                      Path(key) if key else None, token,
                                      lambda line: console.print(styled("answer-server: {}", line)))
    if setup.cert_made:
        console.print(f"made certificate {setup.cert} (kept: ISOs prepared now pin it)")
    console.print(styled("serving {} on https://{}:{}/answer", ", ".join(a.hypervisor for a in setup.answers),
                         bind, setup.server.port))
    console.print(f"--cert-fingerprint {setup.fingerprint}")
    console.print("prepare the ISO with: invoke host.media --fetch-from http --url "
                  f"https://<this server>:{setup.server.port}/answer --cert-fingerprint {setup.fingerprint} ...")
    try:
        setup.server.serve_forever()
    finally:
        setup.server.server_close()


@task(
    help={
        "iso": "Proxmox VE ISO as downloaded (its file name as listed in the sums)",
        "sums": "Proxmox's SHA256SUMS: a local file or an https:// URL",
        "fetch_from": f"where the installer finds its answer: {', '.join(FETCH_MODES)}",
        "hypervisor": "iso: the hypervisor whose answer is embedded; partition: whose answer.toml to copy onto the "
                      "'proxmox-ais' partition",
        "url": "http: the answer server's URL, e.g. https://192.0.2.10:8443/answer (the token is added)",
        "cert_fingerprint": "http: the answer server's certificate fingerprint (as host.answer-server prints it)",
        "cert": "http: or the answer server's certificate file, to take the fingerprint from",
        "token_env": f"http: environment variable holding the token (default {hostinstall.TOKEN_ENV})",
        "token_file": "http: 0600 file outside the repository holding the token",
        "output": "where to write the prepared ISO (default builds/hosts/<iso>-auto-<hypervisor or mode>.iso)",
        **SITE_HELP,
    },
)
@handle_errors
def media(c: Context, iso: str = "", sums: str = "", fetch_from: str = "", hypervisor: str | None = None,
          url: str | None = None, cert_fingerprint: str | None = None, cert: str | None = None,
          token_env: str | None = None, token_file: str | None = None, output: str | None = None,
          inventory: str | None = None, catalogue: str | None = None) -> None:
    """Verify Proxmox's ISO against its SHA256SUMS and prepare it with proxmox-auto-install-assistant."""
    missing = [f"--{flag}" for flag, value in (("iso", iso), ("sums", sums), ("fetch-from", fetch_from)) if not value]
    if missing:
        raise bad_flag(", ".join(missing), "required")
    if fetch_from not in FETCH_MODES:
        raise bad_flag("--fetch-from", f"one of {', '.join(FETCH_MODES)} (got {fetch_from!r})")
    s, model = site(c, inventory, catalogue)
    token = None
    if fetch_from == "http":
        if cert and not cert_fingerprint:
            cert_fingerprint = hostinstall.fingerprint_of(Path(cert))
        token = hostinstall.read_token(token_env, token_file)
    out = hostinstall.make_media(model, s.builds_dir, iso=Path(iso).expanduser(), sums=sums, fetch_from=fetch_from,
                                 hypervisor=hypervisor, url=url, fingerprint=(cert_fingerprint or "").upper() or None,
                                 token=token, output=Path(output) if output else None)
    console.print(styled("[green]ok:[/] {} verified against {} and prepared: {}", Path(iso).name, sums, out))
    if fetch_from == "partition":
        console.print(f"copy {hostinstall.hosts_dir(s.builds_dir) / str(hypervisor) / 'answer.toml'} as answer.toml "
                      "onto a FAT partition labelled 'proxmox-ais' attached to the machine")


ns = Collection("host")
ns.add_task(answer, name="answer")
ns.add_task(answer_server, name="answer-server")
ns.add_task(media, name="media")
