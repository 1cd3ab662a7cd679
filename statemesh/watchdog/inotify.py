"""inotify through libc, so that the watchdog needs no extra Debian package.

The watchdog reacts to a new /dev/pts/N or an opened /dev/ttyN the moment the kernel
reports it; polling (the seed's `watch -n1`) leaves up to a second of access.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import struct
from typing import List

IN_CLOSE_WRITE = 0x00000008
IN_OPEN = 0x00000020
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000  # the watch is gone: its file was deleted, or it was removed

_IN_CLOEXEC = os.O_CLOEXEC
_IN_NONBLOCK = os.O_NONBLOCK
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len: struct inotify_event

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


@dataclasses.dataclass(frozen=True)
class Event:
    """One inotify event: the watch it came from, what happened, and the entry's name."""

    wd: int
    mask: int
    name: str


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


class Inotify:
    """A non-blocking inotify instance; its fd goes into the caller's event loop."""

    def __init__(self) -> None:
        self.fd = _check(_libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC), "inotify_init1")

    def fileno(self) -> int:
        return self.fd

    def add_watch(self, path: str, mask: int) -> int:
        """Watch `path`; returns the watch descriptor that events carry."""
        return _check(
            _libc.inotify_add_watch(self.fd, os.fsencode(path), mask),
            f"inotify_add_watch {path}",
        )

    def read(self) -> List[Event]:
        """Every event queued now; empty when there is none."""
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
        events = []
        offset = 0
        while offset < len(data):
            wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
            offset += _HEADER.size
            name = data[offset : offset + length].rstrip(b"\0")
            offset += length
            events.append(Event(wd, mask, os.fsdecode(name)))
        return events

    def close(self) -> None:
        os.close(self.fd)
