"""Which processes hold which terminal: read from /proc, nothing changed.

A pty is named by its index inside one devpts instance, and every instance numbers from 0:
/proc/PID/stat's tty_nr (136, 0) is the same for /dev/pts/0 of the host and of a
container. So a pty is identified here by the devpts instance (the st_dev of its mount)
AND its device number: fds are matched by fstat (both numbers), a controlling tty by the
devpts the process sees (see _ctty_instance). Other terminals
(/dev/ttyN, serial ports, /dev/console) are global devices: the device number suffices.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
import stat
from types import MappingProxyType
from typing import Dict, FrozenSet, Iterator, List, Mapping, Optional, Set, Tuple

from statemesh import proc

PTY_SLAVE_MAJOR = 136  # UNIX98_PTY_SLAVE_MAJOR: every pty slave, its index the minor
PTY_SLAVE_MAJORS = range(PTY_SLAVE_MAJOR, PTY_SLAVE_MAJOR + 8)
PTMX = os.makedev(5, 2)
PF_KTHREAD = 0x00200000

# (instance, rdev): instance is the devpts st_dev for a pty, 0 for a global tty device.
Key = Tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Terminal:
    """One terminal the watchdog guards."""

    path: str
    rdev: int
    instance: int  # st_dev of the devpts mount for a pty, 0 for a global tty device
    appeared: Optional[float]  # wall-clock creation of a pty node; None for tty devices

    @property
    def key(self) -> Key:
        return (self.instance, self.rdev)

    @property
    def is_pty(self) -> bool:
        return self.instance != 0


def pty_rdev(index: int) -> int:
    """The device number of pty slave `index`, as the kernel numbers them: one major, a
    20-bit minor (/proc/tty/drivers: "pty_slave /dev/pts 136 0-1048575")."""
    return os.makedev(PTY_SLAVE_MAJOR, index)


def pty(devpts: str, name: str) -> Optional[Terminal]:
    """The pty `name` of the devpts mount `devpts`; None if it is gone or not a pty."""
    if not name.isdigit():
        return None
    try:
        info = os.stat(os.path.join(devpts, name))
    except OSError:
        return None
    if not stat.S_ISCHR(info.st_mode) or os.major(info.st_rdev) not in PTY_SLAVE_MAJORS:
        return None
    return Terminal(os.path.join(devpts, name), info.st_rdev, info.st_dev, info.st_ctime)


def tty_device(path: str) -> Optional[Terminal]:
    """A global terminal device such as /dev/tty3 or /dev/ttyS0; None if not one."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISCHR(info.st_mode) or os.major(info.st_rdev) in PTY_SLAVE_MAJORS:
        return None
    return Terminal(path, info.st_rdev, 0, None)


def ptys(devpts: str) -> List[Terminal]:
    """Every pty of the devpts mount that exists now (a node exists while its master is open)."""
    found = (pty(devpts, name) for name in os.listdir(devpts))
    return [terminal for terminal in found if terminal is not None]


@dataclasses.dataclass(frozen=True)
class Process:
    """What the watchdog needs of one process, read in one pass over /proc."""

    pid: int
    ppid: int
    sid: int
    tty_nr: int
    kernel_thread: bool
    start_ticks: int  # start time in clock ticks after boot: with the pid, a process identity
    holds: FrozenSet[Key]  # terminals it has open fds on (a pty master counts as its slave)

    def age(self) -> float:
        """Seconds since the process started (tick resolution)."""
        return proc.seconds_since(self.start_ticks)


def _pts_instance_of(pid: int) -> int:
    """The devpts instance a /dev/ptmx opened by `pid` belongs to: its root's /dev/pts."""
    try:
        return os.stat(f"/proc/{pid}/root/dev/pts").st_dev
    except OSError:
        return -1


def _fdinfo(pid: int, fd: str) -> Dict[bytes, bytes]:
    """The fields of /proc/PID/fdinfo/FD, read at once (one open file's); {} when the fd is gone."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return {}
    return {name: value.strip() for name, _, value in (line.partition(b":") for line in lines) if value}


def _master_index(pid: int, fd: str) -> Optional[int]:
    """The pty index behind a ptmx fd, from fdinfo's tty-index (Linux >= 4.13)."""
    index = _fdinfo(pid, fd).get(b"tty-index")
    return None if index is None else int(index)


def _reads(pid: int, fd: str, seen: os.stat_result) -> bool:
    """Whether an fd on a terminal device, `seen` by a stat through it, can read from it.

    A write-only fd gives nobody a session: systemd logs to /dev/console that way (its
    executor opens it O_WRONLY|O_CLOEXEC while it spawns every service, on Debian 13), and
    so does any boot script echoing to the console. Ptys are not relaxed so: root can
    TIOCSTI input into a pty through a write-only fd, and an exempt workload may read one.
    The executor closes its console fd and soon opens other files read-only under the same
    number: fdinfo's inode (Linux >= 5.14) tells whether its flags are still the terminal's.
    """
    fields = _fdinfo(pid, fd)
    if b"ino" in fields and int(fields[b"ino"]) != seen.st_ino:
        return False  # the fd was closed since the stat, and its number reused
    flags = fields.get(b"flags")
    return flags is not None and int(flags, 8) & os.O_ACCMODE != os.O_WRONLY


def _held_terminals(pid: int, tty_rdevs: FrozenSet[int]) -> FrozenSet[Key]:
    """Keys of the terminals `pid` has fds open on (for a terminal device: to read)."""
    directory = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(directory)
    except OSError:
        return frozenset()
    held: Set[Key] = set()
    for fd in fds:
        try:
            info = os.stat(f"{directory}/{fd}")
        except OSError:
            continue
        if not stat.S_ISCHR(info.st_mode):
            continue
        if os.major(info.st_rdev) in PTY_SLAVE_MAJORS:
            held.add((info.st_dev, info.st_rdev))
        elif info.st_rdev == PTMX:
            index = _master_index(pid, fd)
            if index is not None:
                held.add((_master_instance(pid, fd, info), pty_rdev(index)))
        elif info.st_rdev in tty_rdevs and _reads(pid, fd, info):
            held.add((0, info.st_rdev))
    return frozenset(held)


def _master_instance(pid: int, fd: str, info: os.stat_result) -> int:
    """A ptmx opened inside a devpts mount belongs to it; a ptmx device node elsewhere
    (/dev/ptmx, or one made with mknod) to the devpts mounted at "pts" beside it, as the
    kernel finds it, in the opener's mount namespace; else to the opener's /dev/pts."""
    if stat.S_ISCHR(info.st_mode) and _is_devpts(info.st_dev):
        return info.st_dev
    try:
        opened = os.readlink(f"/proc/{pid}/fd/{fd}")
        return os.stat(f"/proc/{pid}/root{os.path.dirname(opened)}/pts").st_dev
    except OSError:
        return _pts_instance_of(pid)


_DEVPTS_DEVS: Dict[int, bool] = {}


def _is_devpts(dev: int) -> bool:
    """Whether a filesystem device number is a devpts instance (from /proc/self/mountinfo)."""
    if dev not in _DEVPTS_DEVS:
        _DEVPTS_DEVS.clear()
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                major, minor = fields[2].split(":")
                fstype = fields[fields.index("-") + 1]
                _DEVPTS_DEVS[os.makedev(int(major), int(minor))] = fstype == "devpts"
        _DEVPTS_DEVS.setdefault(dev, False)
    return _DEVPTS_DEVS[dev]


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash come octal-escaped (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def _devpts_mountpoints(pid: int) -> List[str]:
    """Where devpts is mounted in the mount namespace of `pid`, as that namespace sees it."""
    try:
        with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        if "-" in fields and fields[fields.index("-") + 1] == "devpts":
            found.append(_unescape(fields[4]))
    return found


def devpts_instances() -> Dict[int, str]:
    """Every devpts instance mounted in any mount namespace (a container's, one that
    `unshare -m` made): its st_dev -> a path that reaches its root from here, through
    /proc/PID/root (the namespace's own view). One process a namespace is read."""
    found: Dict[int, str] = {}
    namespaces: Set[str] = set()
    for pid in _pids():
        try:
            namespace = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            continue
        if namespace in namespaces:
            continue
        namespaces.add(namespace)
        for mountpoint in _devpts_mountpoints(pid):
            path = f"/proc/{pid}/root{mountpoint}"
            try:
                found.setdefault(os.stat(path).st_dev, path)
            except OSError:
                continue
    return found


def is_devpts_mount(path: str) -> bool:
    """Whether `path` is the root of a devpts mount."""
    try:
        return os.path.ismount(path) and _is_devpts(os.stat(path).st_dev)
    except OSError:
        return False


def _pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def processes(tty_rdevs: FrozenSet[int] = frozenset()) -> Iterator[Process]:
    """Every live process, newest pid first: the opener of a new terminal comes early."""
    for pid in sorted(_pids(), reverse=True):
        fields = proc.read_stat(pid)
        if fields is None:
            continue
        ppid, sid, tty_nr, flags, start = fields
        kernel_thread = bool(flags & PF_KTHREAD)
        holds = frozenset() if kernel_thread else _held_terminals(pid, tty_rdevs)
        yield Process(pid, ppid, sid, tty_nr, kernel_thread, start, holds)


def _ctty_instance(process: Process) -> int:
    """The devpts instance of a process's controlling pty.

    The kernel reports only the device number. The process acquired the tty by opening a
    slave, which is (nearly always) one it holds too, else one under the /dev/pts it sees:
    a container's processes see the container's instance, the host's see the host's.
    """
    for instance, rdev in process.holds:
        if rdev == process.tty_nr and instance:
            return instance
    return _pts_instance_of(process.pid)


def controlling_ttys() -> Set[int]:
    """The device numbers of every controlling tty in use: one read per process, no fd scan."""
    found = set()
    for pid in _pids():
        fields = proc.read_stat(pid)
        if fields is not None and fields[2]:
            found.add(fields[2])
    return found


def is_holder(terminal: Terminal, process: Process) -> bool:
    """Whether `process` holds `terminal`: by an open fd, or as its controlling tty."""
    if terminal.key in process.holds:
        return True
    if process.tty_nr != terminal.rdev:
        return False
    return not terminal.is_pty or _ctty_instance(process) == terminal.instance


def any_pty(process: Process, mounts: Mapping[int, str]) -> Optional[Terminal]:
    """A pty the process holds, of any devpts instance: by an fd, or as controlling tty.
    `mounts` (instance -> where it is mounted) names it by its node where the instance is
    known: a pty created after the listing the sweep began with is still named as itself."""
    for instance, rdev in sorted(process.holds):
        if instance:
            return _unlisted_pty(instance, rdev, mounts)
    if os.major(process.tty_nr) in PTY_SLAVE_MAJORS:
        return _unlisted_pty(_ctty_instance(process), process.tty_nr, mounts)
    return None


def _unlisted_pty(instance: int, rdev: int, mounts: Mapping[int, str]) -> Terminal:
    """A pty known by its numbers only (no node was listed for it): named for the log by its
    node in a known instance, else by its numbers."""
    index = (os.major(rdev) - PTY_SLAVE_MAJOR) * 256 + os.minor(rdev)
    if instance in mounts:
        path = os.path.join(mounts[instance], str(index))
    else:
        path = f"pts/{index} of devpts {os.major(instance)}:{os.minor(instance)}"
    return Terminal(path, rdev, instance, None)


def holders(wanted: List[Terminal], tty_rdevs: FrozenSet[int] = frozenset(),
            every_pty: bool = False,
            mounts: Mapping[int, str] = MappingProxyType({})) -> Iterator[Tuple[Terminal, Process]]:
    """Each process holding one of `wanted` (or, with every_pty, any pty at all), in one
    pass over /proc, yielded as soon as it is read so that the caller can act at once.
    `mounts` names the ptys found by every_pty alone (see any_pty)."""
    for process in processes(tty_rdevs):
        held = next((terminal for terminal in wanted if is_holder(terminal, process)), None)
        if held is None and every_pty:
            held = any_pty(process, mounts)
        if held is not None:
            yield held, process


def describe(pid: int) -> Tuple[int, str]:
    """(uid, command line) of a process for the kill log; (-1, '?') when it is gone."""
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return -1, "?"
    return uid, " ".join(os.fsdecode(arg) for arg in argv if arg) or "?"


def user_name(uid: int) -> str:
    """The user name of a uid, the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
