"""The operator's terminal on a guest, as operators install: an SSH login with a key (`ssh -tt
root@node`), optionally inside tmux so that a dropped connection does not end apt.

The ssh client runs in the guest itself (to its own sshd), detached from the test agent in a
session of its own, as the operator's machine would be; its input is held open. It stays in
the agent's cgroup: a unit of its own, started by hand, is what preflight refuses as left
running (statemesh.leftrunning), and the operator's machine is not the node. What the
command prints goes to OUTPUT, its exit status to STATUS (when its shell lives to write it).
"""

from __future__ import annotations

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


def run_in_tmux_over_ssh(guest: Guest, command: str) -> None:
    """`command` in the first window of a tmux session started in an SSH login (the tmux
    client in the foreground of the connection's terminal)."""
    _connect(guest, f"TERM=xterm exec tmux new-session -s install {driver.quote(_then_wait(command))}")


def drop_the_connection(guest: Guest) -> None:
    """The operator's connection is gone (a laptop closed, a network lost): the client dies."""
    # Everything of the session setsid made for it: the client and its input's sleep.
    guest.run("pkill -KILL -s $(ps -o sid= -p $(pgrep -o -x ssh))")
