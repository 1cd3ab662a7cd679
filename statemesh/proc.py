"""Process identity from /proc: a pid with its start time names one process, never its successor;
and the systemd unit a process runs in, from its cgroup.

The install journal, the installation grace and the watchdog all remember processes across
time; a pid alone can be reused by the next process, so each pairs it with the start time
from /proc/PID/stat. Nothing here is specific to terminals.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional, Tuple

_SLICE = ".slice"
_UNIT_TYPES = ("service", "scope", "socket", "mount", "swap")


def read_stat(pid: int) -> Optional[Tuple[int, int, int, int, int]]:
    """(ppid, sid, tty_nr, flags, starttime) from /proc/PID/stat, None for a zombie or a gone pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[1]), int(fields[3]), int(fields[4]), int(fields[6]), int(fields[19])


def start_ticks(pid: int) -> Optional[int]:
    """A live process's start time in clock ticks after boot: with the pid, its identity."""
    fields = read_stat(pid)
    return None if fields is None else fields[4]


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def seconds_since(ticks: int) -> float:
    """Seconds since a start time in clock ticks after boot (/proc/PID/stat's starttime)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / CLOCK_TICKS


def age(pid: int) -> Optional[float]:
    """Seconds since a live process started (clock-tick resolution); None when it is gone."""
    ticks = start_ticks(pid)
    return None if ticks is None else seconds_since(ticks)


def executable(pid: int) -> str:
    """The file the process runs as the kernel resolved it at exec ("" when it cannot be
    read; a file since deleted or replaced reads "... (deleted)")."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


# /proc/PID/loginuid of a process that no login started: systemd's services, the kernel's.
LOGINUID_UNSET = 4294967295


def cmdline(pid: int) -> Tuple[str, ...]:
    """The process's arguments; empty when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ()
    return tuple(os.fsdecode(part) for part in raw.split(b"\0")[:-1])


def born_of_a_login(pid: int) -> bool:
    """Whether the process descends from a login: pam_loginuid gave its session a loginuid,
    which every child inherits and which, once the node has made loginuids immutable
    (statemesh.guarantees.logins), nobody can take off again, whatever cgroup it is moved
    into. A loginuid that cannot be read counts as a login's."""
    try:
        with open(f"/proc/{pid}/loginuid", "rb") as handle:
            return int(handle.read()) != LOGINUID_UNSET
    except (OSError, ValueError):
        return True


def is_stopped(pid: int) -> bool:
    """Whether the process is stopped: by a signal (SIGSTOP, Ctrl-Z's SIGTSTP) or by a tracer.
    A stopped process is alive, and does nothing."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2 :][:1] in (b"T", b"t")


def is_descendant(pid: int, ancestor: int) -> bool:
    """Whether `ancestor` is `pid` or one of its ancestors (by the live parent chain)."""
    seen = 0
    while pid > 1 and seen < 4096:
        if pid == ancestor:
            return True
        fields = read_stat(pid)
        if fields is None:
            return False
        pid, seen = fields[0], seen + 1
    return pid == ancestor


def cgroup_path(pid: int) -> str:
    """The process's systemd cgroup path; empty when it is gone."""
    try:
        return systemd_cgroup(Path(f"/proc/{pid}/cgroup").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return ""


def unit_of(pid: int) -> str:
    """The system unit a process runs in, as its cgroup says ("" for none, or gone)."""
    return system_unit(cgroup_path(pid))


def system_unit(cgroup: str) -> str:
    """The system manager's unit of a cgroup path: its first part that is not a slice
    (/system.slice/x.service/sub -> x.service); "" when that part is no unit at all."""
    for part in cgroup.strip("/").split("/"):
        if part.endswith(_SLICE):
            continue
        return part if part.rpartition(".")[2] in _UNIT_TYPES else ""
    return ""


def systemd_cgroup(text: str) -> str:
    """The systemd path in a /proc/PID/cgroup text: the unified hierarchy's, else name=systemd's
    (a hybrid system's unified line says "/" of everything); "/" for the root cgroup of a
    unified-only system, where root can put any process by hand."""
    legacy, unified = "", ""
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            unified = path
        if controllers == "name=systemd":
            legacy = path
    if unified and unified != "/":
        return unified
    return legacy or unified
