"""The few bpf(2) commands the terminal filter needs, through libc: no bcc, no libbpf.

Debian's and Ubuntu's kernels have cgroup device programs (BPF_PROG_TYPE_CGROUP_DEVICE)
since 4.15; loading and attaching one takes CAP_BPF and CAP_NET_ADMIN. Each function is
one command of the syscall; attributes are packed as the kernel's `union bpf_attr` lays
them out (x86_64 and aarch64 share the layout: only the syscall's number differs).
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
import struct
from typing import Iterator, List, Optional

# __NR_bpf per machine (os.uname().machine): 64-bit little-endian ones only, where a
# cgroup's inode number is its whole id and instructions are packed as below
SYSCALL_NUMBERS = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361}

MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
PROG_LOAD = 5
OBJ_PIN = 6
OBJ_GET = 7
PROG_ATTACH = 8
PROG_DETACH = 9
PROG_GET_FD_BY_ID = 13
OBJ_GET_INFO_BY_FD = 15
PROG_QUERY = 16

MAP_TYPE_HASH = 1
MAP_TYPE_RINGBUF = 27
F_NO_PREALLOC = 1  # a hash map's entries allocated as they are added
PROG_TYPE_CGROUP_DEVICE = 15
CGROUP_DEVICE = 6  # the attach type
F_ALLOW_MULTI = 1 << 1  # beside systemd's own device programs, each of which must allow too
F_REPLACE = 1 << 2
OBJ_NAME_LEN = 16
LOG_SIZE = 65536

_ATTR_SIZE = 128  # larger than every command's part of union bpf_attr used here
_PROG_INFO = struct.Struct("=II8sIIQQQIIQ16s")  # type .. name of struct bpf_prog_info


class BpfError(OSError):
    """A bpf(2) command the kernel refused; errno says why."""


@dataclasses.dataclass(frozen=True)
class ProgramInfo:
    """What the kernel says of a loaded program: enough to tell ours from any other."""

    prog_id: int
    name: str
    tag: bytes
    map_ids: List[int]


def _syscall_number() -> int:
    number = SYSCALL_NUMBERS.get(os.uname().machine)
    if number is None:
        raise BpfError(0, f"bpf(2)'s number on {os.uname().machine} is not known here")
    return number


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def call(command: int, attr: bytes) -> int:
    """bpf(command, attr): the kernel's answer (an fd for the commands that make one)."""
    buffer = ctypes.create_string_buffer(attr.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    result = _libc.syscall(ctypes.c_long(_syscall_number()), ctypes.c_int(command),
                           buffer, ctypes.c_uint(_ATTR_SIZE))
    if result < 0:
        errno = ctypes.get_errno()
        raise BpfError(errno, os.strerror(errno))
    return int(result)


def _address(buffer: ctypes.Array) -> int:  # type: ignore[type-arg]
    return ctypes.addressof(buffer)


def create_hash_map(key_size: int, value_size: int, max_entries: int, name: str) -> int:
    attr = struct.pack("=IIIIIII16s", MAP_TYPE_HASH, key_size, value_size, max_entries,
                       F_NO_PREALLOC, 0, 0, name.encode()[:OBJ_NAME_LEN - 1])
    return call(MAP_CREATE, attr)


def create_ring_buffer(size: int, name: str) -> int:
    """A ring buffer map of `size` bytes (a power of two, whole pages): what programs send
    to user space (bpf_ringbuf_output), read with RingBuffer."""
    attr = struct.pack("=IIIIIII16s", MAP_TYPE_RINGBUF, 0, 0, size, 0, 0, 0,
                       name.encode()[:OBJ_NAME_LEN - 1])
    return call(MAP_CREATE, attr)


@dataclasses.dataclass(frozen=True)
class Read:
    """What one read of a ring buffer found: the records, whether the buffer was close to
    full (records may have been lost: a program's output fails then), and whether the
    consumer's position was not where this reader left it (someone holding the map wrote
    it; the reader went on from the producer's position)."""

    records: List[bytes]
    was_full: bool
    moved: bool


class RingBuffer:
    """The reading end of a ring buffer map, as the kernel maps it: the consumer's position
    on a page of its own (the one page user space may write), then the producer's position
    and the data, mapped twice in a row so that no record wraps. Its map's fd is readable
    (poll) when records wait. The reader keeps its own position and only ever writes it:
    root can map that page too. Loads and stores are plain (x86-64's order suffices; a
    weakly ordered machine may see a record's length before its data)."""

    BUSY = 1 << 31  # a record reserved, not committed yet
    DISCARD = 1 << 30
    HEADER = 8

    def __init__(self, map_fd: int, size: int, record_size: int):
        page = mmap.PAGESIZE
        self.size = size
        self.record_size = record_size
        self.page = page
        self.fd = os.dup(map_fd)  # its own: polled until this reader is closed
        try:
            self.consumer = mmap.mmap(self.fd, page, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            try:
                self.producer = mmap.mmap(self.fd, page + 2 * size, mmap.MAP_SHARED,
                                          mmap.PROT_READ, offset=page)
            except BaseException:
                self.consumer.close()
                raise
        except BaseException:
            os.close(self.fd)
            raise
        self.position = self._consumer_position()  # where the last reader left off
        end = self._producer_position()
        if not self._readable_up_to(end):
            self.position = end

    def _readable_up_to(self, end: int) -> bool:
        """Whether the position is one a reader can go on from to the producer's `end`:
        8-aligned, not past it, and less than the whole buffer behind it."""
        return self.position % 8 == 0 and self.position <= end and end - self.position <= self.size

    def _consumer_position(self) -> int:
        return struct.unpack_from("=Q", self.consumer, 0)[0]

    def _producer_position(self) -> int:
        return struct.unpack_from("=Q", self.producer, 0)[0]

    def read(self, most: int = 4096) -> Read:
        """The committed records of `record_size` not read yet, in order (at most `most`),
        consumed. Anything else where a record should be (a length of another size, a
        position not 8-aligned, a producer behind the reader) ends the read at the
        producer's position."""
        end = self._producer_position()
        moved = self._consumer_position() != self.position
        was_full = end - self.position > self.size - 2 * (self.HEADER + self.record_size)
        found: List[bytes] = []
        while self.position < end and len(found) < most:
            at = self.page + (self.position & (self.size - 1))
            length = struct.unpack_from("=I", self.producer, at)[0]
            if length & self.BUSY:
                break
            size = length & ~(self.BUSY | self.DISCARD)
            if size != self.record_size or self.position % 8:
                self.position = end
                moved = True
                break
            if not length & self.DISCARD:
                found.append(self.producer[at + self.HEADER:at + self.HEADER + size])
            self.position += (size + self.HEADER + 7) & ~7
        if not self._readable_up_to(end):
            self.position, moved = end, True
        struct.pack_into("=Q", self.consumer, 0, self.position)
        return Read(found, was_full, moved)

    def close(self) -> None:
        self.consumer.close()
        self.producer.close()
        os.close(self.fd)


@dataclasses.dataclass(frozen=True)
class MapInfo:
    """What the kernel says of a map: its type, id and how many entries (a ring buffer's
    size in bytes)."""

    type: int
    id: int
    max_entries: int


def map_info(map_fd: int) -> MapInfo:
    # type, id, key_size, value_size, max_entries: the start of struct bpf_map_info
    info = ctypes.create_string_buffer(20)
    call(OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", map_fd, len(info), _address(info)))
    kind, ident, _key, _value, most = struct.unpack_from("=IIIII", info.raw, 0)
    return MapInfo(kind, ident, most)


def map_update(map_fd: int, key: bytes, value: bytes) -> None:
    key_buffer = ctypes.create_string_buffer(key, len(key))
    value_buffer = ctypes.create_string_buffer(value, len(value))
    call(MAP_UPDATE_ELEM, struct.pack("=IIQQQ", map_fd, 0, _address(key_buffer),
                                      _address(value_buffer), 0))


def map_delete(map_fd: int, key: bytes) -> None:
    key_buffer = ctypes.create_string_buffer(key, len(key))
    call(MAP_DELETE_ELEM, struct.pack("=IIQ", map_fd, 0, _address(key_buffer)))


def map_keys(map_fd: int, key_size: int) -> Iterator[bytes]:
    """Every key of a hash map (the first one asked for with no key)."""
    current: Optional[ctypes.Array] = None  # type: ignore[type-arg]
    following = ctypes.create_string_buffer(key_size)
    while True:
        try:
            call(MAP_GET_NEXT_KEY, struct.pack("=IIQQ", map_fd, 0,
                                               0 if current is None else _address(current),
                                               _address(following)))
        except BpfError as error:
            if error.errno == 2:  # ENOENT: no key after the last
                return
            raise
        yield following.raw
        current = ctypes.create_string_buffer(following.raw, key_size)


def load_program(prog_type: int, instructions: bytes, name: str, license_: str = "GPL") -> int:
    """Load a program; the verifier's log in the error when it refuses it."""
    insns = ctypes.create_string_buffer(instructions, len(instructions))
    license_buffer = ctypes.create_string_buffer(license_.encode())
    log = ctypes.create_string_buffer(LOG_SIZE)
    attr = struct.pack("=IIQQIIQII16s", prog_type, len(instructions) // 8, _address(insns),
                       _address(license_buffer), 1, LOG_SIZE, _address(log), 0, 0,
                       name.encode()[:OBJ_NAME_LEN - 1])
    try:
        return call(PROG_LOAD, attr)
    except BpfError as error:
        said = log.value.decode(errors="replace").strip()
        raise BpfError(error.errno, f"{error.strerror}: {said[-500:]}" if said else error.strerror) from None


def pin(fd: int, path: str) -> None:
    path_buffer = ctypes.create_string_buffer(path.encode())
    call(OBJ_PIN, struct.pack("=QI", _address(path_buffer), fd))


def pinned(path: str) -> int:
    """An fd of the object pinned at `path` (FileNotFoundError where none is)."""
    path_buffer = ctypes.create_string_buffer(path.encode())
    try:
        return call(OBJ_GET, struct.pack("=QII", _address(path_buffer), 0, 0))
    except BpfError as error:
        if error.errno == 2:
            raise FileNotFoundError(2, f"nothing pinned at {path}") from None
        raise


def attach(cgroup_fd: int, prog_fd: int, replace_fd: Optional[int] = None) -> None:
    flags = F_ALLOW_MULTI | (F_REPLACE if replace_fd is not None else 0)
    call(PROG_ATTACH, struct.pack("=IIIII", cgroup_fd, prog_fd, CGROUP_DEVICE, flags,
                                  replace_fd or 0))


def detach(cgroup_fd: int, prog_fd: int) -> None:
    call(PROG_DETACH, struct.pack("=IIII", cgroup_fd, prog_fd, CGROUP_DEVICE, 0))


def attached_ids(cgroup_fd: int, most: int = 64) -> List[int]:
    """The ids of the device programs attached to this cgroup itself (not its ancestors')."""
    ids = (ctypes.c_uint32 * most)()
    attr = ctypes.create_string_buffer(
        struct.pack("=IIIIQI", cgroup_fd, CGROUP_DEVICE, 0, 0, ctypes.addressof(ids), most)
        .ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    result = _libc.syscall(ctypes.c_long(_syscall_number()), ctypes.c_int(PROG_QUERY), attr,
                           ctypes.c_uint(_ATTR_SIZE))
    if result < 0:
        errno = ctypes.get_errno()
        raise BpfError(errno, os.strerror(errno))
    count = struct.unpack_from("=I", attr.raw, 24)[0]  # prog_cnt, written back
    return list(ids[:count])


def program_info(prog_fd: int) -> ProgramInfo:
    map_ids = (ctypes.c_uint32 * 8)()
    info = ctypes.create_string_buffer(
        _PROG_INFO.pack(0, 0, b"", 0, 0, 0, 0, 0, 0, len(map_ids), ctypes.addressof(map_ids), b""))
    call(OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", prog_fd, len(info), _address(info)))
    fields = _PROG_INFO.unpack(info.raw[:_PROG_INFO.size])
    count = min(fields[9], len(map_ids))
    return ProgramInfo(prog_id=fields[1], name=fields[11].rstrip(b"\0").decode(errors="replace"),
                       tag=fields[2], map_ids=list(map_ids[:count]))


def program_by_id(prog_id: int) -> int:
    """An fd of a loaded program (CAP_SYS_ADMIN: purge and status, never the watchdog)."""
    return call(PROG_GET_FD_BY_ID, struct.pack("=III", prog_id, 0, 0))


def map_id(map_fd: int) -> int:
    """A map's id, as a program's info lists the maps it reads."""
    return map_info(map_fd).id
