"""The processes of one of the node's services, and whether they are doing anything.

A unit systemd shows as "active (running)" may have a main process that is stopped
(SIGSTOP, SIGTSTP, a tracer's stop): alive, so nothing restarts it, and doing nothing.
status must not call such a service running. The processes come from the unit's cgroup
(the kernel's view, readable where D-Bus is not), their state from /proc.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from statemesh import proc

CGROUP_ROOT = Path("/sys/fs/cgroup")


def unit_cgroup(unit: str, cgroup_root: Path = CGROUP_ROOT) -> Optional[Path]:
    """A system service's cgroup directory (unified or legacy name=systemd hierarchy)."""
    for directory in (cgroup_root / "system.slice" / unit, cgroup_root / "systemd/system.slice" / unit):
        if (directory / "cgroup.procs").is_file():
            return directory
    return None


def unit_pids(unit: str, cgroup_root: Path = CGROUP_ROOT) -> List[int]:
    """The pids in a system service's cgroup."""
    directory = unit_cgroup(unit, cgroup_root)
    try:
        return [] if directory is None else [
            int(pid) for pid in (directory / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def stopped(pids: Sequence[int]) -> List[int]:
    """Those of the pids whose process is stopped; one that is gone is not."""
    return [pid for pid in pids if proc.is_stopped(pid)]
