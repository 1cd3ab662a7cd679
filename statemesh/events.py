"""What the node's long-running services tell the journal: one JSON line per event.

The watchdog and the tamper listener log what they saw and did this way, so that the
journal can be read back by machine (the VM tests and the benchmarks parse these lines).
"""

from __future__ import annotations

import json
from typing import Any


def log(event: str, **fields: Any) -> None:
    """One JSON line on stdout (the journal, under systemd)."""
    print(json.dumps({"event": event, **fields}, default=str), flush=True)
