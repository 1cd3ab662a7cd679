"""The state service: status's report for the unprivileged endpoint, and for nobody else.

A real unix socket in a directory every user may enter; the peers are this test (root) and
a client run as `nobody` (setpriv), the way a tenant's workload would ask. Which unit a peer
runs in is a stand-in (this host's units are not the node's)."""

from __future__ import annotations

import grp
import os
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

from statemesh.attest import nodestate, stateservice

# What a local user's process would send: connect, read to the end, print what came (or the
# error). Plain sockets, run on the system's Python: `nobody` may not enter a test's venv.
ASK_AS_NOBODY = """
import socket, sys
with socket.socket(socket.AF_UNIX) as channel:
    channel.settimeout(10)
    channel.connect(sys.argv[1])
    print(channel.makefile("rb").read().decode() or "nothing")
"""


@pytest.fixture
def socket_path() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="smstate"))
    directory.chmod(0o755)
    yield directory / "state" / "state.sock"
    subprocess.run(["rm", "-rf", str(directory)], check=True)


def serving(path: Path, report: Callable[[], bytes], unit_of: Callable[[int], str]) -> List[int]:
    """The service on `path` in a thread; returns the pids it was asked by (as it saw them)."""
    asked: List[int] = []

    def seen(pid: int) -> str:
        asked.append(pid)
        return unit_of(pid)

    listener = stateservice.listen(path, group=None)
    threading.Thread(target=stateservice.serve, args=(listener, report, seen), daemon=True).start()
    return asked


def ask_as_nobody(path: Path) -> str:
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3",
         "-c", ASK_AS_NOBODY, str(path)], capture_output=True, text=True, check=True,
        timeout=30, env={"PATH": "/usr/bin:/bin"}).stdout.strip()


def test_the_endpoint_is_answered_and_another_local_user_is_not(socket_path: Path) -> None:
    """Even a peer that may connect (a socket open to all here; the node's is root's and the
    endpoint group's) is answered only if it is root or a process of the endpoint's unit."""
    asked = serving(socket_path, lambda: b'{"report": 1}', lambda pid: "user@1000.service")
    assert oct(socket_path.stat().st_mode & 0o777) == "0o666"
    assert stateservice.ask(socket_path, 10) == b'{"report": 1}'  # root: uid 0
    assert asked == []  # root is answered without asking which unit it runs in
    assert ask_as_nobody(socket_path) == "nothing"
    assert len(asked) == 1 and asked[0] != os.getpid()  # the client's own pid, refused

    endpoint = socket_path.parent.parent / "endpoint" / "state.sock"
    serving(endpoint, lambda: b'{"report": 2}', lambda pid: stateservice.ENDPOINT_UNIT)
    assert ask_as_nobody(endpoint) == '{"report": 2}'


def test_a_failing_or_absent_service_is_a_failing_check_never_a_ready_state(
        socket_path: Path) -> None:
    def hangs() -> bytes:
        raise nodestate.Unanswered("status did not answer within 120 s")

    serving(socket_path, hangs, lambda pid: stateservice.ENDPOINT_UNIT)
    state = nodestate.measure(["x.service"], lambda: stateservice.ask(socket_path, 10))
    assert not state.ready and [c.detail for c in state.checks] == [
        "the state service sent no report (see its journal)"]
    absent = socket_path.parent / "absent.sock"
    state = nodestate.measure([], lambda: stateservice.ask(absent, 10))
    assert not state.ready and state.checks[0].detail.startswith(
        f"status could not be read: the state service at {absent} cannot be asked")


def test_a_stale_socket_is_replaced_and_anything_else_there_is_left(socket_path: Path) -> None:
    serving(socket_path, lambda: b"{}", lambda pid: "")
    serving(socket_path, lambda: b'{"second": 1}', lambda pid: "")  # a restarted service
    assert stateservice.ask(socket_path, 10) == b'{"second": 1}'
    planted = socket_path.parent / "planted"
    planted.write_text("root's")
    with pytest.raises(OSError):
        stateservice.listen(planted, group=None)
    assert planted.read_text() == "root's"


def test_the_nodes_socket_is_root_s_and_the_endpoint_group_s(socket_path: Path) -> None:
    listener = stateservice.listen(socket_path, group="nogroup")
    listener.close()
    mode = socket_path.stat()
    assert (oct(mode.st_mode & 0o777), mode.st_uid, mode.st_gid) == (
        "0o660", 0, grp.getgrnam("nogroup").gr_gid)
    with pytest.raises(KeyError):
        stateservice.listen(socket_path, group="no-such-group-here")


# A listener of nobody's in the state service's place (root prepared its directory before
# installing), with a report that says every guarantee holds.
PLANTED_LISTENER = """
import socket, sys
with socket.socket(socket.AF_UNIX) as listener:
    listener.bind(sys.argv[1])
    listener.listen(1)
    print("listening", flush=True)
    connection, _ = listener.accept()
    connection.sendall(b'{"all": "holds"}')
    connection.close()
"""


def test_a_listener_that_is_not_root_s_is_never_believed(socket_path: Path) -> None:
    socket_path.parent.mkdir(mode=0o777)
    socket_path.parent.chmod(0o777)
    planted = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3",
         "-c", PLANTED_LISTENER, str(socket_path)], stdout=subprocess.PIPE, text=True,
        env={"PATH": "/usr/bin:/bin"})
    try:
        assert planted.stdout is not None and planted.stdout.readline() == "listening\n"
        state = nodestate.measure([], lambda: stateservice.ask(socket_path, 10))
        assert not state.ready and "its listener runs as uid 65534, not root" in \
            state.checks[0].detail, state.checks
    finally:
        planted.kill()
        planted.wait()
