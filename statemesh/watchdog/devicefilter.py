"""The watchdog's first line: the kernel refuses to open a terminal at all.

A cgroup device program attached to the root of the cgroup v2 tree runs at every open of a
device node by every process (the kernel checks device numbers in inode_permission, so a
devpts instance of any mount namespace and a node made with mknod anywhere are covered
alike). It refuses a read or write of a terminal device: the pty multiplexer (/dev/ptmx and
every devpts instance's ptmx, 5:2), every pty slave (136), /dev/tty (5:0), the virtual
consoles and serial lines (4), their screen memory (/dev/vcs*, 7), every tty driver's major
/proc/tty/drivers lists; /dev/console (5:1) may only be written (systemd and journald
write boot messages there; nobody reads input from a write-only fd). Creating a node
(mknod) is left alone: its open is what is judged.

Allowed: a process whose cgroup is in the program's map, which the watchdog fills
(statemesh.watchdog.refusal). Root can write a pid into an allowed cgroup's cgroup.procs:
that is why the second line, the watchdog's kill-on-sight of every holder it does not
spare by something stronger (the loginuid), stays. Each refusal is also written to a ring
buffer (the device, the access, the opener's uid and cgroup), which the watchdog journals.

Attached with BPF_F_ALLOW_MULTI beside systemd's per-unit device programs: every program
on the way from the root must allow an open, so no unit can widen it. The attachment holds
the program: a killed watchdog leaves the kernel refusing. Program and maps are pinned in
bpffs, so the next watchdog (a restart, a hand-over) finds them instead of attaching a
second copy; a changed program (an upgrade, a new terminal driver) replaces the old one
atomically (BPF_F_REPLACE). Only purge detaches it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

from statemesh import bpf, proc

CGROUP_ROOT = Path("/sys/fs/cgroup")
PIN_DIRECTORY = Path("/sys/fs/bpf")
PROGRAM_PIN = "statemesh-terminal-filter"
MAP_PIN = "statemesh-terminal-filter-allowed"
EVENTS_PIN = "statemesh-terminal-filter-refused"
NEW = "-new"  # a replacement's pins until it is attached (bpffs refuses names with a dot)
PROGRAM_NAME = "statemesh_tty"
MAP_NAME = "statemesh_tty_ok"
EVENTS_NAME = "statemesh_tty_no"
# Each refused open, for the watchdog's journal: major, minor, access (u32 each), the
# opener's uid (u32) and cgroup id (u64). 64 KiB hold 2048 of them between two reads.
EVENT = struct.Struct("<IIIIQ")
EVENTS_SIZE = 64 * 1024
# cgroups: the watchdog's own, exempt units' with every cgroup below them (a container
# runtime's), a grace's package manager's; allocated as used (BPF_F_NO_PREALLOC)
ALLOWED_MOST = 65536
KEY_SIZE = 8  # a cgroup id

# Device numbers (Documentation/admin-guide/devices.txt) a terminal is opened through.
TTYAUX_MAJOR = 5  # /dev/tty (0), /dev/console (1), /dev/ptmx (2); judged by minor below
CONSOLE_MINOR = 1
TTYAUX_TERMINALS_BELOW = 3  # 5:3 is ttyprintk, which writes into the kernel's log only
# Always refused, whatever /proc/tty/drivers lists: VTs and 8250 serial lines, the VTs'
# screen memory (/dev/vcs*, no tty driver), pty slaves, BSD ptys, ACM, USB, AMA, hvc.
KNOWN_TERMINAL_MAJORS = frozenset({4, 7, 136, 2, 3, 166, 188, 204, 229})
TTY_DRIVERS = Path("/proc/tty/drivers")

# struct bpf_cgroup_dev_ctx and its access bits
ACCESS_MKNOD = 1
ACCESS_READ = 2
ACCESS_WRITE = 4
DEVICE_CHAR = 2

# BPF instruction classes and operations used below
_LDX_W = 0x61  # dst = *(u32 *)(src + off)
_MOV64_X = 0xBF
_MOV64_K = 0xB7
_AND64_K = 0x57
_RSH64_K = 0x77
_ADD64_K = 0x07
_STX_DW = 0x7B  # *(u64 *)(dst + off) = src
_LSH64_K = 0x67
_OR64_X = 0x4F
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1
_JA = 0x05
_JEQ_K = 0x15
_JNE_K = 0x55
_JGT_K = 0x25
_CALL = 0x85
_EXIT = 0x95
_GET_CURRENT_CGROUP_ID = 80
_GET_CURRENT_UID_GID = 15
_MAP_LOOKUP_ELEM = 1
_RINGBUF_OUTPUT = 130


@dataclasses.dataclass(frozen=True)
class Refused:
    """One open the filter refused, as the kernel told it (the opener's pid is not among
    what a device program may read: its cgroup is)."""

    major: int
    minor: int
    access: int  # ACCESS_READ | ACCESS_WRITE bits
    uid: int
    cgroup_id: int

    @classmethod
    def decode(cls, record: bytes) -> "Refused":
        return cls(*EVENT.unpack(record[:EVENT.size]))

    @property
    def device(self) -> str:
        return f"{self.major}:{self.minor}"

    @property
    def mode(self) -> str:
        """The access asked for, as an open's mode: r, w or rw."""
        return ("r" if self.access & ACCESS_READ else "") + ("w" if self.access & ACCESS_WRITE else "")


class FilterError(RuntimeError):
    """The kernel will not refuse terminal opens here (no cgroup v2, no BPF, no right)."""


class _Assembler:
    """Instructions with named jump targets, resolved into the kernel's relative offsets."""

    def __init__(self) -> None:
        self.slots: List[Tuple[int, int, int, int, int, Optional[str]]] = []
        self.labels: Dict[str, int] = {}

    def op(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> None:
        self.slots.append((code, dst, src, off, imm, None))

    def jump(self, code: int, dst: int, imm: int, label: str) -> None:
        self.slots.append((code, dst, 0, 0, imm, label))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.slots)

    def assemble(self) -> bytes:
        out = []
        for index, (code, dst, src, off, imm, label) in enumerate(self.slots):
            if label is not None:
                off = self.labels[label] - index - 1
            out.append(struct.pack("<BBhi", code, (src << 4) | dst, off, imm))
        return b"".join(out)


def terminal_majors(drivers: Path = TTY_DRIVERS) -> Tuple[int, ...]:
    """Every major a terminal can be opened through on this kernel now: each tty driver's
    (/proc/tty/drivers: a driver loaded later, a dynamic major) and the known ones; 5 is
    judged by its minor instead."""
    found = set(KNOWN_TERMINAL_MAJORS)
    with contextlib.suppress(OSError):
        for line in drivers.read_text(encoding="ascii", errors="replace").splitlines():
            fields = line.split()
            if len(fields) >= 5 and fields[-3].isdigit():
                found.add(int(fields[-3]))
    found.discard(TTYAUX_MAJOR)
    return tuple(sorted(found))


def program(map_fd: int, events_fd: int, majors: Iterable[int]) -> bytes:
    """The filter's instructions; map_fd is the allowed cgroups' map and events_fd the ring
    buffer each refusal is told through, majors those refused whole
    (terminal_majors). Access, major and minor are kept in r6-r8, which calls preserve."""
    asm = _Assembler()
    asm.op(_LDX_W, dst=6, src=1, off=0)  # r6 = access_type: (access << 16) | device type
    asm.op(_LDX_W, dst=7, src=1, off=4)  # r7 = major
    asm.op(_LDX_W, dst=8, src=1, off=8)  # r8 = minor
    asm.op(_MOV64_X, dst=5, src=6)
    asm.op(_AND64_K, dst=5, imm=0xFFFF)
    asm.jump(_JNE_K, 5, DEVICE_CHAR, "allow")
    asm.op(_RSH64_K, dst=6, imm=16)
    asm.op(_MOV64_X, dst=5, src=6)
    asm.op(_AND64_K, dst=5, imm=ACCESS_READ | ACCESS_WRITE)
    asm.jump(_JEQ_K, 5, 0, "allow")  # mknod alone: the open is judged
    asm.jump(_JEQ_K, 7, TTYAUX_MAJOR, "ttyaux")
    for major in sorted(set(majors)):
        asm.jump(_JEQ_K, 7, major, "judge")
    asm.jump(_JA, 0, 0, "allow")
    asm.label("ttyaux")
    asm.jump(_JGT_K, 8, TTYAUX_TERMINALS_BELOW - 1, "allow")
    asm.jump(_JNE_K, 8, CONSOLE_MINOR, "judge")
    asm.jump(_JEQ_K, 6, ACCESS_WRITE, "allow")  # the console, written only
    asm.label("judge")
    asm.op(_CALL, imm=_GET_CURRENT_CGROUP_ID)
    asm.op(_STX_DW, dst=10, src=0, off=-8)  # the event's cgroup id, and the lookup's key
    asm.op(_MOV64_X, dst=2, src=10)
    asm.op(_ADD64_K, dst=2, imm=-8)
    _load_map(asm, 1, map_fd)
    asm.op(_CALL, imm=_MAP_LOOKUP_ELEM)
    asm.jump(_JNE_K, 0, 0, "allow")
    _tell_refusal(asm, events_fd)
    asm.op(_MOV64_K, dst=0, imm=0)  # refused: the opener gets EPERM
    asm.op(_EXIT)
    asm.label("allow")
    asm.op(_MOV64_K, dst=0, imm=1)
    asm.op(_EXIT)
    return asm.assemble()


def _load_map(asm: _Assembler, register: int, map_fd: int) -> None:
    asm.op(_LD_IMM64, dst=register, src=_PSEUDO_MAP_FD, imm=map_fd)
    asm.op(0)  # the second half of the 64-bit load


def _tell_refusal(asm: _Assembler, events_fd: int) -> None:
    """The EVENT on the stack below the cgroup id, sent to the ring buffer; a full buffer
    loses the event, never the refusal. Written 8 bytes at a time: without CAP_PERFMON,
    Linux 6.1's verifier refuses a 4-byte store beside another in one stack slot."""
    asm.op(_MOV64_X, dst=1, src=8)
    asm.op(_LSH64_K, dst=1, imm=32)
    asm.op(_OR64_X, dst=1, src=7)
    asm.op(_STX_DW, dst=10, src=1, off=-24)  # major, then minor
    asm.op(_CALL, imm=_GET_CURRENT_UID_GID)
    asm.op(_LSH64_K, dst=0, imm=32)  # the uid (the low half) above
    asm.op(_OR64_X, dst=0, src=6)  # the access
    asm.op(_STX_DW, dst=10, src=0, off=-16)
    _load_map(asm, 1, events_fd)
    asm.op(_MOV64_X, dst=2, src=10)
    asm.op(_ADD64_K, dst=2, imm=-EVENT.size)
    asm.op(_MOV64_K, dst=3, imm=EVENT.size)
    asm.op(_MOV64_K, dst=4, imm=0)
    asm.op(_CALL, imm=_RINGBUF_OUTPUT)


def _cgroup_fd(cgroup_root: Path) -> int:
    try:
        return os.open(cgroup_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise FilterError(f"no cgroup v2 tree at {cgroup_root}: {error.strerror}") from None


class Objects(NamedTuple):
    """The filter's program and its two maps (fds), as loaded or as pinned (None: not)."""

    prog: Optional[int]
    allowed: Optional[int]
    events: Optional[int]

    def complete(self) -> bool:
        return None not in self


PIN_NAMES = (PROGRAM_PIN, MAP_PIN, EVENTS_PIN)  # in the order of Objects' fields


def _pinned(pins: Path, suffix: str = "") -> Objects:
    """The program and maps pinned under these names (fds), where they are."""
    found: List[Optional[int]] = []
    try:
        for name in PIN_NAMES:
            try:
                found.append(bpf.pinned(str(pins / f"{name}{suffix}")))
            except FileNotFoundError:
                found.append(None)
    except BaseException:
        _close(*found)
        raise
    return Objects(*found)


def _close(*fds: Optional[int]) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def _load(majors: Iterable[int]) -> Objects:
    """New maps and this code's program over them (fds, not attached)."""
    made: List[int] = []
    try:
        made.append(bpf.create_hash_map(KEY_SIZE, 1, ALLOWED_MOST, MAP_NAME))
        made.append(bpf.create_ring_buffer(EVENTS_SIZE, EVENTS_NAME))
        prog = bpf.load_program(bpf.PROG_TYPE_CGROUP_DEVICE, program(made[0], made[1], majors),
                                PROGRAM_NAME)
    except BaseException:
        _close(*made)
        raise
    return Objects(prog, made[0], made[1])


def _reads(objects: Objects) -> bool:
    """Whether the program reads exactly these maps, in the order its code names them, and
    the ring buffer is of this code's size: a tag says nothing of which maps they are (the
    kernel zeroes map references before hashing)."""
    assert objects.complete()
    events = bpf.map_info(objects.events)  # type: ignore[arg-type]
    return bpf.program_info(objects.prog).map_ids == [  # type: ignore[arg-type]
        bpf.map_id(objects.allowed), events.id] and \
        (events.type, events.max_entries) == (bpf.MAP_TYPE_RINGBUF, EVENTS_SIZE)  # type: ignore[arg-type]


def _pin(pins: Path, suffix: str, objects: Objects) -> None:
    for name, fd in zip(PIN_NAMES, objects):
        bpf.pin(fd, str(pins / f"{name}{suffix}"))  # type: ignore[arg-type]


def _forget(pins: Path, suffix: str) -> None:
    for name in PIN_NAMES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pins / f"{name}{suffix}")


def _move_in_place(pins: Path) -> None:
    """The new pins over the old ones: maps first, so that a kill in between leaves the
    new program pinned as new, which the next start finishes moving."""
    for name in (MAP_PIN, EVENTS_PIN, PROGRAM_PIN):
        with contextlib.suppress(FileNotFoundError):  # moved by a start that was killed
            os.rename(pins / f"{name}{NEW}", pins / name)


def _finish_interrupted(cgroup_fd: int, pins: Path) -> None:
    """A watchdog killed between attaching a program and moving its pins in place left
    them pinned as new: attached, that program is the one in force (its pins are moved
    in place); not attached, it is forgotten."""
    new = _pinned(pins, NEW)
    try:
        if new.prog is not None and bpf.program_info(new.prog).prog_id in bpf.attached_ids(cgroup_fd):
            _move_in_place(pins)
        else:
            _forget(pins, NEW)
    finally:
        _close(*new)


@dataclasses.dataclass
class DeviceFilter:
    """The attached filter's maps: through one the watchdog says who may open terminals,
    through the other the kernel tells it each refusal."""

    map_fd: int
    events_fd: int
    prog_fd: int
    prog_id: int
    replaced: bool  # whether this start attached it (or replaced an older program)
    majors: Tuple[int, ...]  # the terminal drivers' majors it refuses whole

    def allow(self, cgroup_ids: Iterable[int]) -> None:
        """Exactly these cgroups may open terminals from now on."""
        wanted = {_key(cgroup_id) for cgroup_id in cgroup_ids}
        present = set(bpf.map_keys(self.map_fd, KEY_SIZE))
        for key in present - wanted:  # first: a full map has room again
            with contextlib.suppress(FileNotFoundError, bpf.BpfError):
                bpf.map_delete(self.map_fd, key)
        for key in wanted - present:
            bpf.map_update(self.map_fd, key, b"\1")

    def objects(self) -> Objects:
        return Objects(self.prog_fd, self.map_fd, self.events_fd)

    def pin_again_if_lost(self, pins: Path) -> bool:
        """Pinned again where its pins are gone or name another program or map (unlinked,
        a bpffs mounted over them): else the next watchdog would attach a second one.
        Whether it had to be."""
        pinned = _pinned(pins)
        try:
            if pinned.complete() and bpf.program_info(pinned.prog).prog_id == self.prog_id \
                    and [bpf.map_id(fd) for fd in pinned[1:]] == \
                    [bpf.map_id(self.map_fd), bpf.map_id(self.events_fd)]:  # type: ignore[arg-type]
                return False
        finally:
            _close(*pinned)
        _forget(pins, "")
        _pin(pins, "", self.objects())
        return True

    def close(self) -> None:
        _close(self.map_fd, self.events_fd, self.prog_fd)


def enforce(allowed: Iterable[int], cgroup_root: Path = CGROUP_ROOT,
            pins: Path = PIN_DIRECTORY, majors: Optional[Tuple[int, ...]] = None) -> DeviceFilter:
    """The filter attached at cgroup_root and allowing exactly `allowed`: the one pinned in
    this boot where it is this code's program over its pinned maps and still attached,
    else this code's, attached in its place (atomically, where one was attached) and
    pinned."""
    majors = terminal_majors() if majors is None else majors
    cgroup_fd = _cgroup_fd(cgroup_root)
    old = Objects(None, None, None)
    try:
        _finish_interrupted(cgroup_fd, pins)
        old = _pinned(pins)
        new = _load(majors)
        try:
            return _enforce(list(allowed), cgroup_fd, pins, old, new, majors)
        finally:
            _close(*new)
    except OSError as error:  # bpf.BpfError among them
        raise FilterError(f"the terminal filter could not be put in force: {error}") from None
    finally:
        _close(*old, cgroup_fd)


def _duplicate(objects: Objects, replaced: bool, majors: Tuple[int, ...]) -> DeviceFilter:
    prog, allowed, events = (os.dup(fd) for fd in objects)  # type: ignore[arg-type]
    return DeviceFilter(allowed, events, prog, bpf.program_info(prog).prog_id, replaced, majors)


def _enforce(allowed: List[int], cgroup_fd: int, pins: Path, old: Objects, new: Objects,
             majors: Tuple[int, ...]) -> DeviceFilter:
    attached = bpf.attached_ids(cgroup_fd)
    old_info = bpf.program_info(old.prog) if old.prog is not None else None
    old_attached = old_info is not None and old_info.prog_id in attached
    if old_attached and old.complete() and old_info.tag == bpf.program_info(new.prog).tag \
            and _reads(old):  # type: ignore[union-attr,arg-type]
        kept = _duplicate(old, replaced=False, majors=majors)
        kept.allow(allowed)
        return kept
    made = _duplicate(new, replaced=True, majors=majors)
    try:
        made.allow(allowed)  # before it is attached: the watchdog's own watches keep working
        _forget(pins, NEW)
        _pin(pins, NEW, new)  # a directory that is no bpffs fails here, attaching nothing
        try:
            bpf.attach(cgroup_fd, new.prog, old.prog if old_attached else None)  # type: ignore[arg-type]
        except BaseException:
            _forget(pins, NEW)
            raise
        _move_in_place(pins)
    except BaseException:
        made.close()
        raise
    return made


def _ours_attached(cgroup_fd: int) -> List[int]:
    """fds of every program named as this package's attached at the cgroup (root only:
    a program's fd from its id takes CAP_SYS_ADMIN)."""
    found = []
    for prog_id in bpf.attached_ids(cgroup_fd):
        try:
            fd = bpf.program_by_id(prog_id)
        except bpf.BpfError as error:
            if error.errno == 2:
                continue  # gone since it was listed
            raise  # EPERM: without CAP_SYS_ADMIN nothing can be said of them
        if bpf.program_info(fd).name == PROGRAM_NAME:
            found.append(fd)
        else:
            os.close(fd)
    return found


def remove(cgroup_root: Path = CGROUP_ROOT, pins: Path = PIN_DIRECTORY) -> int:
    """Detach every program of this package's name from the root, then forget the pins
    (purge, as root); how many were attached. A failure leaves the pins, so that a retry
    still finds what to detach."""
    cgroup_fd = _cgroup_fd(cgroup_root)
    detached = 0
    try:
        for fd in _ours_attached(cgroup_fd):
            try:
                bpf.detach(cgroup_fd, fd)
                detached += 1
            finally:
                os.close(fd)
    finally:
        os.close(cgroup_fd)
    for suffix in ("", NEW):
        _forget(pins, suffix)
    return detached


@dataclasses.dataclass(frozen=True)
class FilterState:
    """What status says of the filter: in force or why not, and whom it lets open terminals."""

    attached: bool
    detail: str
    allowed: Tuple[int, ...] = ()


def state(cgroup_root: Path = CGROUP_ROOT, pins: Path = PIN_DIRECTORY) -> FilterState:
    """Read back from the kernel (as root): the pinned program attached at the root, the
    only one of its name there, over its pinned maps, and this code's program for this
    kernel's terminal drivers (its tag equals a twin's loaded now); the cgroups it allows."""
    try:
        pinned = _pinned(pins)
    except bpf.BpfError as error:
        return FilterState(False, f"cannot read the pinned filter: {error}")
    try:
        if not pinned.complete():
            return FilterState(False, "no filter pinned")
        return _read_back(cgroup_root, pinned)
    except (bpf.BpfError, FilterError) as error:
        return FilterState(False, f"cannot read the filter: {error}")
    finally:
        _close(*pinned)


def _read_back(cgroup_root: Path, pinned: Objects) -> FilterState:
    info = bpf.program_info(pinned.prog)  # type: ignore[arg-type]
    cgroup_fd = _cgroup_fd(cgroup_root)
    try:
        ours = _ours_attached(cgroup_fd)
        ours_ids = [bpf.program_info(fd).prog_id for fd in ours]
        _close(*ours)
    finally:
        os.close(cgroup_fd)
    if info.prog_id not in ours_ids:
        return FilterState(False, "the pinned filter is not attached")
    if len(ours_ids) > 1:
        return FilterState(False, f"{len(ours_ids)} programs of its name are attached, "
                                  "not the one pinned alone")
    if not _reads(pinned):
        return FilterState(False, "the attached filter reads other maps than those pinned")
    twin = _load(terminal_majors())
    try:
        twin_tag = bpf.program_info(twin.prog).tag  # type: ignore[arg-type]
    finally:
        _close(*twin)
    if info.tag != twin_tag:
        return FilterState(False, "the attached filter is not this package's program for this "
                                  f"kernel's terminal drivers (tag {info.tag.hex()})")
    allowed = tuple(sorted(int.from_bytes(key, "little")
                           for key in bpf.map_keys(pinned.allowed, KEY_SIZE)))  # type: ignore[arg-type]
    return FilterState(True, "attached", allowed)


def _key(cgroup_id: int) -> bytes:
    """A cgroup id as the map holds it (the u64 bpf_get_current_cgroup_id() returns)."""
    return cgroup_id.to_bytes(KEY_SIZE, "little")


def admit(cgroup_id: int, pins: Path = PIN_DIRECTORY) -> None:
    """Add one cgroup to the pinned filter's map, where a filter is pinned."""
    map_fd = bpf.pinned(str(pins / MAP_PIN))
    try:
        bpf.map_update(map_fd, _key(cgroup_id), b"\1")
    finally:
        os.close(map_fd)


def is_attached(prog_id: int, cgroup_root: Path = CGROUP_ROOT) -> bool:
    """Whether this program is attached to the cgroup itself (False where that cannot be read)."""
    try:
        cgroup_fd = _cgroup_fd(cgroup_root)
    except FilterError:
        return False
    try:
        return prog_id in bpf.attached_ids(cgroup_fd)
    except bpf.BpfError:
        return False
    finally:
        os.close(cgroup_fd)


def process_cgroup(pid: int, hierarchy: Path = CGROUP_ROOT) -> Optional[Tuple[int, str]]:
    """A process's cgroup v2 id and path, None when it is gone or its cgroup cannot be read."""
    path = proc.cgroup_path(pid)
    if not path:
        return None
    try:
        return cgroup_id(hierarchy / path.lstrip("/")), path
    except OSError:
        return None


def cgroup_id(path: Path) -> int:
    """A cgroup v2 directory's id, as bpf_get_current_cgroup_id() gives it: its inode."""
    return os.stat(path).st_ino


def cgroups_of_units(units: Iterable[str], cgroup_root: Path = CGROUP_ROOT) -> Dict[int, str]:
    """id -> path of every cgroup of these units, with the cgroups below them: reached
    through slices only (a unit's cgroup sits in its slice's), so a walk is short."""
    wanted = set(units)
    found: Dict[int, str] = {}
    if not wanted:
        return found
    pending = [cgroup_root]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue  # gone since it was listed
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if entry.name in wanted:
                found.update(_subtree(Path(entry.path), cgroup_root))
            elif entry.name.endswith(".slice"):
                pending.append(Path(entry.path))
    return found


def _subtree(top: Path, cgroup_root: Path) -> Dict[int, str]:
    found: Dict[int, str] = {}
    for directory, _dirs, _files in os.walk(top):
        with contextlib.suppress(OSError):
            found[cgroup_id(Path(directory))] = _below(directory, cgroup_root)
    return found


def slices(cgroup_root: Path = CGROUP_ROOT) -> List[Path]:
    """The root and every slice below it: where a unit's cgroup is made when it starts."""
    found = [cgroup_root]
    for directory, dirs, _files in os.walk(cgroup_root):
        dirs[:] = [name for name in dirs if name.endswith(".slice")]
        found.extend(Path(directory) / name for name in dirs)
    return found


def names(cgroup_ids: Iterable[int], cgroup_root: Path = CGROUP_ROOT) -> Dict[int, str]:
    """id -> path below the root, for the ids that name a cgroup now (a walk of the tree)."""
    wanted = set(cgroup_ids)
    found: Dict[int, str] = {}
    for directory, _dirs, _files in os.walk(cgroup_root):
        with contextlib.suppress(OSError):
            ino = cgroup_id(Path(directory))
            if ino in wanted:
                found[ino] = _below(directory, cgroup_root)
    return found


def _below(directory: str, cgroup_root: Path) -> str:
    relative = os.path.relpath(directory, cgroup_root)
    return "/" if relative == "." else "/" + relative
