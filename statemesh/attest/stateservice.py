"""The node's state, measured as root for the unprivileged aTLS endpoint.

The endpoint faces the network, so it runs as its own user without capabilities; status
reads what only root may (every process's terminals and cgroups, the firewall's tables, the
installation's journal). The state service (statemesh-state.service) is root and reachable
only through a unix socket: for each request it runs `statemesh-node status --json` and
sends the report back, one at a time (the endpoint asks at most every
nodestate.REFRESH_SECONDS). It answers the endpoint alone, twice over: the socket is
root:statemesh-atls 0660, so no other local user can connect; and a peer whose process is
not in statemesh-atls.service's cgroup, where no local user but root can place a process,
gets nothing (swtpm, which runs as the same user, among them). The endpoint in turn believes
only a listener run by root: a socket planted in the service's place gives it nothing.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Callable, NoReturn, Optional, Tuple

from statemesh import proc, sdnotify
from statemesh.attest import nodestate

log = logging.getLogger(__name__)

SOCKET = Path("/run/statemesh-node/state/state.sock")
ENDPOINT_UNIT = "statemesh-atls.service"
ENDPOINT_GROUP = "statemesh-atls"  # debian/statemesh-node.sysusers
# status takes seconds (nodestate.STATUS_TIMEOUT at most); the endpoint waits a little longer.
ASK_TIMEOUT = nodestate.STATUS_TIMEOUT + 10.0
BACKLOG = 8
PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(connection: socket.socket) -> Tuple[int, int, int]:
    """pid, uid and gid of the other end (SO_PEERCRED: the kernel's record of who connected,
    or who listened)."""
    return PEER_CREDENTIALS.unpack(
        connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEER_CREDENTIALS.size))


def may_ask(connection: socket.socket, unit_of: Callable[[int], str] = proc.unit_of) -> bool:
    """Whether the peer is root or a process of the endpoint's unit."""
    pid, uid, _gid = peer_credentials(connection)
    if uid == 0 or unit_of(pid) == ENDPOINT_UNIT:
        return True
    log.warning("refused the node's state to pid %d (uid %d): not the aTLS endpoint", pid, uid)
    return False


def listen(path: Path = SOCKET, group: Optional[str] = ENDPOINT_GROUP) -> socket.socket:
    """The service's socket: root's and `group`'s (None: every local user's, for tests;
    may_ask decides who is answered). KeyError when the group does not exist."""
    gid = grp.getgrnam(group).gr_gid if group is not None else -1
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)  # the unit's RuntimeDirectory
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()  # an earlier run's; anything else there makes bind fail
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    previous = os.umask(0o111 if group is None else 0o117)  # made 0666 or 0660 by bind
    try:
        listener.bind(str(path))
    finally:
        os.umask(previous)
    os.chown(path, -1, gid, follow_symlinks=False)
    listener.listen(BACKLOG)
    return listener


def serve(listener: socket.socket, report: Callable[[], bytes] = nodestate.status_report,
          unit_of: Callable[[int], str] = proc.unit_of) -> NoReturn:
    """Answer each request with a fresh report, one at a time, until stopped."""
    sdnotify.ready()
    while True:
        connection, _ = listener.accept()
        with connection:
            if may_ask(connection, unit_of):
                answer(connection, report)


def answer(connection: socket.socket, report: Callable[[], bytes]) -> None:
    try:
        made = report()
    except (nodestate.Unanswered, OSError) as error:
        log.warning("no report: %s", error)  # the endpoint sees nothing and says so itself
        return
    try:
        connection.sendall(made)
    except OSError as error:
        log.info("the endpoint left before its report was sent: %s", error)


def ask(path: Path = SOCKET, timeout: float = ASK_TIMEOUT) -> bytes:
    """status's report, from the state service (the endpoint's side)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as channel:
        channel.settimeout(timeout)
        try:
            channel.connect(str(path))
            _pid, uid, _gid = peer_credentials(channel)
            if uid != 0:  # a listener planted in the service's place
                raise OSError(f"its listener runs as uid {uid}, not root")
            chunks, size = [], 0
            while size <= nodestate.MAX_REPORT_BYTES:
                chunk = channel.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except socket.timeout:
            raise nodestate.Unanswered(
                f"the state service did not answer within {timeout:.0f} s") from None
        except OSError as error:
            raise OSError(f"the state service at {path} cannot be asked: {error}") from None
    if not chunks:
        raise nodestate.Unanswered("the state service sent no report (see its journal)")
    return b"".join(chunks)
