"""The watchdog's role passed to a new process without a moment unwatched.

An upgrade installs new code under a running watchdog. Re-executing in place would leave the
node without watches while a new Python starts and imports (2.3 s measured in a TCG guest).
Instead the running watchdog starts its successor and keeps watching until the successor
reports that its watches are armed and its first reconcile is done; only then does it name
the successor the unit's main process (sd_notify MAINPID=, which NotifyAccess=main accepts
from the current main process alone) and exit. A successor that fails to start, or never
reports, changes nothing: the old process keeps the role and says why.

The report travels over a pipe whose write end the successor inherits (its number in
HANDOVER_FD_VARIABLE), not over NOTIFY_SOCKET: systemd would refuse it from a process that is
not yet the main one.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from typing import List

from statemesh import sdnotify

HANDOVER_FD_VARIABLE = "STATEMESH_HANDOVER_FD"


class HandOverError(RuntimeError):
    """The successor did not take over; the running process keeps the role."""


def report_ready() -> None:
    """Tell whoever waits that this process is watching: the predecessor if it started us,
    else systemd (Type=notify), so that a finished start job means the node is guarded."""
    inherited = os.environ.pop(HANDOVER_FD_VARIABLE, None)
    if inherited is None:
        sdnotify.ready()
        return
    fd = int(inherited)
    try:
        os.write(fd, sdnotify.READY)
    finally:
        os.close(fd)


async def hand_over(argv: List[str], timeout: float) -> int:
    """Start `argv` as the successor, wait for its report, make it the unit's main process.

    Returns the successor's pid; the caller then exits. Raises HandOverError, with the
    successor gone, when it exits or stays silent for `timeout` seconds.
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        successor = subprocess.Popen(argv, pass_fds=(write_fd,), stdin=subprocess.DEVNULL,
                                     env={**os.environ, HANDOVER_FD_VARIABLE: str(write_fd)})
    except OSError as error:
        os.close(read_fd)
        raise HandOverError(f"cannot start {argv[0]}: {error}") from error
    finally:
        os.close(write_fd)
    try:
        report = await asyncio.wait_for(_read_report(read_fd), timeout)
    except asyncio.TimeoutError:
        _end(successor)
        raise HandOverError(f"successor {successor.pid} not ready within {timeout:.0f} s") from None
    finally:
        os.close(read_fd)
    if report != sdnotify.READY:
        raise HandOverError(f"successor {successor.pid} ended (status {_end(successor)}) "
                            "before it was ready")
    sdnotify.notify(f"MAINPID={successor.pid}".encode())
    return successor.pid


def _end(successor: "subprocess.Popen[bytes]") -> int:
    """Make sure a successor that did not take over is gone; its exit status."""
    successor.kill()  # a no-op for one that has exited already
    return successor.wait()


async def _read_report(fd: int) -> bytes:
    """The successor's report, or b"" once it closed the pipe without one (it exited)."""
    loop = asyncio.get_running_loop()
    readable: "asyncio.Future[None]" = loop.create_future()

    def on_readable() -> None:
        if not readable.done():  # the loop may poll the fd again before we remove it
            readable.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await readable
    finally:
        loop.remove_reader(fd)
    return os.read(fd, len(sdnotify.READY))
