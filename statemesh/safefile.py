"""Reading a file at a path the operator controls, without waiting on what is there.

The operator is root before installing and may leave a FIFO or a device where a check
reads a file: opening a FIFO waits for a writer for ever, a device may never end
(/dev/zero), and opening one may act (a watchdog device starts counting down). So
preflight, status or the installation would hang. Every such read goes through here: the
path is looked at first without opening it, only a regular file is opened (never waiting,
never taking a terminal), its type is checked again on the open descriptor (it may have
been swapped in between), and then it is read whole. Links are followed, as the programs
that read these files follow them. No newline translation: bytes as those programs read
them.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO, Callable, Tuple, Union

StrPath = Union[str, "os.PathLike[str]"]
FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# What a path names when it is no regular file, in words for a finding.
KINDS: Tuple[Tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"))


class NotRegularFile(OSError):
    """The path names a FIFO, a device, a socket or a directory: nothing was read from it.
    An OSError, so that a reader that counts an unreadable file as nothing still does; one
    that looks for planted things catches it and names it."""

    def __init__(self, path: StrPath, kind: str) -> None:
        super().__init__(f"{kind}, not a regular file")  # as strerror: the caller names the path
        self.path = os.fspath(path)
        self.kind = kind
        self.strerror = str(self)


def kind_of(mode: int) -> str:
    """The kind of file a st_mode names, in words ("a FIFO"), for one that is no regular
    file."""
    return next((word for test, word in KINDS if test(mode)), "no regular file")


def _refuse_unless_regular(path: StrPath, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise NotRegularFile(path, kind_of(mode))


def open_regular(path: StrPath) -> BinaryIO:
    """The regular file at `path`, open for reading in binary; raises NotRegularFile for
    anything else (before opening it, when it is so already), OSError as open() does."""
    _refuse_unless_regular(path, os.stat(path).st_mode)
    descriptor = os.open(path, FLAGS)
    try:
        _refuse_unless_regular(path, os.fstat(descriptor).st_mode)
    except OSError:
        os.close(descriptor)
        raise
    return os.fdopen(descriptor, "rb")


def read_bytes(path: StrPath) -> bytes:
    """A regular file's whole content (see open_regular)."""
    with open_regular(path) as handle:
        return handle.read()


def read_text(path: StrPath, errors: str = "strict") -> str:
    """A regular file's whole content as UTF-8 text; UnicodeDecodeError as Path.read_text
    raises it when `errors` is "strict"."""
    return read_bytes(path).decode("utf-8", errors)


def non_regular(path: StrPath) -> str:
    """What `path` itself is when it is neither a regular file nor a link ("a FIFO"), for a
    finding to say; "" otherwise, or when there is nothing there."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return ""
    return "" if stat.S_ISREG(mode) or stat.S_ISLNK(mode) else kind_of(mode)
