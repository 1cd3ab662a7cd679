"""Installation grace: the installing session survives the installation, and a bounded time more.

Installing over SSH must not cut the session that runs apt before dpkg has finished, yet no
interactive session may outlive the installation, whatever its operator prepared. The
installer records the package manager process running it, found by the executable the
kernel runs (/proc/PID/exe): `exec -a apt bash` renames a shell, not its executable. The
watchdog spares that process's session, its descendants and its ancestors while that very
process (same pid and start time, so a reused pid does not count) is alive and not stopped
(a Ctrl-Z'd or traced apt keeps nothing going but the operator's shell), and never past a
deadline: once the transaction has ended, installed or not, the harden unit stamps the
record with AFTER_TRANSACTION, so a Post-Invoke hook that sleeps, or anything else the
operator arranged, ends the grace then. A deadline is never moved later: installing again
from the spared session keeps it, and the watchdog believes no later one than the earliest
it has read (statemesh.watchdog.daemon). Giving the machine back forgets it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterator, Optional

import psutil

from statemesh import proc, safefile

GRACE_PATH = Path("/run/statemesh-node/install-grace.json")
# Seconds the installing session is spared after the transaction has ended. What is left of
# apt's run then: the postinst's last lines, dpkg's triggers (man-db), the other packages of
# the same run, apt's Post-Invoke hooks (needrestart's, on Ubuntu). About 10 s on hardware,
# up to 40 s under emulation here; a bound an operator cannot stretch is what matters, and
# twice the emulated figure with margin leaves a human time to read a prompt.
AFTER_TRANSACTION = 120.0
# The package managers, by executable. unattended-upgrade is a Python script: its
# interpreter runs, with the script's path as the first argument.
PACKAGE_MANAGERS = ("/usr/bin/apt", "/usr/bin/apt-get", "/usr/bin/aptitude", "/usr/bin/dpkg")
PYTHON_PACKAGE_MANAGERS = ("/usr/bin/unattended-upgrade",)
_SESSION_SCOPE = re.compile(r"/session-([^/]+)\.scope(?:/|$)")
# What current() judged inside pinned(), by record path.
_PINNED: contextvars.ContextVar[Optional[Dict[Path, Optional["Grace"]]]] = (
    contextvars.ContextVar("pinned_graces", default=None))


@dataclasses.dataclass(frozen=True)
class Grace:
    """The package manager process running the installation, and the session it runs in."""

    pid: int
    start_ticks: int  # its start time, clock ticks after boot (/proc/PID/stat field 22)
    session: Optional[str]  # logind session id, None outside any logind session
    sid: int  # the Unix session id, which identifies the session when logind has none
    tty: Optional[str]
    command: str = ""
    ends_at: Optional[float] = None  # CLOCK_BOOTTIME seconds; None while the transaction runs

    def spares(self, pid: int, sid: int, cgroup: str) -> bool:
        """Whether a process belongs to the installation: a descendant of the package manager
        (apt runs dpkg on a pty of its own, in a new session), one of its ancestors (what
        carries the installing terminal: sshd's session process, which holds the pty's
        master, in a Unix session of its own when no logind session ties it to the shell; a
        tmux or screen server), or in the installing session."""
        if proc.is_descendant(pid, self.pid) or (pid > 1 and proc.is_descendant(self.pid, pid)):
            return True
        if self.session is not None:
            return logind_session(cgroup) == self.session
        return sid == self.sid

    def lineage(self) -> FrozenSet[int]:
        """The package manager and what it descends from but PID 1: what carries the
        installing terminal (sshd's session processes, a tmux server). Empty once gone."""
        return lineage(self.pid)

    def units(self) -> FrozenSet[str]:
        """The system units the package manager and what it descends from run in: where an
        installation without a terminal runs (cloud-init's runcmd in cloud-final.service, a
        cloud agent's run-command in its agent's unit, guest-exec's in qemu-guest-agent's);
        also ssh.service, a session scope or user@0.service, which no guarantee spares this
        way. A guarantee that locks such a unit leaves it as it is while the grace runs."""
        return frozenset(unit for unit in map(proc.unit_of, self.lineage()) if unit)

    def describe(self) -> str:
        """The spared session in one line, for status and selftest."""
        where = f"logind session {self.session}" if self.session else f"session id {self.sid}"
        ends = ("until the transaction ends" if self.ends_at is None
                else f"for {max(0.0, self.ends_at - boottime()):.0f} s more at most")
        return f"{where} ({self.tty or 'no terminal'}) of pid {self.pid} {self.command!r}, {ends}"


def lineage(pid: int) -> FrozenSet[int]:
    """A process and what it descends from but PID 1; empty once it is gone."""
    try:
        process = psutil.Process(pid)
        return frozenset([process.pid, *(parent.pid for parent in process.parents())]) - {1}
    except psutil.NoSuchProcess:
        return frozenset()


def boottime() -> float:
    """Seconds since boot, suspend included: a deadline in it cannot be slept past."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def logind_session(cgroup: str) -> Optional[str]:
    """The logind session id in a cgroup path (…/session-3.scope), None if none."""
    match = _SESSION_SCOPE.search(cgroup)
    return match.group(1) if match else None


def _real(paths: tuple) -> FrozenSet[str]:
    return frozenset(os.path.realpath(path) for path in paths)


def is_package_manager(process: psutil.Process, executables: FrozenSet[str],
                       scripts: FrozenSet[str]) -> bool:
    """Whether the process runs a package manager's executable (or its script), by what the
    kernel says it runs, never by its argv[0]."""
    try:
        exe = os.path.realpath(process.exe())
        if exe in executables:
            return True
        argv = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return False
    is_python = os.path.basename(exe).startswith("python")
    return is_python and len(argv) > 1 and os.path.realpath(argv[1]) in scripts


def installer_of(pid: int, executables: Optional[FrozenSet[str]] = None,
                 scripts: Optional[FrozenSet[str]] = None) -> psutil.Process:
    """The topmost package manager among `pid` and its ancestors; `pid` itself if there is none."""
    executables = _real(PACKAGE_MANAGERS) if executables is None else executables
    scripts = _real(PYTHON_PACKAGE_MANAGERS) if scripts is None else scripts
    process = psutil.Process(pid)
    found = process
    for candidate in [process, *process.parents()]:
        if is_package_manager(candidate, executables, scripts):
            found = candidate
    return found


def record_installer(pid: int, path: Path = GRACE_PATH,
                     executables: Optional[FrozenSet[str]] = None,
                     scripts: Optional[FrozenSet[str]] = None) -> None:
    """Record the package manager running the installation that `pid` is part of, keeping
    the deadline of an earlier record of this boot: a grace is never lengthened."""
    process = installer_of(pid, executables, scripts)
    ticks = proc.start_ticks(process.pid)
    if ticks is None:
        raise psutil.NoSuchProcess(process.pid)
    earlier = _load(path) or {}
    record = {
        "pid": process.pid,
        "start_ticks": ticks,
        "session": logind_session(proc.cgroup_path(process.pid)),
        "sid": os.getsid(process.pid),
        "tty": process.terminal(),
        "command": " ".join(process.cmdline()),
        "ends_at": earlier.get("ends_at"),
    }
    _save(record, path)


# What end_after writes when the record is gone: no installer (pid 0 is nobody), a deadline.
_NOBODY = {"pid": 0, "start_ticks": 0, "session": None, "sid": 0, "tty": None, "command": ""}


def end_after(seconds: float, path: Path = GRACE_PATH) -> float:
    """Give the recorded grace a deadline `seconds` from now (an earlier one stays); returns
    the deadline. A record removed meanwhile is written anew without an installer: the
    watchdog learns the deadline all the same."""
    record = _load(path) or dict(_NOBODY)
    deadline = boottime() + seconds
    if isinstance(record.get("ends_at"), (int, float)):
        deadline = min(deadline, float(record["ends_at"]))
    record["ends_at"] = deadline
    _save(record, path)
    return deadline


def forget(path: Path = GRACE_PATH) -> None:
    """The machine was given back: the next installation starts a grace of its own."""
    path.unlink(missing_ok=True)


def _save(record: Dict[str, Any], path: Path) -> None:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _load(path: Path) -> Optional[Dict[str, Any]]:
    """The record; None when there is none to believe: a FIFO or a device where it is
    written (never waited on) spares nobody."""
    try:
        record = json.loads(safefile.read_text(path))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def recorded(path: Path = GRACE_PATH) -> Optional[Grace]:
    """The grace as recorded, whether or not it still runs; None without a valid record."""
    record = _load(path)
    if record is None:
        return None
    try:
        ends_at = record.get("ends_at")
        return Grace(
            pid=int(record["pid"]),
            start_ticks=int(record["start_ticks"]),
            session=None if record["session"] is None else str(record["session"]),
            sid=int(record["sid"]),
            tty=record["tty"],
            command=str(record.get("command", "")),
            ends_at=None if ends_at is None else float(ends_at),
        )
    except (KeyError, TypeError, ValueError):
        return None


def current(path: Path = GRACE_PATH) -> Optional[Grace]:
    """The recorded grace while it runs: its package manager alive and not stopped, its
    deadline (if set) not passed. None otherwise. Inside pinned(), judged once per record."""
    judged = _PINNED.get()
    if judged is not None and path in judged:
        return judged[path]
    grace = recorded(path)
    running = grace if grace is not None and is_running(grace) else None
    if judged is not None:
        judged[path] = running
    return running


@contextlib.contextmanager
def pinned() -> Iterator[None]:
    """Inside it, every check sees the grace as current() first judged it: status's lines
    must tell one story, however root flips the record (removed, put back) or the
    installer (SIGSTOP, SIGCONT) between them. Otherwise the installation line could see
    no grace and the agents' line a spared unit, and both say they hold."""
    token = _PINNED.set({})
    try:
        yield
    finally:
        _PINNED.reset(token)


def is_running(grace: Grace) -> bool:
    """Its package manager alive (the very process) and not stopped, its deadline (if
    set) not passed."""
    if proc.start_ticks(grace.pid) != grace.start_ticks or proc.is_stopped(grace.pid):
        return False
    return grace.ends_at is None or boottime() < grace.ends_at
