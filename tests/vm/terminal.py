"""The operator's terminal on a guest, as operators install: an SSH login with a key (`ssh -tt
root@node`), optionally inside tmux or screen so that a dropped connection does not end
apt; or a
login at the machine's serial console.

The ssh client runs in the guest itself (to its own sshd), detached from the test agent in a
session of its own, as the operator's machine would be; its input is held open. It stays in
the agent's cgroup: a unit of its own, started by hand, is what preflight refuses as left
running (statemesh.leftrunning), and the operator's machine is not the node. What the
command prints goes to OUTPUT, its exit status to STATUS (when its shell lives to write it).
"""

from __future__ import annotations

import dataclasses
import socket
import time

from harness.vm import driver
from harness.vm.driver import Guest

SSH = ("ssh -tt -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
       "root@localhost")
OUTPUT = "/root/operator.log"
STATUS = "/root/operator.rc"


def authorize_a_key(guest: Guest) -> None:
    """A key for root's SSH login."""
    guest.run("install -d -m 700 /root/.ssh && ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id "
              "&& cat /root/.ssh/id.pub >> /root/.ssh/authorized_keys")


def _then_wait(command: str) -> str:
    return f"{command} > {OUTPUT} 2>&1; echo $? > {STATUS}; exec sleep 100000"


def _connect(guest: Guest, remote: str) -> None:
    ssh = f"sleep 100000 | {SSH} -i /root/.ssh/id {driver.quote(remote)}"
    guest.run(f"setsid -f sh -c {driver.quote(ssh)} < /dev/null > /dev/null 2>&1")


def run_over_ssh(guest: Guest, command: str, shell: str = "bash") -> None:
    """`command` from `shell` (its argv[0]: a shell may be renamed) in an SSH login."""
    _connect(guest, f"exec -a {shell} bash -c {driver.quote(_then_wait(command))}")


@dataclasses.dataclass(frozen=True)
class Multiplexer:
    """A terminal multiplexer operators install in: its server keeps the session's windows
    when the connection is lost. Each command runs a shell command ({}) in a session named
    `install`."""

    name: str
    start: str  # in the foreground of the connection's terminal
    new_window: str  # from anywhere on the machine
    processes: str  # pgrep's arguments matching its client and server


TMUX = Multiplexer("tmux", "tmux new-session -s install {}",
                   "tmux new-window -d -t install {}", "-f ^tmux")
# The server renames itself SCREEN.
SCREEN = Multiplexer("screen", "screen -S install sh -c {}",
                     "screen -S install -X screen sh -c {}", "-if ^screen")


def run_in_multiplexer_over_ssh(guest: Guest, multiplexer: Multiplexer, command: str) -> None:
    """`command` in the first window of a multiplexer's session started in an SSH login."""
    start = multiplexer.start.format(driver.quote(_then_wait(command)))
    _connect(guest, f"TERM=xterm exec {start}")


def open_window(guest: Guest, multiplexer: Multiplexer, command: str) -> None:
    """`command` in a new window of the multiplexer's session."""
    guest.run(multiplexer.new_window.format(driver.quote(command)))


def drop_the_connection(guest: Guest) -> None:
    """The operator's connection is gone (a laptop closed, a network lost): the client dies."""
    # Everything of the session setsid made for it: the client and its input's sleep.
    guest.run("pkill -KILL -s $(ps -o sid= -p $(pgrep -o -x ssh))")


class NotSeen(AssertionError):
    """What the console was expected to print did not come in time."""


class Console:
    """The operator at the guest's serial console (ttyS1): types, and reads what the line
    prints back. Everything read is kept, for assertions and for a failure's message."""

    def __init__(self, guest: Guest):
        self.line = guest.serial_line()
        self.said = ""

    def type(self, text: str) -> None:
        self.line.sendall(text.encode())

    def expect(self, wanted: str, timeout: float) -> str:
        """Read until `wanted` appears after what earlier calls consumed; returns what came
        before it. Raises NotSeen with the tail read so far if it does not come in time, and
        AssertionError if the line closes."""
        deadline = time.monotonic() + timeout
        while wanted not in self.said:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NotSeen(f"{wanted!r} not seen within {timeout:.0f} s on the "
                              f"console; it said:\n{self.said[-3000:]}")
            self.line.settimeout(remaining)
            try:
                chunk = self.line.recv(4096)
            except socket.timeout:
                continue
            if not chunk:
                raise AssertionError(f"the console line closed; it said:\n{self.said[-3000:]}")
            self.said += chunk.decode(errors="replace")
        before, _, self.said = self.said.partition(wanted)
        return before

    def close(self) -> None:
        self.line.close()
