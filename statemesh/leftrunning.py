"""Programs the operator left running by hand: found before installing, and by status after.

A command started with `systemd-run` (a service, a scope, a timer, socket or path that
starts one later) is a transient unit: no package's file describes it, it lives until the
next boot, and it runs as root with no terminal and no login. A reverse shell there needs
neither, and the lockdown, which ends sessions and terminals, never sees it. Whether a unit
is transient is asked of systemd (its Transient property): the unit's file in
/run/systemd/transient can be deleted while the unit runs on. A process in no unit (the
root cgroup, or a cgroup made by hand, which systemd does not own) is left running as
surely.

Every process but the kernel's threads is judged, with the units that may start one later
(timers, paths, sockets, services between restarts). Preflight excuses the installation's
own processes (the package manager, what it descends from and what it started:
`systemd-run apt-get install` is a way to install, a shell beside apt in that unit is not)
and the installing logind session's; other sessions are refused here as well as by the
session checks. Status, once installed, excuses nothing: a unit the spared session started
(from another tmux window) outlives it, until the next boot.

Not found: a process root moved into a packaged unit's cgroup (nothing tells it from that
unit's own children) and the units of a user's service manager (it stops with the user's
last session; a lingering user is refused by preflight). README's honest limits say so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Callable, Collection, Dict, List, Set

from statemesh import proc, systemd
from statemesh.planted import named
from statemesh.watchdog import terminals

TRANSIENT_UNITS = Path("/run/systemd/transient")
KERNEL_THREAD = 0x00200000  # PF_KTHREAD in /proc/PID/stat's flags
# The service manager itself: PID 1 in init.scope, a transient unit of systemd's own. Any
# other process in it was put there by hand.
MANAGER_PID, MANAGER_SCOPE = 1, "init.scope"
SLICE = ".slice"
UNIT_TYPES = ("service", "scope", "socket", "mount", "swap")
# Units that start a program later, and services waiting to be restarted.
STARTING_LATER = ("*.timer", "*.path", "*.socket")
STARTING_STATES = ("active", "activating", "reloading")

CgroupOf = Callable[[int], str]


@dataclasses.dataclass(frozen=True)
class Process:
    """A userland process and the system manager's unit it runs in ("" for none)."""

    pid: int
    cgroup: str
    unit: str


Excused = Callable[[Process], bool]


def nothing_excused(_process: Process) -> bool:
    return False


def system_unit(cgroup: str) -> str:
    """The system manager's unit of a cgroup path: its first part that is not a slice
    (/system.slice/x.service/sub -> x.service); "" when that part is no unit at all."""
    for part in cgroup.strip("/").split("/"):
        if part.endswith(SLICE):
            continue
        return part if part.rpartition(".")[2] in UNIT_TYPES else ""
    return ""


def userland(cgroup_of: CgroupOf = proc.cgroup_path) -> List[Process]:
    """Every process but the service manager, the kernel's threads and those gone
    meanwhile."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == MANAGER_PID:
            continue
        pid = int(entry)
        stat = proc.read_stat(pid)
        cgroup = cgroup_of(pid)
        if stat is None or stat[3] & KERNEL_THREAD or not cgroup:
            continue
        found.append(Process(pid, cgroup, system_unit(cgroup)))
    return found


def transient_files(directory: Path = TRANSIENT_UNITS) -> Set[str]:
    """The transient units whose files are still there (slices hold nothing by themselves)."""
    try:
        return {name for name in os.listdir(directory) if not name.endswith(SLICE)}
    except OSError:
        return set()


async def _starting_later(manager: systemd.Systemd) -> Set[str]:
    units = await manager.list_units(STARTING_LATER, STARTING_STATES)
    services = await manager.list_units(("*.service",), ("activating",))
    return {unit.name for unit in [*units, *services]}


def _type_interface(unit: str) -> str:
    """The D-Bus interface of the unit's type (Service, Scope...), which has ControlGroup."""
    return f"{systemd.SYSTEMD}.{unit.rpartition('.')[2].capitalize()}"


async def by_hand(manager: systemd.Systemd, units: Collection[str],
                  with_processes: Collection[str]) -> Dict[str, str]:
    """unit -> why, for each of `units` systemd says is transient, and for each of
    `with_processes` it does not own (a cgroup made by hand and named like a unit)."""
    found = {}
    for unit in sorted(units):
        try:
            if await manager.get_unit_property(unit, systemd.UNIT, "Transient"):
                found[unit] = "started by hand"
                continue
            if unit not in with_processes:
                continue
            known = await manager.get_unit_property(unit, systemd.UNIT, "LoadState")
            cgroup = "" if known == "not-found" else await manager.get_unit_property(
                unit, _type_interface(unit), "ControlGroup")
        except systemd.UnknownUnitError:
            cgroup = ""
        if not cgroup:
            found[unit] = "no unit systemd knows"
    return found


def _named_processes(processes: List[Process]) -> str:
    return ", ".join(f"pid {p.pid} ({terminals.describe(p.pid)[1][:60]})" for p in processes)


def describe(processes: List[Process], units: Dict[str, str]) -> List[str]:
    """One entry per unit started by hand (with what runs in it) and one for the processes
    in no unit."""
    grouped: Dict[str, List[Process]] = {unit: [] for unit in units}
    for process in processes:
        if not process.unit or process.unit in units:
            grouped.setdefault(process.unit, []).append(process)
    entries = []
    for unit, members in sorted(grouped.items()):
        if not unit:
            cgroups = ", ".join(sorted({p.cgroup for p in members}))
            entries.append(f"in no unit ({cgroups}): {_named_processes(members)}")
        elif members:
            entries.append(f"{unit} ({units[unit]}): {_named_processes(members)}")
        else:
            entries.append(f"{unit} ({units[unit]}): nothing runs in it now; it may start "
                           "again")
    return entries


async def left_running(manager: systemd.Systemd, excused: Excused = nothing_excused,
                       cgroup_of: CgroupOf = proc.cgroup_path,
                       transient_dir: Path = TRANSIENT_UNITS) -> List[str]:
    """What runs by hand, or may start again, beside what is excused."""
    processes = userland(cgroup_of)
    own_units = {p.unit for p in processes if excused(p)}
    left = [p for p in processes if not excused(p)]
    running = {p.unit for p in left if p.unit}
    later = (transient_files(transient_dir) | await _starting_later(manager)) - own_units
    later.discard(MANAGER_SCOPE)  # starts nothing; what runs in it is judged by its process
    return describe(left, await by_hand(manager, running | later, running))


def refusal(entries: List[str]) -> List[str]:
    """Preflight's line for what left_running found."""
    if not entries:
        return []
    return [f"programs left running by hand, which would keep running as root after the "
            f"lockdown: {named(entries)} (systemctl stop UNIT, kill PID; "
            "systemctl reset-failed)"]


def now() -> List[str]:
    """left_running on this machine, nothing excused (status, once installed)."""
    async def ask() -> List[str]:
        async with systemd.manager() as manager:
            return await left_running(manager)
    return asyncio.run(ask())
