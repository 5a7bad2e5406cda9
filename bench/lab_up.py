#!/usr/bin/env python3
"""lab.up figures: cold (new lab dir: CA, keys, certs, four processes), restart (down then up, keys
kept) and no-op (already up), each ROUNDS times in a throw-away lab; prints medians and the ratio
cold/no-op (the baseline is measured in the same run).
Usage: .venv/bin/python bench/lab_up.py [rounds]
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from image_factory.lab import controller
from image_factory.lab.config import LabPaths
from image_factory.lab.pytest_plugin import claim_slot
from image_factory.settings import Settings


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    base = Settings.from_mapping({})
    cold, restart, noop = [], [], []
    slot, slot_lock = claim_slot()
    try:
        for _ in range(rounds):
            with tempfile.TemporaryDirectory(prefix="bench-lab-") as tmp:
                s = Settings.from_mapping({"lab_dir": str(Path(tmp) / "lab")})
                cfg = controller.default_config(s, slot=slot)
                cfg.real_boot = "none"
                try:
                    t0 = time.monotonic()
                    controller.up(s, cfg)
                    cold.append(time.monotonic() - t0)
                    t0 = time.monotonic()
                    controller.up(s)
                    noop.append(time.monotonic() - t0)
                    controller.down(s)
                    t0 = time.monotonic()
                    controller.up(s)
                    restart.append(time.monotonic() - t0)
                finally:
                    controller.down(s)
                    shutil.rmtree(LabPaths(s.lab_dir).state_dir, ignore_errors=True)
    finally:
        slot_lock.close()
    out = {"rounds": rounds, "cold_s": round(statistics.median(cold), 3),
           "restart_s": round(statistics.median(restart), 3), "noop_s": round(statistics.median(noop), 3),
           "ratio_cold_over_noop": round(statistics.median(cold) / statistics.median(noop), 1),
           "repo": str(base.root)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
