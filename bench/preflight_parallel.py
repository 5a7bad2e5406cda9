#!/usr/bin/env python3
"""Preflight on both lab hypervisors: parallel (one thread per host) against one host after another.

Starts a throw-away lab (free slot, temporary directory), runs the full preflight ROUNDS times each
way, prints the medians and the ratio sequential/parallel (the baseline is measured in the same run).
Usage: .venv/bin/python bench/preflight_parallel.py [rounds]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from image_factory.lab.pytest_plugin import start_lab, stop_lab
from image_factory.preflight import run_preflight


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    with tempfile.TemporaryDirectory(prefix="bench-preflight-") as tmp:
        handle, slot_lock = start_lab(Path(tmp) / "lab", real_boot="none", time_scale=0.0)
        try:
            settings, site = handle.settings, handle.site
            names = list(site.hypervisors)
            run_preflight(settings, site)  # warm-up (imports, first TLS handshakes)
            par, seq = [], []
            for _ in range(rounds):
                t = time.perf_counter()
                run_preflight(settings, site)
                par.append(time.perf_counter() - t)
                t = time.perf_counter()
                for name in names:
                    run_preflight(settings, site, [name])
                seq.append(time.perf_counter() - t)
        finally:
            stop_lab(handle, slot_lock)
    p, s = statistics.median(par), statistics.median(seq)
    print(f"preflight, {len(names)} hosts, all checks, median of {rounds}: parallel {p:.3f} s, "
          f"sequential {s:.3f} s, ratio sequential/parallel {s / p:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
