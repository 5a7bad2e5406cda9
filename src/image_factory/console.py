"""One rich console for the whole tool; progress and tables go to stderr, --json to stdout."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)
if not console.is_terminal and "COLUMNS" not in os.environ:
    # Logs of CI and `./dev demo > file` keep MACs and paths on one line instead of wrapping at 80.
    console.width = 160


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()
