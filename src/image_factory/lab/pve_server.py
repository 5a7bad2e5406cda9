"""One lab hypervisor's API: a LabPve (fakepve + fidelity layer) in its own process.

    python -m image_factory.lab.pve_server --config <lab>/hosts/<name>/pve.json [--config <node2>/pve.json ...]

Several --config: the nodes of one modelled cluster, served by this one process (lab/cluster.py).

Serves https://<address>:8006 (inside the host's network namespace on a wired lab) with the node
certificate signed by the lab CA, and a control endpoint (plain HTTP over a unix socket, 0600, in the
lab's run/ directory) for fault hooks.
SIGTERM stops the VMs' qemu processes, then the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import json
import logging
import os
import signal
import sys
from pathlib import Path

from image_factory.lab.pve import LabPve
from image_factory.lab.pve.members import join_cluster
from image_factory.lab.spec import NodeSpec
from image_factory.lab.wire import entered


async def serve(specs: list[NodeSpec]) -> None:
    nodes = [LabPve(spec) for spec in specs]
    if nodes[0].cluster_spec:
        join_cluster(list(nodes))
    for pve in nodes:
        # On a wired lab only the API's socket lives in the host's namespace: the VMs' qemu, started from here,
        # keep their SSH forwards on the client's loopback.
        with entered(pve.spec.extra.get("netns")):
            await pve.start(str(pve.spec.cert), str(pve.spec.key))
        await pve.start_control()
        print(f"lab pve {pve.spec.node} listening on {pve.url}", flush=True)
    expiry = nodes[0].lock_expiry
    sweep = asyncio.create_task(expiry.run()) if expiry is not None else None  # pmxcfs's lock expiry
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if sweep is not None:
        sweep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweep
    for pve in nodes:
        await pve.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="image_factory.lab.pve_server")
    parser.add_argument("--config", required=True, type=Path, action="append",
                        help="a node's pve.json; one per node of a cluster, all served by this process")
    args = parser.parse_args(argv)
    faulthandler.enable()  # a crash at start otherwise leaves an empty log and only "exited at start"
    specs = [NodeSpec.from_mapping(json.loads(path.read_text())) for path in args.config]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.umask(0o022)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(specs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
