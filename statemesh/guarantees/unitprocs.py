"""The processes of one of the node's services, and whether they are doing anything.

A unit systemd shows as "active (running)" may have a main process that is stopped
(SIGSTOP, SIGTSTP, a tracer's stop): alive, so nothing restarts it, and doing nothing.
status must not call such a service running. The processes come from the unit's cgroup
(the kernel's view, readable where D-Bus is not), their state from /proc.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")
# What psutil calls the states T (stopped by a signal) and t (stopped by a tracer).
STOPPED_STATES = (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)


def unit_pids(unit: str, cgroup_root: Path = CGROUP_ROOT) -> List[int]:
    """The pids in a system service's cgroup (unified or legacy name=systemd hierarchy)."""
    for directory in (cgroup_root / "system.slice" / unit, cgroup_root / "systemd/system.slice" / unit):
        try:
            return [int(pid) for pid in (directory / "cgroup.procs").read_text().split()]
        except OSError:
            continue
    return []


def stopped(pids: Sequence[int]) -> List[int]:
    """Those of the pids whose process is stopped; one that is gone is not."""
    found = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() in STOPPED_STATES:
                found.append(pid)
        except psutil.Error:
            continue
    return found
