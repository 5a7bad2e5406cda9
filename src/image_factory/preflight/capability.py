"""What the host's PVE release can do: its version (``import`` uploads need 8.4) and the firmware the catalogue asks
for (UEFI, Secure Boot key sets, vTPM, q35)."""

from __future__ import annotations

from image_factory.errors import RemoteError
from image_factory.platform import Platform
from image_factory.preflight.access import LATEST_MAJOR
from image_factory.preflight.model import PLAYBOOK, Outcome, failed, passed, split_list, warned
from image_factory.preflight.probe import HostProbe, parse_version
from image_factory.pve.capabilities import firmware_refusals

MIN_VERSION = (8, 4)
EOL_MAJORS = {8: "August 2026"}


def check_version(probe: HostProbe) -> Outcome:
    """PVE 8.4 or newer; a major past its end of life passes with a warning in the detail."""
    hv = probe.hv
    text = probe.version_text
    parsed = parse_version(text)
    need = ".".join(map(str, MIN_VERSION))
    if parsed is None:
        return failed(f"cannot read the PVE version from {probe.version!r}",
                      f"check that {hv.api_url} is a Proxmox VE {need}+ node")
    if parsed[:2] < MIN_VERSION:
        return failed(f"PVE {text} on {hv.node} is older than {need}: `import` uploads need {need} or newer",
            f"upgrade {hv.node} to Proxmox VE {need} or newer (for 7.x first: pve7to8 --full, then "
            f"switch the repositories to bookworm and apt full-upgrade)",
        )
    if parsed[0] in EOL_MAJORS:
        return passed(f"PVE {text} (warning: PVE {parsed[0]}.x reached its end of life in "
                      f"{EOL_MAJORS[parsed[0]]}: upgrade to {LATEST_MAJOR}.x with pve{parsed[0]}to"
                      f"{LATEST_MAJOR} --full, then re-run {PLAYBOOK})")
    return passed(f"PVE {text}")


def check_cluster(probe: HostProbe) -> Outcome:
    """A cluster entry's node: its cluster lists it (/cluster/resources) and online; the detail says what publish
    makes for it (one template for the cluster on shared storage, one per node on local). Any other host passes."""
    hv = probe.hv
    if hv.cluster is None:
        return _own_entry(probe)
    online, shared, _ = probe.cluster
    if hv.node not in online:
        return failed(f"node {hv.node} is not a node of the cluster (its nodes: {', '.join(sorted(online))})",
                      f"name the cluster's nodes under pve.nodes of {hv.cluster} (pvecm nodes lists them)")
    if not online[hv.node]:
        return failed(f"node {hv.node} is offline (the cluster's /cluster/resources)",
                      f"bring {hv.node} back (pvecm status on a peer); publish and deploy leave it alone meanwhile")
    makes = "is shared: one template for the cluster" if shared else "is each node's own: one template per node"
    return passed(f"node {hv.node} of {hv.cluster}, online ({sum(online.values())}/{len(online)} nodes); "
                  f"storage.images {hv.storage.images!r} {makes}")


def _own_entry(probe: HostProbe) -> Outcome:
    """A hypervisor entry of its own; a warning when its node is one of a cluster: its runs take its own host lock,
    which keeps out no run through another entry (or inventory) of the same cluster."""
    hv = probe.hv
    try:
        peers = sorted(n for n in probe.cluster_nodes if n != hv.node)
    except RemoteError:  # the other checks report what cannot be read; this one only warns
        peers = []
    if not peers:
        return passed("a hypervisor of its own")
    return warned(f"a hypervisor of its own, but node {hv.node} is in a cluster with {', '.join(peers)}: its host "
                  "lock keeps no run through another entry of the cluster out, and VMIDs are the cluster's",
                  f"describe the cluster as one entry that lists {hv.node} and its peers under pve.nodes "
                  "(docs/inventory.md, \"A Proxmox VE cluster\")")


def check_firmware(probe: HostProbe) -> Outcome:
    """Every catalogue image that boots other than BIOS/i440fx: this host's PVE can make its template
    (pve.capabilities.firmware_refusals: the key set, Microsoft's 2023 CAs), and the images storage takes its EFI
    vars and TPM state volumes (content images; PVE 8 allocates the TPM state raw, 9 in the storage's format)."""
    asks = {name: img.platform for name, img in probe.site.images.items()
            if not probe.images or name in probe.images}
    asks = {name: ask for name, ask in asks.items() if ask != Platform()}
    if not asks:
        return passed("no catalogue image asks for UEFI, a vTPM or q35")
    version = str(probe.version.get("version") or "")
    problems = [f"{name}: {why}" for name, ask in asks.items() for why in firmware_refusals(ask, version)]
    hints = ["change the entry's keys in the catalogue, or upgrade the host as named"] if problems else []
    hv = probe.hv
    images = probe.storage(hv.storage.images) or {}
    if "images" not in split_list(images.get("content")):
        problems.append(f"storage {hv.storage.images!r} cannot hold EFI vars or TPM state volumes (no content "
                        "images)")
        hints.append(f"pvesm set {hv.storage.images} --content images,<its other content types>")
    if problems:
        return failed("; ".join(problems), "; ".join(hints))
    tpm = " and TPM state (4 MiB, raw)" if probe.major < 9 else " and TPM state (4 MiB)"
    return passed(f"PVE {version} makes {', '.join(f'{n} ({a.describe()})' for n, a in asks.items())}; EFI vars"
                  f"{tpm if any(a.tpm for a in asks.values()) else ''} on {hv.storage.images} "
                  f"({images.get('type', '?')})")
