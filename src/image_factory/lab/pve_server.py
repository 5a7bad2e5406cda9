"""One lab hypervisor's API: a LabPve (fakepve + fidelity layer) in its own process.

    python -m image_factory.lab.pve_server --config <lab>/hosts/<name>/pve.json

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
from image_factory.lab.spec import NodeSpec
from image_factory.lab.wire import entered


async def serve(spec: NodeSpec) -> None:
    pve = LabPve(spec)
    # On a wired lab only the API's socket lives in the host's namespace: the VMs' qemu, started from here, keep
    # their SSH forwards on the client's loopback.
    with entered(spec.extra.get("netns")):
        await pve.start(str(spec.cert), str(spec.key))
    await pve.start_control()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"lab pve {spec.node} listening on {pve.url}", flush=True)
    await stop.wait()
    await pve.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="image_factory.lab.pve_server")
    parser.add_argument("--config", required=True, type=Path)
    args = parser.parse_args(argv)
    faulthandler.enable()  # a crash at start otherwise leaves an empty log and only "exited at start"
    spec = NodeSpec.from_mapping(json.loads(args.config.read_text()))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.umask(0o022)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
