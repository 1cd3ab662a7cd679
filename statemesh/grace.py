"""Installation grace: the installing session survives exactly as long as the package manager.

Installing over SSH must not cut the session that runs apt before dpkg has finished, yet
no interactive session may outlive the installation. The installer records which package
manager process runs it; the watchdog spares that process's session while that very
process (same pid AND same start time, so a reused pid does not count) is alive.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional

import psutil

from statemesh import proc

GRACE_PATH = Path("/run/statemesh-node/install-grace.json")

# psutil names, and comm truncated to 15 characters (python scripts such as unattended-upgrade).
PACKAGE_MANAGERS = frozenset(
    {"apt", "apt-get", "aptitude", "unattended-upgrade", "unattended-upgr", "dpkg"}
)
_SESSION_SCOPE = re.compile(r"/session-([^/]+)\.scope(?:/|$)")


@dataclasses.dataclass(frozen=True)
class Grace:
    """The package manager process running the installation, and the session it runs in."""

    pid: int
    start_ticks: int  # its start time, clock ticks after boot (/proc/PID/stat field 22)
    session: Optional[str]  # logind session id, None outside any logind session
    sid: int  # the Unix session id, which identifies the session when logind has none
    tty: Optional[str]

    def spares(self, pid: int, sid: int, cgroup: str) -> bool:
        """Whether a process belongs to the installation: a descendant of the package manager
        (apt runs dpkg on a pty of its own, in a new session), or in the installing session."""
        if proc.is_descendant(pid, self.pid):
            return True
        if self.session is not None:
            return logind_session(cgroup) == self.session
        return sid == self.sid


def logind_session(cgroup: str) -> Optional[str]:
    """The logind session id in a cgroup path (…/session-3.scope), None if none."""
    match = _SESSION_SCOPE.search(cgroup)
    return match.group(1) if match else None


def _is_package_manager(process: psutil.Process) -> bool:
    try:
        if process.name() in PACKAGE_MANAGERS:
            return True
        argv = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(os.path.basename(arg) in PACKAGE_MANAGERS for arg in argv[:2])


def installer_of(pid: int) -> psutil.Process:
    """The topmost package manager among `pid` and its ancestors; `pid` itself if there is none."""
    process = psutil.Process(pid)
    found = process
    for candidate in [process, *process.parents()]:
        if _is_package_manager(candidate):
            found = candidate
    return found


def record_installer(pid: int, path: Path = GRACE_PATH) -> None:
    """Record the package manager running the installation that `pid` is part of."""
    process = installer_of(pid)
    ticks = proc.start_ticks(process.pid)
    if ticks is None:
        raise psutil.NoSuchProcess(process.pid)
    record = {
        "pid": process.pid,
        "start_ticks": ticks,
        "session": logind_session(proc.cgroup_path(process.pid)),
        "sid": os.getsid(process.pid),
        "tty": process.terminal(),
        "command": " ".join(process.cmdline()),
    }
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _load(path: Path) -> Optional[Dict[str, Any]]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def current(path: Path = GRACE_PATH) -> Optional[Grace]:
    """The recorded grace while its package manager process is still alive, else None."""
    record = _load(path)
    if record is None:
        return None
    try:
        grace = Grace(
            pid=int(record["pid"]),
            start_ticks=int(record["start_ticks"]),
            session=None if record["session"] is None else str(record["session"]),
            sid=int(record["sid"]),
            tty=record["tty"],
        )
    except (KeyError, TypeError, ValueError):
        return None
    return grace if proc.start_ticks(grace.pid) == grace.start_ticks else None
