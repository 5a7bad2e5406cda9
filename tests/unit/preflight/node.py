"""A fakepve node shaped like a prepared PVE 8.4 host, and the one-hypervisor site that points at it."""

from __future__ import annotations

import textwrap
from pathlib import Path

from image_factory import preflight as pf
from image_factory.settings import Settings
from image_factory.site.inventory import load_site

TOKEN = "factory@pve!image-factory"  # noqa: S105 - a token id
SECRET = "0b7f4a3e-unit-test-secret"  # noqa: S105 - test fixture
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBIKjPbOcAwqThWzRa5Ex/b92J/o3wlQ7KdlVFOwg5BD"
GRANTS = {
    "/vms": pf.VM_PRIVILEGES,
    "/storage": ("Datastore.AllocateSpace", "Datastore.AllocateTemplate", "Datastore.Audit"),
    "/sdn/zones/localnetwork": ("SDN.Use",),
    "/": ("Sys.Audit",),
}
API_CHECKS = tuple(c for c in pf.DEPLOY_CHECKS if c != "ssh")  # everything but ssh and space


def grant(pve, grants):
    pve.acl = {}
    for path, privs in grants.items():
        for who in (TOKEN, TOKEN.split("!")[0]):
            pve.grant(who, path, *privs)


def unit_site(tmp_path: Path, url: str, *, ca: str | None = None, fingerprint: str | None = None,
              bridge: str = "vmbr0"):
    tls = f"tls_ca_file: {ca}" if ca else f'tls_fingerprint: "{fingerprint}"'
    inv = tmp_path / "hosts.yml"
    inv.write_text(textwrap.dedent(f"""\
        all:
          children:
            hypervisors:
              hosts:
                hv-unit:
                  pve:
                    role: mgmt
                    node: pve1
                    api_url: {url}
                    token_id: "{TOKEN}"
                    token_secret_env: PREFLIGHT_UNIT_SECRET
                    {tls}
                    ssh: {{host: 127.0.0.1, port: 1, host_key: "{HOST_KEY}"}}
                    bridge: {bridge}
                    template_vmids: {{first: 9000, last: 9099}}
                    vm_vmids: {{first: 1000, last: 1999}}
            mgmt:
              hosts:
                unit-vm:
                  vm: {{vmid: 1001, image: tiny, role: unit, nics: [{{mac: "02:de:10:09:01:00"}}]}}
        """))
    images = tmp_path / "images.yml"
    images.write_text(textwrap.dedent("""\
        images:
          tiny:
            family: debian
            release: 12
            mode: cloud
            disk_size: 2G
            source: {url: fixtures/tiny.qcow2, checksum: none}
        """))
    settings = Settings.from_mapping({"inventory": str(inv), "images": str(images), "builds_dir": str(tmp_path / "b")})
    return settings, load_site(inv, images)



def writes(pve) -> list[tuple[str, str]]:
    return [(m, p) for m, p, _ in pve.requests if m != "GET"]

