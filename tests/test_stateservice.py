"""The state service: status's report for the unprivileged endpoint, and for nobody else.

A real unix socket in a directory every user may enter; the peers are this test (root) and
a client run as `nobody` (setpriv), the way a tenant's workload would ask. Which unit a peer
runs in is a stand-in (this host's units are not the node's). On a node, systemd binds the
socket (statemesh-state.socket) and passes it: systemd-socket-activate does the same here."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import pytest

from statemesh.attest import nodestate, stateservice

ROOT = Path(__file__).resolve().parent.parent

# What a local user's process would send: connect, read to the end, print what came (or the
# error). Plain sockets, run on the system's Python: `nobody` may not enter a test's venv.
ASK_AS_NOBODY = """
import socket, sys
with socket.socket(socket.AF_UNIX) as channel:
    channel.settimeout(10)
    channel.connect(sys.argv[1])
    print(channel.makefile("rb").read().decode() or "nothing")
"""


# The listener the tests' client believes: this test's process, standing in for systemd
# (the node's client believes PID 1 alone, as the last test shows).
THIS_TEST = (os.getpid(), 0)


@pytest.fixture
def socket_path() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="smstate"))
    directory.chmod(0o755)
    yield directory / "state" / "state.sock"
    subprocess.run(["rm", "-rf", str(directory)], check=True)


def listen(path: Path) -> socket.socket:
    """A listener every local user may connect to (the node's socket is systemd's, 0660):
    may_ask alone decides who is answered."""
    path.parent.mkdir(mode=0o755, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    path.chmod(0o666)
    listener.listen(8)
    return listener


def serving(path: Path, report: Callable[[], bytes], unit_of: Callable[[int], str]) -> List[int]:
    """The service on `path` in a thread; returns the pids it was asked by (as it saw them)."""
    asked: List[int] = []

    def seen(pid: int) -> str:
        asked.append(pid)
        return unit_of(pid)

    listener = listen(path)
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
    assert stateservice.ask(socket_path, 10, THIS_TEST) == b'{"report": 1}'  # root: uid 0
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
    state = nodestate.measure(["x.service"],
                              lambda: stateservice.ask(socket_path, 10, THIS_TEST))
    assert not state.ready and [c.detail for c in state.checks] == [
        "the state service sent no report (see its journal)"]
    absent = socket_path.parent / "absent.sock"
    state = nodestate.measure([], lambda: stateservice.ask(absent, 10, THIS_TEST))
    assert not state.ready and state.checks[0].detail.startswith(
        f"status could not be read: the state service at {absent} cannot be asked")


# Run by systemd-socket-activate as systemd runs the service: the socket it was passed, and
# the variables that announced it gone (status, run for each request, must not see them).
ACTIVATED = """
import os, socket
from statemesh.attest import stateservice
listener = stateservice.activated()
print(listener.getsockname(), listener.get_inheritable(),
      sorted(name for name in os.environ if name.startswith("LISTEN_")))
"""


def test_the_service_takes_the_socket_systemd_passed_and_only_that(socket_path: Path) -> None:
    socket_path.parent.mkdir(mode=0o755)
    activator = subprocess.Popen(
        ["systemd-socket-activate", "--listen", str(socket_path), sys.executable, "-c",
         ACTIVATED], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    with socket.socket(socket.AF_UNIX) as first_request:  # what makes it start the service
        for _ in range(300):
            if socket_path.exists():
                break
            threading.Event().wait(0.1)
        first_request.connect(str(socket_path))
        said, complained = activator.communicate(timeout=60)
    assert said.split() == [str(socket_path), "False", "[]"], said + complained
    for environ in ({}, {"LISTEN_PID": "1", "LISTEN_FDS": "1"},
                    {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"}):
        with pytest.raises(stateservice.NotActivated, match="statemesh-state.socket"):
            stateservice.activated(environ)


def unit_settings(path: Path) -> Dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines()
                if "=" in line and not line.startswith("#"))


def test_the_socket_is_root_s_and_the_endpoint_group_s_in_root_s_directory() -> None:
    """systemd binds the socket as the unit says (SO_PEERCRED then names root to the
    endpoint), in directories tmpfiles.d makes root's 0755 whatever was there."""
    socket_unit = unit_settings(ROOT / "systemd" / "statemesh-state.socket")
    user = (ROOT / "debian" / "statemesh-node.sysusers").read_text().split("\nu ")[1].split()[0]
    assert (socket_unit["ListenStream"], socket_unit["SocketUser"], socket_unit["SocketGroup"],
            socket_unit["SocketMode"]) == (str(stateservice.SOCKET), "root", user, "0660")
    tmpfiles = [line.split() for line in
                (ROOT / "debian" / "statemesh-node.tmpfiles").read_text().splitlines()
                if line and not line.startswith("#")]
    assert tmpfiles == [["d", str(directory), "0755", "root", "root", "-"]
                        for directory in (stateservice.SOCKET.parent.parent,
                                          stateservice.SOCKET.parent)]
    service = unit_settings(ROOT / "systemd" / "statemesh-state.service")
    assert (service["Requires"], service["PartOf"]) == ("statemesh-state.socket",) * 2
    assert "RuntimeDirectory" not in service  # it would remove the socket with the service
    endpoint = unit_settings(ROOT / "systemd" / "statemesh-atls.service")
    assert endpoint["Requires"] == "statemesh-state.socket"  # the service starts on request


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


def test_a_listener_that_is_not_systemd_s_is_never_believed(socket_path: Path) -> None:
    """Root's own listener (this test's, as a daemon of root's binding the path would be)
    is not PID 1's; a directory others may write to is refused before connecting."""
    serving(socket_path, lambda: b'{"all": "holds"}', lambda pid: stateservice.ENDPOINT_UNIT)
    state = nodestate.measure([], lambda: stateservice.ask(socket_path, 10))
    assert not state.ready and f"its listener is pid {os.getpid()} (uid 0), not systemd's " \
        "socket" in state.checks[0].detail, state.checks

    planted_path = socket_path.parent.parent / "prepared" / "state.sock"
    planted_path.parent.mkdir(mode=0o777)
    planted_path.parent.chmod(0o777)
    planted = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3",
         "-c", PLANTED_LISTENER, str(planted_path)], stdout=subprocess.PIPE, text=True,
        env={"PATH": "/usr/bin:/bin"})
    try:
        assert planted.stdout is not None and planted.stdout.readline() == "listening\n"
        state = nodestate.measure([], lambda: stateservice.ask(planted_path, 10, THIS_TEST))
        assert not state.ready and f"{planted_path.parent} is not a directory only root may " \
            "write to (mode drwxrwxrwx, uid 0)" in state.checks[0].detail, state.checks
    finally:
        planted.kill()
        planted.wait()
