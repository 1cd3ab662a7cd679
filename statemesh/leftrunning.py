"""Programs the operator left running by hand: found before installing, and by status after.

A command started with `systemd-run` (a service, a scope, a timer, socket or path that
starts one later) is a transient unit: no package's file describes it, it lives until the
next boot, and it runs as root with no terminal and no login. A reverse shell there needs
neither, and the lockdown, which ends sessions and terminals, never sees it. Whether a unit
is transient is asked of systemd (its Transient property): the unit's file in
/run/systemd/transient can be deleted while the unit runs on. A process in no unit (the
root cgroup, or a cgroup made by hand, named like a unit or not, which systemd does not
own) is left running as surely.

Every userland process is judged (a zombie leader whose threads run on too; not the
kernel's usermode helpers, nor PID 1 and what it forks from systemd's own programs for a
moment), with
the units that may start one later (active timers, paths, sockets, and services waiting to
restart). Preflight excuses the installation's own processes (the package manager, what it
descends from and what it started: `systemd-run apt-get install` is a way to install, a
shell beside apt in that unit is not) and the installing logind session's scope; another
session's is refused here as well as by the session checks. Status, once installed,
excuses nothing: a unit the spared session started (another tmux window) outlives it.

A mount over a process's directory in /proc hides that process from every reader of /proc
(this module, the watchdog, ps): the directory then shows the mounted one (PID 1's, a
kernel thread's). Each such mount is named as a program left running, hidden.

A packaged service that runs although nothing of the machine's brought it up was started by
a request (`systemctl start systemd-nspawn@box`, `wg-quick@wg0`, user@0.service without a
session): statemesh.pulledin tells. Not found: a process root moved into a packaged unit's
cgroup (nothing tells it from that unit's own children). README's honest limits say so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
from pathlib import Path
from typing import Callable, Collection, Dict, List, Optional, Set, Tuple

from statemesh import proc, pulledin, systemd, volume
from statemesh.planted import named
from statemesh.watchdog import terminals

KERNEL_THREAD = 0x00200000  # PF_KTHREAD in /proc/PID/stat's flags
KTHREADD = 2  # the kernel's usermode helpers (modprobe, core_pattern's) are its children
# The service manager itself: PID 1 in init.scope, a transient unit of systemd's own, where
# it also forks its generators and helpers for a moment (during every daemon-reload). Any
# other process in it was put there by hand.
MANAGER_PID, MANAGER_SCOPE = 1, "init.scope"
MANAGER_PROGRAMS = ("/usr/lib/systemd/", "/lib/systemd/")
# How long such a fork may have lived: the generators' executor lives for a daemon-reload
# (seconds, under emulation); one older is named as any process in systemd's scope is.
MANAGER_FORK_SECONDS = 60.0
# Units that start a program later, and services waiting to be restarted.
STARTING_LATER = ("*.timer", "*.path", "*.socket")
STARTING_STATES = ("active", "activating", "reloading")
MOUNTINFO = Path("/proc/self/mountinfo")
# Listings of every process at most, each after systemd was asked about the units of the
# one before (a unit may stop meanwhile; a process may move).
SETTLE_ROUNDS = 3
# Before listing again when a unit had no cgroup to judge by (restarting): RestartSec='s
# order, so that the next question meets it running or stopped.
UNDECIDED_PAUSE = 0.5
PROCESS_DIRECTORY = re.compile(r"^/proc/[0-9]+(/.*)?$")
# Units named per finding: each is something to stop before installing, so that one
# refusal names them all on a machine that is not a container host.
ENTRIES_SHOWN = 10

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


def _parent_and_flags(pid: int) -> Optional[Tuple[int, int]]:
    """(ppid, flags) of a live process; (0, 0) for a zombie leader whose threads run on (it
    called pthread_exit: still a running program); None for one gone or all dead."""
    stat = proc.read_stat(pid)
    if stat is not None:
        return stat[0], stat[3]
    try:
        return (0, 0) if len(os.listdir(f"/proc/{pid}/task")) > 1 else None
    except OSError:
        return None


def _managers_own(pid: int, ppid: int, unit: str,
                  executable: Callable[[int], str] = proc.executable,
                  age: Callable[[int], Optional[float]] = proc.age) -> bool:
    """PID 1, and what it forks in init.scope from systemd's own programs for a moment (its
    generators' executor at every daemon-reload). Root can orphan a process of its own into
    init.scope running one of those programs (LD_PRELOAD, a copy since deleted): one that
    outlives MANAGER_FORK_SECONDS, or whose file is gone, is not the manager's."""
    if pid == MANAGER_PID:
        return True
    if unit != MANAGER_SCOPE or ppid != MANAGER_PID:
        return False
    program, seconds = executable(pid), age(pid)
    return (program.startswith(MANAGER_PROGRAMS) and not program.endswith(" (deleted)")
            and seconds is not None and seconds < MANAGER_FORK_SECONDS)


def userland(cgroup_of: CgroupOf = proc.cgroup_path) -> List[Process]:
    """Every process but the kernel's (threads and usermode helpers), the service manager's,
    and those gone meanwhile."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        identity, cgroup = _parent_and_flags(pid), cgroup_of(pid)
        if identity is None or not cgroup:
            continue
        ppid, flags = identity
        unit = proc.system_unit(cgroup)
        if flags & KERNEL_THREAD or ppid == KTHREADD or _managers_own(pid, ppid, unit):
            continue
        found.append(Process(pid, cgroup, unit))
    return found


async def _starting_later(manager: systemd.Systemd) -> Set[str]:
    units = await manager.list_units(STARTING_LATER, STARTING_STATES)
    services = await manager.list_units(("*.service",), ("activating",))
    return {unit.name for unit in [*units, *services]}


def _type_interface(unit: str) -> str:
    """The D-Bus interface of the unit's type (Service, Scope...), which has ControlGroup."""
    return f"{systemd.SYSTEMD}.{unit.rpartition('.')[2].capitalize()}"


def _inside(cgroup: str, unit_cgroup: str) -> bool:
    return bool(unit_cgroup) and (cgroup == unit_cgroup or cgroup.startswith(unit_cgroup + "/"))


async def _not_systemds(manager: systemd.Systemd, unit: str,
                        cgroups: Set[str]) -> Optional[Set[str]]:
    """Those of `cgroups` that are neither the unit's cgroup nor inside it: made by hand
    elsewhere and named like it, or an alias's name (all, when systemd has no such unit).
    None while the unit has no cgroup: a service between its process's exit and its
    restart (a failing endpoint's Restart=) had one a moment ago and has one again a
    moment later, so it is asked again; a cgroup made by hand beside an idle unit stays
    so, and is named at the last listing."""
    if await manager.get_unit_property(unit, systemd.UNIT, "LoadState") == "not-found":
        return set(cgroups)
    own = await manager.get_unit_property(unit, _type_interface(unit), "ControlGroup")
    if not own:
        return None
    return {cgroup for cgroup in cgroups if not _inside(cgroup, own)}


@dataclasses.dataclass
class Judged:
    """What by_hand found: units started by hand (unit -> what to say of it), cgroups
    systemd does not own, and units whose cgroup systemd could not say now (unit -> the
    cgroups of their processes), to be asked about again."""

    started: Dict[str, str] = dataclasses.field(default_factory=dict)
    foreign: Set[str] = dataclasses.field(default_factory=set)
    undecided: Dict[str, Set[str]] = dataclasses.field(default_factory=dict)


async def by_hand(manager: systemd.Systemd, chain: pulledin.BootChain, later: Collection[str],
                  running: Dict[str, Set[str]]) -> Judged:
    """The units started by hand (of `later`, and of `running`: unit -> the cgroups its
    processes are in), each with what to say of it: those systemd says are transient, and
    packaged ones the machine did not bring up (`chain`); and the cgroups of `running`
    systemd does not own. The units are asked about at once: their questions go out on
    the connection together instead of one round trip after another."""
    units = sorted(set(later) | set(running))
    judged = await systemd.together(_judge(manager, chain, unit, running.get(unit))
                                    for unit in units)
    found = Judged()
    for unit, (said, outside) in zip(units, judged):
        if outside is None:
            found.undecided[unit] = running[unit]
            continue
        found.foreign |= outside
        if said:
            found.started[unit] = said
    return found


async def _judge(manager: systemd.Systemd, chain: pulledin.BootChain, unit: str,
                 cgroups: Optional[Set[str]]) -> Tuple[str, Optional[Set[str]]]:
    """What to say of one unit ("" when the machine brought it up), and those of its
    processes' `cgroups` (None: none run) that systemd does not own (None: it cannot say
    now, _not_systemds)."""
    try:
        if await manager.get_unit_property(unit, systemd.UNIT, "Transient"):
            return "started by hand", set()
        outside: Optional[Set[str]] = set()
        if cgroups is not None:
            outside = await _not_systemds(manager, unit, cgroups)
            if outside is None:
                return "", None
        if outside != cgroups and not await chain.brought_up(unit):
            return pulledin.ON_REQUEST, outside
        return "", outside
    except (systemd.AccessDeniedError, systemd.NoBusError):
        raise
    except systemd.SystemdError:  # no such unit, or a name systemd finds invalid
        return "", set(cgroups or ())


def _named_processes(processes: List[Process]) -> str:
    return ", ".join(f"pid {p.pid} ({terminals.describe(p.pid)[1][:60]})" for p in processes)


def describe(processes: List[Process], units: Dict[str, str], foreign: Set[str]) -> List[str]:
    """One entry per unit started by hand (with what runs in it, or that nothing does now)
    and one for the processes in no unit systemd owns."""
    grouped: Dict[str, List[Process]] = {unit: [] for unit in units}
    for process in processes:
        if not process.unit or process.cgroup in foreign:
            grouped.setdefault("", []).append(process)
        elif process.unit in units:
            grouped[process.unit].append(process)
    entries = []
    for unit, members in sorted(grouped.items()):
        if not unit:
            cgroups = ", ".join(sorted({p.cgroup for p in members}))
            entries.append(f"in no unit systemd owns ({cgroups}): {_named_processes(members)}")
        elif members:
            entries.append(f"{unit} ({units[unit]}): {_named_processes(members)}")
        else:
            entries.append(f"{unit} ({units[unit]}): nothing runs in it now; it may start "
                           "again")
    return entries


def hidden_by_mounts(mountinfo: str) -> List[str]:
    """One entry per mount over a process's directory in /proc (or inside it)."""
    points = sorted({mount.point for mount in volume.parse_mountinfo(mountinfo)
                     if PROCESS_DIRECTORY.match(mount.point)})
    return [f"hidden by a mount over {point}, from every reader of /proc (umount {point})"
            for point in points]


async def left_running(manager: systemd.Systemd, excused: Excused = nothing_excused,
                       cgroup_of: CgroupOf = proc.cgroup_path,
                       mountinfo: Path = MOUNTINFO) -> List[str]:
    """What runs by hand, or may start again, beside what is excused; and what is hidden.

    Processes are listed again after systemd has been asked about their units, until a
    listing holds no cgroup not asked about yet (at most SETTLE_ROUNDS listings; the last
    one's new cgroups are asked about too): what is named is what runs in the last listing,
    judged. A unit that stopped while it was asked about (root's user manager, which logind
    stops a moment after `disable-linger`) has no cgroup or no unit any more, and its
    processes are gone from the next listing: nothing of it is named. A process that
    changes its pid or its cgroup meanwhile is judged where the last listing found it."""
    hidden = hidden_by_mounts(mountinfo.read_text(encoding="utf-8", errors="replace"))
    processes = userland(cgroup_of)
    own_units = {p.unit for p in processes if excused(p)}
    chain = await pulledin.BootChain.of(manager)
    found = await by_hand(manager, chain, await _starting_later(manager) - own_units, {})
    asked: Dict[str, Set[str]] = {}
    for listing in range(1, SETTLE_ROUNDS + 1):
        left = [p for p in processes if not excused(p)]
        new = _not_asked(left, asked)
        if new:
            more = await by_hand(manager, chain, (), new)
            found.started.update(more.started)
            found.foreign |= more.foreign
            for unit, cgroups in new.items():
                if unit not in more.undecided:
                    asked.setdefault(unit, set()).update(cgroups)
            if listing == SETTLE_ROUNDS:
                found.foreign.update(*more.undecided.values())
            elif more.undecided:
                await asyncio.sleep(UNDECIDED_PAUSE)
        if not new or listing == SETTLE_ROUNDS:
            break
        processes = userland(cgroup_of)
    return hidden + describe(left, found.started, found.foreign)


def _not_asked(processes: List[Process], asked: Dict[str, Set[str]]) -> Dict[str, Set[str]]:
    """unit -> the cgroups of `processes` in it that systemd has not been asked about."""
    new: Dict[str, Set[str]] = {}
    for process in processes:
        if process.unit and process.cgroup not in asked.get(process.unit, set()):
            new.setdefault(process.unit, set()).add(process.cgroup)
    return new


def refusal(entries: List[str]) -> List[str]:
    """Preflight's line for what left_running found."""
    if not entries:
        return []
    return [f"programs left running by hand, which would keep running as root after the "
            f"lockdown: {named(entries, ENTRIES_SHOWN)} (systemctl stop UNIT, kill PID; "
            "systemctl reset-failed)"]


def now() -> List[str]:
    """left_running on this machine, nothing excused (status, once installed)."""
    async def ask() -> List[str]:
        async with systemd.manager() as manager:
            return await left_running(manager)
    return asyncio.run(ask())
