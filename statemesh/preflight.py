"""Preflight: refuse to install, listing every reason and changing nothing, on a machine
that is not a plain server the lockdown can take over safely.

Refused when: the OS is not a supported Debian (12+) or Ubuntu (22.04+) release; PID 1 is
not systemd (the lockdown is systemd's); a display manager runs or an X11/Wayland session
exists (a desktop someone sits at); an interactive session other than the installing one is
open: what `w` shows, from logind's sessions and utmp. The installing session is the one of
the package manager recorded by the installer (statemesh.grace), or, when preflight is run
by hand, the caller's own; the watchdog ends it once the package manager has exited.
Refused too when one of the package's own units is not what the package shipped (a drop-in
or an overriding unit planted before installing: statemesh.ownunits), when a swap other
than zram is active (workload memory would reach a disk: statemesh.guarantees.memory), when
code or jobs are planted for root's programs to load or run later (statemesh.planted,
statemesh.jobs, statemesh.ufwfiles: what ufw.service runs and loads at every boot), and
when a program was left running by hand (statemesh.leftrunning).

Only reads: /etc/os-release, /proc/1/comm, /proc/swaps, utmp, what statemesh.planted reads,
/proc, and systemd/logind over D-Bus.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import psutil

from statemesh import (accounts, apthooks, bootargs, dpkgdb, grace, jobs, kernelhelpers,
                       kernelmodules, leftrunning, networkhooks, ownunits, planted, proc,
                       safefile, systemd, ufwfiles)
from statemesh.guarantees import memory, rescue
from statemesh.guarantees.base import Finding
from statemesh.watchdog import terminals

UTMP = Path("/run/utmp")
SWAPS = Path("/proc/swaps")
OS_RELEASE = Path("/etc/os-release")
PID1_COMM = Path("/proc/1/comm")
DISPLAY_MANAGER = "display-manager.service"
USER_SLICE = "/user.slice/"  # where logind puts sessions' scopes
GRAPHICAL_TYPES = ("x11", "wayland", "mir")
# Minimum supported version per distribution (VERSION_ID compared numerically).
SUPPORTED = {"debian": (12,), "ubuntu": (22, 4)}

# struct utmp on Linux (glibc, 64-bit and 32-bit alike): 384 bytes.
_UTMP_FORMAT = "hi32s4s32s256shhiii4i20s"
_UTMP_SIZE = struct.calcsize(_UTMP_FORMAT)
USER_PROCESS = 7


@dataclasses.dataclass(frozen=True)
class Login:
    """A utmp USER_PROCESS entry: a login as `w` shows it."""

    user: str
    line: str
    host: str
    pid: int


@dataclasses.dataclass(frozen=True)
class Own:
    """The session the installation runs in: it may stay open."""

    session: Optional[str]
    tty: Optional[str]
    sid: int


@dataclasses.dataclass
class Report:
    """Every reason to refuse, and what was seen."""

    problems: List[str]
    facts: Dict[str, Any]

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> Dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "facts": self.facts}


def parse_os_release(text: str) -> Dict[str, str]:
    values = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Z_][A-Z0-9_]*)=(.*)$", line.strip())
        if match:
            values[match.group(1)] = match.group(2).strip().strip("\"'")
    return values


def _version(text: str) -> Optional[Tuple[int, ...]]:
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", text):
        return None
    return tuple(int(part) for part in text.split("."))


def os_problem(path: Path = OS_RELEASE) -> Tuple[Optional[str], Dict[str, str]]:
    """Why this OS is not supported (None when it is), and what os-release says."""
    try:
        release = parse_os_release(safefile.read_text(path))
    except OSError as error:  # a FIFO or a device too: never waited on
        return f"cannot read {path}: {error.strerror}", {}
    name, version = release.get("ID", ""), release.get("VERSION_ID", "")
    shown = release.get("PRETTY_NAME", f"{name} {version}".strip() or "unknown")
    if name not in SUPPORTED:
        return f"unsupported OS {shown!r}: only Debian 12+ and Ubuntu 22.04+ are supported", release
    parsed = _version(version)
    if parsed is None or parsed < SUPPORTED[name]:
        minimum = ".".join(f"{part:02d}" if i else str(part)
                           for i, part in enumerate(SUPPORTED[name]))
        return f"unsupported release {shown!r}: {name} {minimum} or later is needed", release
    return None, release


def pid1_problem(comm: Path = PID1_COMM) -> Optional[str]:
    try:
        name = comm.read_text(encoding="utf-8").strip()
    except OSError as error:
        return f"cannot tell what PID 1 is ({comm}: {error.strerror})"
    return None if name == "systemd" else f"PID 1 is {name!r}, not systemd"


def read_utmp(path: Path = UTMP) -> List[Login]:
    """Live USER_PROCESS entries (a dead process's entry is a stale record, not a login).
    Raises OSError when it cannot be read: NotRegularFile for a FIFO or a device, which
    would hide every login (and is never waited on)."""
    try:
        data = safefile.read_bytes(path)
    except FileNotFoundError:
        return []
    logins = []
    for offset in range(0, len(data) - _UTMP_SIZE + 1, _UTMP_SIZE):
        fields = struct.unpack_from(_UTMP_FORMAT, data, offset)
        kind, pid, line, _id, user, host = fields[:6]
        if kind != USER_PROCESS or not psutil.pid_exists(pid):
            continue
        text = [value.split(b"\0", 1)[0].decode(errors="replace") for value in (user, line, host)]
        logins.append(Login(user=text[0], line=text[1], host=text[2], pid=pid))
    return logins


def own_session(current: Optional[grace.Grace], pid: Optional[int] = None) -> Own:
    """The installing session: the package manager's (`current`, as recorded), else the
    caller's."""
    if current is not None:
        return Own(current.session, current.tty, current.sid)
    pid = pid or os.getpid()
    try:
        tty = psutil.Process(pid).terminal()
    except psutil.NoSuchProcess:
        tty = None
    return Own(grace.logind_session(proc.cgroup_path(pid)), tty, os.getsid(pid))


def _is_own_login(login: Login, own: Own) -> bool:
    if own.tty and own.tty == f"/dev/{login.line}":
        return True
    if own.session and grace.logind_session(proc.cgroup_path(login.pid)) == own.session:
        return True
    try:
        return os.getsid(login.pid) == own.sid
    except OSError:
        return False


def session_problems(sessions: List[systemd.Session], own: Own) -> List[str]:
    problems = []
    for session in sessions:
        where = f" on {session.tty}" if session.tty else ""
        if session.type in GRAPHICAL_TYPES:
            problems.append(f"graphical ({session.type}) session {session.id} of "
                            f"{session.user}{where}")
        elif session.id == own.session:
            continue
        elif session.class_ in ("user", "greeter") or session.tty or session.remote:
            remote = " (remote)" if session.remote else ""
            problems.append(f"interactive session {session.id} of {session.user}{where}{remote}")
    return problems


def utmp_problems(logins: List[Login], own: Own, seen_ttys: List[str]) -> List[str]:
    problems = []
    for login in logins:
        if _is_own_login(login, own) or login.line in seen_ttys:
            continue
        host = f" from {login.host}" if login.host else ""
        problems.append(f"login of {login.user} on {login.line}{host} (pid {login.pid})")
    return problems


def pty_holders() -> List[Tuple[int, int, str]]:
    """(pid, session id, cgroup) of every process holding a pty of any devpts instance."""
    return [(process.pid, process.sid, proc.cgroup_path(process.pid))
            for _terminal, process in terminals.holders([], every_pty=True)]


def terminal_problems(holders: List[Tuple[int, int, str]], own: Own,
                      installer: Optional[grace.Grace]) -> List[str]:
    """A pty held outside the installing session: a shell kept aside (its loginuid taken
    off, moved into another cgroup) that the watchdog might not count as a login's."""
    problems = []
    for pid, sid, cgroup in holders:
        # the installation's own: its descendants, session, and what carries its terminal
        if installer is not None and installer.spares(pid, sid, cgroup):
            continue
        if sid == own.sid or (own.session and grace.logind_session(cgroup) == own.session):
            continue
        if pid == os.getpid():
            continue
        _uid, command = terminals.describe(pid)
        problems.append(f"pid {pid} ({command[:80]}) holds a pty outside the installing "
                        f"session, in {cgroup or 'no cgroup'} (end it first)")
    return problems


@dataclasses.dataclass
class BusFacts:
    """What systemd and logind say, for preflight."""

    display_manager: str
    sessions: List[systemd.Session]
    units: List[ownunits.LoadedUnit]
    environment: List[str]
    left_running: List[str]


async def _bus_facts(installation_own: leftrunning.Excused,
                     cgroup_of: leftrunning.CgroupOf) -> BusFacts:
    async with systemd.manager() as manager:
        try:
            display_manager = await manager.get_active_state(DISPLAY_MANAGER)
        except systemd.UnknownUnitError:
            display_manager = "inactive"
        sessions = await systemd.Logind(manager.bus).list_sessions()
        units = await ownunits.read_settled_units(manager)
        environment = await manager.get_environment()
        left = await leftrunning.left_running(manager, installation_own, cgroup_of)
    return BusFacts(display_manager, sessions, units, environment, left)


def planted_for_later(environment: List[str]) -> List[str]:
    """What root's programs would load, or run, later with no terminal: code for the loader
    and Python (statemesh.planted), jobs for cron, at and systemd (statemesh.jobs),
    commands in apt's and dpkg's configuration (statemesh.apthooks) and in the network's
    (statemesh.networkhooks), ufw's init scripts and the rules it loads at every boot
    (statemesh.ufwfiles), arguments on the kernel's command line (statemesh.bootargs),
    accounts that reach the TPM beside the endpoint (statemesh.accounts), programs the
    kernel runs as root and what sets them at boot (statemesh.kernelhelpers), kernel
    modules of root's own, loaded or on disk (statemesh.kernelmodules)."""
    files = dpkgdb.installed_files()
    return (planted.problems(environment, files) + jobs.problems(files)
            + apthooks.problems(files) + networkhooks.problems() + ufwfiles.problems(files)
            + bootargs.problems() + rescue.settings_read_after_the_dropin()
            + accounts.problems() + kernelhelpers.problems(files)
            + kernelmodules.problems(files))


def planted_finding() -> Finding:
    """status's line for what root's programs would load or run later: preflight's checks,
    live. Preflight runs before the transaction, and the installing session stays spared
    until the grace ends: what it plants meanwhile (a cron job, a lingering root, a hook),
    or whatever a program left running plants later, is named here."""
    try:
        environment = asyncio.run(_manager_environment())
    except systemd.SystemdError as error:
        return Finding("planted", False, f"cannot ask systemd: {error}")
    found = planted_for_later(environment)
    if found:
        if _dpkg_runs():
            found.append("dpkg is running (an upgrade?): the files it unpacks differ from its "
                         "database until it ends")
        return Finding("planted", False, "; ".join(found))
    return Finding("planted", True, "nothing planted for root's programs to load or run later")


def _dpkg_runs() -> bool:
    return any(process.info["name"] == "dpkg" for process in psutil.process_iter(["name"]))


async def _manager_environment() -> List[str]:
    async with systemd.manager() as manager:
        return await manager.get_environment()


def installation_own(installer: Optional[grace.Grace], own: Own) -> leftrunning.Excused:
    """Whether a process is the installation's own: the package manager (run by hand or at
    boot: this process), what it descends from and what it started, and the installing
    logind session's."""
    root = installer.pid if installer is not None else os.getpid()
    lineage = grace.lineage(root)

    session_scope = None if own.session is None else f"session-{own.session}.scope"

    def excused(process: leftrunning.Process) -> bool:
        if process.pid in lineage or proc.is_descendant(process.pid, root):
            return True
        # The session's own scope, where logind puts it: not a cgroup named so elsewhere.
        return (process.unit == session_scope and process.cgroup.startswith(USER_SLICE)
                and process.cgroup.endswith(f"/{session_scope}"))

    return excused


def check(os_release: Path = OS_RELEASE, pid1_comm: Path = PID1_COMM, utmp: Path = UTMP,
          grace_path: Path = grace.GRACE_PATH, swaps: Path = SWAPS,
          holders: Callable[[], List[Tuple[int, int, str]]] = pty_holders,
          planted_problems: Callable[[List[str]], List[str]] = planted_for_later,
          cgroup_of: leftrunning.CgroupOf = proc.cgroup_path) -> Report:
    """Every reason to refuse the installation (read-only)."""
    problems: List[str] = []
    release_problem, release = os_problem(os_release)
    facts: Dict[str, Any] = {"os": release.get("PRETTY_NAME", ""),
                             "os_id": release.get("ID", ""),
                             "os_version": release.get("VERSION_ID", "")}
    problems += [p for p in (release_problem, pid1_problem(pid1_comm)) if p]
    installer = grace.current(grace_path)
    own = own_session(installer)
    facts["installing_session"] = dataclasses.asdict(own)
    try:
        bus = asyncio.run(_bus_facts(installation_own(installer, own), cgroup_of))
    except systemd.SystemdError as error:
        problems.append(f"cannot ask systemd and logind: {error}")
        bus = BusFacts("unknown", [], [], [], [])
    facts["display_manager"] = bus.display_manager
    facts["sessions"] = [dataclasses.asdict(s) for s in bus.sessions]
    if bus.display_manager in ("active", "activating", "reloading"):
        problems.append(f"a display manager runs ({DISPLAY_MANAGER} is {bus.display_manager})")
    problems += session_problems(bus.sessions, own)
    try:
        logins = read_utmp(utmp)
    except OSError as error:
        problems.append(f"cannot read {utmp} to see who is logged in ({error.strerror}; "
                        "remove it: the next boot makes it again)")
        logins = []
    facts["logins"] = [dataclasses.asdict(login) for login in logins]
    seen = [s.tty for s in bus.sessions if s.tty]
    problems += utmp_problems(logins, own, seen)
    problems += terminal_problems(holders(), own, installer)
    problems += leftrunning.refusal(bus.left_running)
    problems += [f"swap on {area} is not compressed RAM: workload memory would reach a disk "
                 "(swapoff it and remove it from /etc/fstab, or use zram)"
                 for area in memory.plain_swaps(swaps)]
    # Prepared before the installation: what would run instead of the package's own code.
    problems += [f"{problem} (remove what was planted, `systemctl daemon-reload`, restart it)"
                 for problem in ownunits.problems(bus.units)]
    problems += planted_problems(bus.environment)
    return Report(problems, facts)
