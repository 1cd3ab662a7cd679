"""Units the operator left running by hand, found before installing.

A command started with `systemd-run` (a service, a scope, a socket or path that starts one
later) is a transient unit: no package's file describes it, it lives until the next boot,
and it runs as root with no terminal and no login. A reverse shell there needs neither, and
the lockdown, which ends sessions and terminals, never sees it. So preflight refuses a
machine with any transient unit of the system's manager, naming each with what it runs and
how to stop it, but for three kinds that are not the operator's way back: slices (logind's
user-UID.slice holds nothing by itself), the scopes of the sessions logind knows (the
session checks refuse them or spare the installing one; a scope merely *named* session-N is
not excused), and the units the installation itself runs in (`systemd-run apt-get install`).

Once installed, a unit started by hand can only come from the installing session while it
was spared (another tmux window, say): status's installation finding then fails, naming it,
until the next boot ends it.

Not found here: a process root moved into a packaged unit's cgroup (nothing tells it from
that unit's own children) and a user's service manager's units (it stops with the user's
last session). README's honest limits say so.

Only reads /run/systemd/transient, /run/systemd/sessions and /proc.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Collection, Dict, FrozenSet, Iterable, List

import psutil

from statemesh import proc
from statemesh.planted import named

TRANSIENT_UNITS = Path("/run/systemd/transient")
LOGIND_SESSIONS = Path("/run/systemd/sessions")
SESSION_PREFIX, SCOPE = "session-", ".scope"
SLICE = ".slice"


def transient_units(directory: Path = TRANSIENT_UNITS) -> FrozenSet[str]:
    """The system manager's transient units: systemd writes each one's file here."""
    try:
        return frozenset(entry for entry in os.listdir(directory) if not entry.endswith(SLICE))
    except FileNotFoundError:
        return frozenset()


def units_in(cgroup: str) -> List[str]:
    """The unit names along a cgroup path (/system.slice/x.service/sub -> system.slice,
    x.service)."""
    return [part for part in cgroup.split("/") if "." in part]


CgroupOf = Callable[[int], str]


def installation_units(pids: Iterable[int], transient: Collection[str],
                       cgroup_of: CgroupOf = proc.cgroup_path) -> FrozenSet[str]:
    """The transient units the installation runs in: those holding any of `pids` (the
    package manager and its ancestors)."""
    return frozenset(unit for pid in pids for unit in units_in(cgroup_of(pid))
                     if unit in transient)


def is_logind_session(unit: str, sessions: Collection[str]) -> bool:
    """Whether the unit is the scope of a session logind knows."""
    return (unit.startswith(SESSION_PREFIX) and unit.endswith(SCOPE)
            and unit[len(SESSION_PREFIX):-len(SCOPE)] in sessions)


def running_in(units: Collection[str],
               cgroup_of: CgroupOf = proc.cgroup_path) -> Dict[str, List[str]]:
    """unit -> "pid N (command)" of every process in each of these units."""
    found: Dict[str, List[str]] = {}
    for process in psutil.process_iter(["cmdline"]):
        for unit in units_in(cgroup_of(process.pid)):
            if unit in units:
                command = " ".join(process.info["cmdline"] or []) or "?"
                found.setdefault(unit, []).append(f"pid {process.pid} ({command[:60]})")
    return found


def logind_sessions(directory: Path = LOGIND_SESSIONS) -> FrozenSet[str]:
    """The ids of the sessions logind knows, from its state files (no D-Bus needed)."""
    try:
        return frozenset(entry for entry in os.listdir(directory) if "." not in entry)
    except FileNotFoundError:
        return frozenset()


def left_running(sessions: Collection[str], installer_pids: Iterable[int],
                 directory: Path = TRANSIENT_UNITS,
                 cgroup_of: CgroupOf = proc.cgroup_path) -> List[str]:
    """Each unit started by hand, but the installation's own and logind's sessions, with
    what runs in it."""
    transient = transient_units(directory)
    own = installation_units(installer_pids, transient, cgroup_of)
    left = sorted(unit for unit in transient
                  if unit not in own and not is_logind_session(unit, sessions))
    running = running_in(left, cgroup_of) if left else {}
    return [f"{unit}: {', '.join(running[unit])}" if unit in running
            else f"{unit} (nothing runs in it now; it may start again)" for unit in left]


def problems(sessions: Collection[str], installer_pids: Iterable[int],
             directory: Path = TRANSIENT_UNITS,
             cgroup_of: CgroupOf = proc.cgroup_path) -> List[str]:
    """Preflight's refusal: every unit started by hand that would keep running as root after
    the lockdown."""
    left = left_running(sessions, installer_pids, directory, cgroup_of)
    if not left:
        return []
    return [f"units started by hand (systemd-run), which would keep running as root after the "
            f"lockdown: {named(left)} (systemctl stop them; systemctl reset-failed)"]
