"""The node's state, measured as root for the unprivileged aTLS endpoint.

The endpoint faces the network, so it runs as its own user without capabilities; status
reads what only root may (every process's terminals and cgroups, the firewall's tables, the
installation's journal). The state service (statemesh-state.service) is root and reachable
only through a unix socket, which systemd listens on (statemesh-state.socket) and hands it
at the endpoint's first request: a boot, and an installation, spend nothing on it (under
emulation its start took 6-7 s of each). For each request it runs `statemesh-node status
--json` and sends the report back, one at a time (the endpoint asks at most every
nodestate.REFRESH_SECONDS); while a reboot is required, that report says so, and the
endpoint answers "not ready". It answers the endpoint alone, twice over: the socket is
root:statemesh-atls 0660, so no other local user can connect; and a peer whose process is
not in statemesh-atls.service's cgroup, where no local user but root can place a process,
gets nothing (swtpm, which runs as the same user, among them). The endpoint in turn believes
only systemd's listener (PID 1's, in directories only root may write): a socket planted in
the service's place, even by a daemon of root's, gives it nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Callable, Mapping, NoReturn, Tuple

from statemesh import proc
from statemesh.attest import nodestate

log = logging.getLogger(__name__)

SOCKET = Path("/run/statemesh-node/state/state.sock")
ENDPOINT_UNIT = "statemesh-atls.service"
# status takes seconds (nodestate.STATUS_TIMEOUT at most); the endpoint waits a little longer.
ASK_TIMEOUT = nodestate.STATUS_TIMEOUT + 10.0
LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
SYSTEMD_LISTENER = (1, 0)  # pid, uid: statemesh-state.socket is bound by PID 1
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


class NotActivated(RuntimeError):
    """The service was started without the socket systemd listens on for it."""


def activated(environ: Mapping[str, str] = os.environ) -> socket.socket:
    """The listening socket statemesh-state.socket passed (sd_listen_fds(3)'s protocol: fd 3,
    announced by LISTEN_PID and LISTEN_FDS). Bound by systemd, so the endpoint, which
    believes only a listener that is PID 1, believes it; made root's and the endpoint
    group's 0660 by the socket unit. The variables are dropped: status, run for each
    request, is not systemd's to be passed sockets."""
    if environ.get("LISTEN_PID") != str(os.getpid()) or environ.get("LISTEN_FDS") != "1":
        raise NotActivated("no socket was passed: statemesh-state.socket starts this service "
                           "(systemctl start statemesh-state.socket)")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    listener = socket.socket(fileno=LISTEN_FDS_START)
    listener.set_inheritable(False)
    if listener.family != socket.AF_UNIX or listener.type != socket.SOCK_STREAM:
        raise NotActivated(f"the socket passed is not a unix stream socket ({listener})")
    return listener


def serve(listener: socket.socket, report: Callable[[], bytes] = nodestate.status_report,
          unit_of: Callable[[int], str] = proc.unit_of) -> NoReturn:
    """Answer each request with a fresh report, one at a time, until stopped."""
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


def root_only_directories(path: Path) -> None:
    """Raise OSError unless the socket's directory and its parent are directories only root
    may write to (tmpfiles.d makes them so; an operator may have prepared them otherwise, and
    a systemd-tmpfiles that could not fix them says nothing)."""
    for directory in (path.parent, path.parent.parent):
        found = os.lstat(directory)
        if not stat.S_ISDIR(found.st_mode) or found.st_uid != 0 or found.st_mode & 0o022:
            raise OSError(f"{directory} is not a directory only root may write to "
                          f"(mode {stat.filemode(found.st_mode)}, uid {found.st_uid})")


def ask(path: Path = SOCKET, timeout: float = ASK_TIMEOUT,
        listener: Tuple[int, int] = SYSTEMD_LISTENER) -> bytes:
    """status's report, from the state service (the endpoint's side). Believed only from
    the socket systemd listens on (`listener`: the pid and uid that called listen(), PID 1
    and root): a daemon of root's that binds the path itself (a proxy, say, to a report a
    tenant writes) is root but not systemd."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as channel:
        channel.settimeout(timeout)
        try:
            root_only_directories(path)
            channel.connect(str(path))
            pid, uid, _gid = peer_credentials(channel)
            if (pid, uid) != listener:  # a listener planted in the service's place
                raise OSError(f"its listener is pid {pid} (uid {uid}), not systemd's socket")
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
