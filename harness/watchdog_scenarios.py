"""Scenarios of tests/test_watchdog.py, run by harness.private_devpts inside a private devpts.

Each function starts the real watchdog (`statemesh-node watchdog` pointed at the private
devpts, an empty terminal-device directory and no logind) and processes of its own, and
returns what happened to them as JSON for the test to judge.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import io
import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from statemesh import grace, proc
from statemesh.watchdog import daemon as watchdog_module
from statemesh.watchdog import inotify
from statemesh.watchdog.daemon import Settings, Watchdog

WAIT_SECONDS = 30.0


@contextlib.contextmanager
def watchdog(devpts: str, exempt_units: str = "", ptmx: bool = False) -> Iterator[Dict[str, Any]]:
    """The watchdog CLI as systemd would run it (Type=notify): yields once it reports ready.
    With `ptmx`, its terminal-device directory (a tmpfs of this namespace) has a ptmx node
    and an empty pts directory beside it, as /dev has."""
    work = Path(tempfile.mkdtemp(prefix="sm-watchdog-"))
    (work / "dev").mkdir()
    if ptmx:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "sm-dev", str(work / "dev")],
                       check=True)
        os.mknod(work / "dev" / "ptmx", 0o666 | stat.S_IFCHR, os.makedev(5, 2))
        (work / "dev" / "pts").mkdir()
    (work / "run").mkdir()
    conf = work / "node.conf"
    conf.write_text(f"Watchdog-Exempt-Units: {exempt_units}\n" if exempt_units else "")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(work / "notify"))
    log = open(work / "log", "w")
    process = subprocess.Popen(
        ["/usr/bin/python3", "-m", "statemesh.cli", "--config", str(conf), "watchdog",
         "--devpts", devpts, "--dev", str(work / "dev"),
         "--grace-file", str(work / "run" / "install-grace.json"), "--no-logind"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, "NOTIFY_SOCKET": str(work / "notify")},
    )
    ready, _, _ = select.select([notify], [], [], WAIT_SECONDS)
    if not ready or notify.recv(64) != b"READY=1":
        process.kill()
        raise RuntimeError(f"watchdog not ready: {(work / 'log').read_text()}")
    state: Dict[str, Any] = {"process": process, "grace": work / "run" / "install-grace.json",
                             "dev": work / "dev",
                             "log_path": work / "log", "conf": conf, "notify": notify,
                             "successors": []}
    try:
        yield state
    finally:
        state["alive_at_end"] = process.poll() is None
        process.kill()
        process.wait()
        for successor in state["successors"]:  # not our children: they outlived their parent
            with contextlib.suppress(ProcessLookupError):
                os.kill(successor, signal.SIGKILL)
        log.close()
        state["log"] = log_lines(state)


def log_lines(state: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The watchdog's JSON log lines so far."""
    return [json.loads(line) for line in state["log_path"].read_text().splitlines()
            if line.startswith("{")]


def wait_logged(state: Dict[str, Any], done: Callable[[List[Dict[str, Any]]], bool], what: str) -> None:
    """Wait until the watchdog's log satisfies `done`."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not done(log_lines(state)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not logged")
        time.sleep(0.02)


def logged_kills(state: Dict[str, Any], pids: List[int]) -> None:
    """Wait until the watchdog has logged the kill of each of `pids` (it logs after killing)."""
    wait_logged(state, lambda lines: set(pids) <= {line["pid"] for line in lines if line["event"] == "kill"},
                f"kills of {pids}")


def fork_child(child) -> int:
    """Run `child()` in a forked process that never returns into the scenario."""
    pid = os.fork()
    if pid == 0:
        try:
            child()
        finally:
            os._exit(0)
    return pid


def sleep_forever() -> None:
    while True:
        time.sleep(3600)


def gone_within(pid: int, timeout: float) -> bool:
    """Whether process `pid` (a child or not) exits within `timeout` seconds."""
    pidfd = os.pidfd_open(pid)
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def wait_death(pid: int, timeout: float = WAIT_SECONDS) -> Optional[int]:
    """The signal that ended child `pid`, 0 for a normal exit, None if still alive after timeout."""
    if not gone_within(pid, timeout):
        return None
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def kill_if_alive(pid: int, timeout: float) -> Optional[int]:
    """wait_death(), and a SIGKILL for a child that outlived it (a failed scenario)."""
    ended = wait_death(pid, timeout)
    if ended is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return ended


def alive(pid: int) -> bool:
    """Whether child `pid` is alive (not yet a zombie)."""
    return os.waitpid(pid, os.WNOHANG) == (0, 0)


def hold_pty() -> None:
    os.openpty()
    sleep_forever()


def _hold_pty_and_fork() -> None:
    """Open a pty, hand its slave to a grandchild in a new session (its controlling tty)."""
    master, slave = os.openpty()
    if os.fork() == 0:
        os.setsid()
        os.close(master)
        os.close(os.open(os.ttyname(slave), os.O_RDWR))  # acquires the controlling tty
        sleep_forever()
    sleep_forever()


def _ctty_only() -> None:
    """A session whose controlling tty is a pty it holds no fd on (TIOCGSID must find it)."""
    master, slave = os.openpty()
    read_end, write_end = os.pipe()
    if os.fork() == 0:
        os.setsid()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # survives the hangup of its master
        name = os.ttyname(slave)
        os.close(master)
        os.close(slave)
        os.close(os.open(name, os.O_RDWR))
        os.write(write_end, str(os.getpid()).encode())
        sleep_forever()
    os.close(slave)
    os.read(read_end, 32)
    sleep_forever()


def terminals_are_ended(devpts: str) -> Dict[str, Any]:
    """Pty holders die one after another, the pty goes; a plain process lives on."""
    plain = fork_child(sleep_forever)
    with watchdog(devpts) as state:
        holders = [fork_child(hold_pty) for _ in range(3)]
        signals = [wait_death(holder) for holder in holders]
        logged_kills(state, holders)
        orphans_left = _orphans_with_ptys(devpts)
        plain_alive = alive(plain)
    os.kill(plain, signal.SIGKILL)
    return {"signals": signals, "orphans_left": orphans_left, "plain_alive": plain_alive,
            "watchdog_alive": state["alive_at_end"], "log": state["log"], "holders": holders,
            "devpts": devpts}


def _orphans_with_ptys(devpts: str) -> List[str]:
    """The ptys still in existence after their holders were killed (a node lives as long as a master)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        left = [name for name in os.listdir(devpts) if name.isdigit()]
        if not left:
            return []
        time.sleep(0.05)
    return left


def existing_terminals_at_start(devpts: str) -> Dict[str, Any]:
    """Terminals opened before the watchdog starts, a controlling-tty-only session included."""
    holder = fork_child(hold_pty)
    ctty_parent = fork_child(_ctty_only)
    forking = fork_child(_hold_pty_and_fork)
    time.sleep(0.5)  # let all set up their terminals before the watchdog exists
    ctty_children = _session_members_of_children(ctty_parent)
    grandchildren = _session_members_of_children(forking)
    with watchdog(devpts) as state:
        holder_signal = wait_death(holder)
        parent_signal = wait_death(ctty_parent)
        forking_signal = wait_death(forking)
        children_left = [pid for pid in ctty_children + grandchildren if _exists(pid)]
        logged_kills(state, [holder, ctty_parent, forking, *ctty_children, *grandchildren])
    return {"holder": holder_signal, "ctty_parent": parent_signal, "forking": forking_signal,
            "ctty_children": ctty_children, "grandchildren": grandchildren,
            "children_left": children_left, "log": state["log"]}


def _children(pid: int) -> List[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(word) for word in handle.read().split()]


def _session_members_of_children(pid: int) -> List[int]:
    return [child for child in _children(pid) if os.getsid(child) == child]


def _exists(pid: int) -> bool:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                if handle.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    return False
        except FileNotFoundError:
            return False
        time.sleep(0.05)
    return True


def _hold_other_instance(other: str, ready_w: int) -> None:
    """Hold pty of the devpts instance mounted at `other`, opened through its own ptmx."""
    os.setsid()
    master = os.open(f"{other}/ptmx", os.O_RDWR | os.O_NOCTTY)
    fcntl.ioctl(master, 0x40045431, struct.pack("i", 0))  # TIOCSPTLCK: unlock
    index = struct.unpack("i", fcntl.ioctl(master, 0x80045430, b"\0" * 4))[0]  # TIOCGPTN
    slave = os.open(f"{other}/{index}", os.O_RDWR)  # no O_NOCTTY: its controlling tty
    os.write(ready_w, json.dumps([index, os.stat(f"{other}/{index}").st_rdev]).encode())
    del slave
    sleep_forever()


# A process of `unshare -m` that mounts a devpts instance of its own over /dev/pts and holds
# a pty of it, opened through that instance's ptmx: the container or sandbox way.
UNSHARED_HOLDER = """
import fcntl, os, struct, subprocess, sys, time
subprocess.run(["mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts",
                "/dev/pts"], check=True)
master = os.open("/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY)
fcntl.ioctl(master, 0x40045431, struct.pack("i", 0))
index = struct.unpack("i", fcntl.ioctl(master, 0x80045430, b"\\0" * 4))[0]
slave = os.open(f"/dev/pts/{index}", os.O_RDWR | os.O_NOCTTY)
print(os.stat("/dev/pts").st_dev, flush=True)
time.sleep(600)
"""


def every_devpts_instance_is_watched(devpts: str, host_devpts_dev: int) -> Dict[str, Any]:
    """Ptys of devpts instances other than the watched one: one mounted beside it before the
    watchdog started, with the same index as a pty of ours (so its device number too); one
    that `unshare -m` mounts after the watchdog started; one opened through a ptmx device
    node (as /dev/ptmx reaches the "pts" beside it) in an instance mounted after that: no
    event tells of either, the watchdog finds them. Each holder is ended."""
    other = tempfile.mkdtemp(prefix="sm-other-devpts-")
    subprocess.run(["mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts", other],
                   check=True)
    ready_r, ready_w = os.pipe()
    other_holder = fork_child(lambda: _hold_other_instance(other, ready_w))
    other_index, other_rdev = json.loads(os.read(ready_r, 64))
    with watchdog(devpts, ptmx=True) as state:
        ours = fork_child(hold_pty)
        ours_signal = wait_death(ours)
        other_signal = wait_death(other_holder)
        unshared = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                     "/usr/bin/python3", "-c", UNSHARED_HOLDER],
                                    stdout=subprocess.PIPE, text=True)
        unshared_instance = int(unshared.stdout.readline() or 0)
        unshared_signal = -unshared.wait(WAIT_SECONDS)
        late = state["dev"] / "pts"
        subprocess.run(["mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts",
                        str(late)], check=True)
        through_ptmx = fork_child(lambda: (os.open(state["dev"] / "ptmx", os.O_RDWR), sleep_forever()))
        ptmx_signal = wait_death(through_ptmx)
        logged_kills(state, [ours, other_holder, unshared.pid, through_ptmx])
    sources = {line["pid"]: line["source"] for line in state["log"] if line["event"] == "kill"}
    return {
        "namespace_devpts_dev": os.stat("/dev/pts").st_dev,
        "watched_devpts_dev": os.stat(devpts).st_dev,
        "host_devpts_dev": host_devpts_dev,
        "other_index": other_index, "other_rdev": other_rdev,
        "ours_signal": ours_signal, "other_signal": other_signal,
        "unshared_signal": unshared_signal, "unshared_instance": unshared_instance,
        "ptmx_signal": ptmx_signal, "ptmx_source": sources.get(through_ptmx),
        "devpts_logged": [line["instance"] for line in state["log"] if line["event"] == "devpts"],
        "log": state["log"],
    }


def _rewrite_grace(path: Path, installer: int) -> None:
    """What the spared root may write once the grace has ended: the same installer without
    a deadline, then pid 1 (every process descends from it)."""
    record = json.loads(path.read_text())
    for pid in (installer, 1):
        ticks = proc.start_ticks(pid)
        if ticks is None:
            continue
        record.update(pid=pid, start_ticks=ticks, ends_at=None)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(record))
        os.replace(temporary, path)
        time.sleep(0.2)


def installation_grace(devpts: str, ending: str = "exit") -> Dict[str, Any]:
    """The installing session keeps its terminal while the grace runs, not after; a process
    of another session that opens that spared terminal is ended at once. The grace ends as
    `ending` says: the package manager exits, is stopped (Ctrl-Z), or outlives the deadline
    the harden unit stamps once its transaction has ended."""
    to_scenario_r, to_scenario_w = os.pipe()
    go_r, go_w = os.pipe()

    def installing_session() -> None:
        os.setsid()
        manager = subprocess.Popen(["sleep", "300"])  # stands in for apt, in this session
        os.write(to_scenario_w, str(manager.pid).encode())
        os.read(go_r, 1)
        _master, slave = os.openpty()
        os.write(to_scenario_w, os.ttyname(slave).encode())
        sleep_forever()

    with watchdog(devpts) as state:
        session_leader = fork_child(installing_session)
        manager_pid = int(os.read(to_scenario_r, 32))
        grace.record_installer(manager_pid, state["grace"])
        wait_logged(state, lambda lines: any(line["event"] == "grace" for line in lines), "grace")
        os.write(go_w, b"g")
        spared_pty = os.read(to_scenario_r, 64).decode()
        outsider = fork_child(hold_pty)
        outsider_signal = wait_death(outsider)
        intruder = fork_child(lambda: (os.open(spared_pty, os.O_RDWR | os.O_NOCTTY), sleep_forever()))
        intruder_signal = wait_death(intruder)
        logged_kills(state, [intruder])
        spared_while_installing = alive(session_leader)
        ended_at = time.monotonic()
        if ending == "exit":
            os.kill(manager_pid, signal.SIGKILL)
        elif ending == "stop":
            os.kill(manager_pid, signal.SIGSTOP)
        else:
            grace.end_after(0.5, state["grace"])
        leader_signal = wait_death(session_leader)
        leader_seconds = time.monotonic() - ended_at
        logged_kills(state, [outsider, session_leader])
        manager_alive = proc.start_ticks(manager_pid) is not None  # not our child
        with contextlib.suppress(ProcessLookupError):
            os.kill(manager_pid, signal.SIGCONT)  # continued: the grace it ended stays ended
        ended_lines = len(log_lines(state))
        _rewrite_grace(state["grace"], manager_pid)
        time.sleep(0.5)
        believed_again = [line for line in log_lines(state)[ended_lines:]
                          if line["event"] == "grace"]
        with contextlib.suppress(ProcessLookupError):
            os.kill(manager_pid, signal.SIGKILL)
    intruder_kill = next(line for line in state["log"]
                         if line["event"] == "kill" and line["pid"] == intruder)
    return {"outsider": outsider_signal, "intruder": intruder_signal,
            "intruder_source": intruder_kill["source"],
            "spared_while_installing": spared_while_installing,
            "leader_after_install": leader_signal, "leader_seconds": leader_seconds,
            "manager_alive_after": manager_alive, "believed_again": believed_again,
            "log": state["log"]}


@dataclasses.dataclass
class FakeSession:
    """A logind session as statemesh.systemd.Logind lists it."""

    id: str
    type: str = "unspecified"
    tty: str = ""
    remote: bool = False
    scope: str = ""
    user: str = "root"
    leader: int = 1


class FakeLogind:
    """Records what the watchdog asks of logind, instead of asking this host's."""

    def __init__(self, sessions: List[FakeSession], vanished: Tuple[str, ...] = ()):
        self.sessions = sessions
        self.vanished = vanished  # listed, but gone by the time they are ended
        self.calls: List[List[Any]] = []
        self.callback: Optional[Callable[[str], Any]] = None

    async def list_sessions(self) -> List[FakeSession]:
        return list(self.sessions)

    async def terminate_session(self, session_id: str) -> None:
        self.calls.append(["terminate", session_id])

    async def kill_session(self, session_id: str, signal_number: int) -> None:
        self.calls.append(["kill", session_id, signal_number])
        if session_id in self.vanished:
            raise LookupError(f"No session '{session_id}' known")

    def on_session_new(self, callback: Callable[[str], Any]) -> None:
        self.callback = callback

    async def subscribed(self) -> None:
        self.calls.append(["subscribed"])


async def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


def logind_sessions(devpts: str) -> Dict[str, Any]:
    """Interactive sessions (listed at start, or announced by SessionNew) are ended, others not."""
    work = Path(tempfile.mkdtemp(prefix="sm-logind-"))
    settings = Settings(devpts=devpts, dev=str(work), grace_path=work / "grace.json",
                        exempt_units=("workload.scope",))
    fake = FakeLogind([
        FakeSession("1"),  # a background session: no terminal, not remote
        FakeSession("2", type="tty", tty="tty1"),
        FakeSession("3", remote=True),
        FakeSession("4", type="x11"),
        FakeSession("5", remote=True, scope="workload.scope"),
        FakeSession("7", type="tty", tty="tty2"),  # gone with its last process meanwhile
    ], vanished=("7",))

    async def connect() -> FakeLogind:
        return fake

    async def scenario() -> None:
        task = asyncio.get_running_loop().create_task(Watchdog(settings, connect).run())
        await _until(lambda: fake.callback is not None and len(fake.calls) == 8)
        fake.sessions.append(FakeSession("6", type="tty", tty="pts/4"))
        assert fake.callback is not None
        fake.callback("6")
        await _until(lambda: len(fake.calls) == 10)
        task.cancel()

    said = io.StringIO()
    with contextlib.redirect_stdout(said):  # the watchdog's JSON lines
        asyncio.run(scenario())
    ended = [call[1] for call in fake.calls if call[0] == "terminate"]
    return {"ended": ended, "calls": fake.calls,
            "log": [json.loads(line) for line in said.getvalue().splitlines()]}


def _notified(state: Dict[str, Any], timeout: float) -> Optional[bytes]:
    """The next message the watchdog sent to its notify socket, None if none came."""
    ready, _, _ = select.select([state["notify"]], [], [], timeout)
    return state["notify"].recv(64) if ready else None


def hand_over_on_hangup(devpts: str) -> Dict[str, Any]:
    """SIGHUP: a successor takes the role; the old process guards until it is ready."""
    with watchdog(devpts) as state:
        old = state["process"]
        os.kill(old.pid, signal.SIGHUP)
        during = fork_child(hold_pty)  # opened while the successor starts
        message = _notified(state, WAIT_SECONDS) or b""
        successor = int(message.split(b"=", 1)[1]) if message.startswith(b"MAINPID=") else None
        if successor is not None:
            state["successors"].append(successor)
        old_status = old.wait(WAIT_SECONDS)
        after = fork_child(hold_pty)  # only the successor is left to end it
        signals = {"during": wait_death(during), "after": wait_death(after)}
        logged_kills(state, [during, after])
        successor_alive = successor is not None and not gone_within(successor, 0)
    return {"message": message.decode(), "successor": successor, "old": old.pid,
            "old_status": old_status, "signals": signals, "successor_alive": successor_alive,
            "log": state["log"]}


def stopped_by_sigterm(devpts: str) -> Dict[str, Any]:
    """SIGTERM (the stop at shutdown): the process exits 0 with nothing left pending."""
    with watchdog(devpts) as state:
        process = state["process"]
        process.send_signal(signal.SIGTERM)
        status = process.wait(WAIT_SECONDS)
    return {"status": status, "output": state["log_path"].read_text()}


def hand_over_refused_by_a_failing_successor(devpts: str) -> Dict[str, Any]:
    """A successor that cannot start (here: node.conf made malformed) changes nothing."""
    with watchdog(devpts) as state:
        state["conf"].write_text("this is not a node.conf\n")
        os.kill(state["process"].pid, signal.SIGHUP)
        wait_logged(state, lambda lines: any(line["event"] == "error" for line in lines),
                    "the failed hand-over")
        holder = fork_child(hold_pty)
        holder_signal = wait_death(holder)
        message = _notified(state, 0.5)
    return {"message": message, "holder": holder_signal, "old_alive": state["alive_at_end"],
            "log": state["log"]}


def _handle_events(guard: Watchdog) -> None:
    """guard.on_inotify() as its event loop calls it (the rechecks it schedules are dropped)."""

    async def handle() -> None:
        guard.on_inotify()

    asyncio.run(handle())


def overflow_rearms_pty_watches(devpts: str) -> Dict[str, Any]:
    """After an inotify overflow, the open of a spared pty created meanwhile is still seen."""
    work = Path(tempfile.mkdtemp(prefix="sm-overflow-"))
    guard = Watchdog(Settings(devpts=devpts, dev=str(work), grace_path=work / "grace.json"))
    _master, slave = os.openpty()  # ours, the watchdog's own process: spared ("self")
    name = os.ttyname(slave)
    queued = guard.inotify.read  # the pty's creation is among the events the overflow lost
    queued()
    guard.inotify.read = lambda: [inotify.Event(-1, inotify.IN_Q_OVERFLOW, "")]
    _handle_events(guard)
    guard.inotify.read = queued

    read_end, write_end = os.pipe()

    def open_slave() -> None:
        os.open(name, os.O_RDWR | os.O_NOCTTY)
        os.write(write_end, b"open")
        sleep_forever()

    opener = fork_child(open_slave)
    os.read(read_end, 4)  # its fd exists before the open event is handled
    seen = bool(select.select([guard.inotify], [], [], 5.0)[0])
    if seen:
        _handle_events(guard)
    return {"seen": seen, "opener": kill_if_alive(opener, 5.0),
            "watched": os.path.basename(name) in [os.path.basename(terminal.path)
                                                  for terminal in guard.pty_wds.values()]}


def creation_seen_before_its_opener(devpts: str) -> Dict[str, Any]:
    """The first scan after a pty's creation finds no holder (as when the opener's fd is not
    installed yet); the holder is still ended at once, by the rechecks."""
    work = Path(tempfile.mkdtemp(prefix="sm-recheck-"))
    kills: List[Dict[str, Any]] = []
    scans: List[int] = []
    real_holders = watchdog_module.terminals.holders

    def late_holders(wanted, tty_rdevs=frozenset(), every_pty=False, mounts=None):
        scans.append(len(wanted))
        if len(scans) == 1:
            return iter(())
        return real_holders(wanted, tty_rdevs, every_pty, mounts or {})

    def capture(event: str, **fields: Any) -> None:
        if event == "kill":
            kills.append(fields)

    async def scenario() -> Optional[int]:
        guard = Watchdog(Settings(devpts=devpts, dev=str(work), grace_path=work / "grace.json"))
        asyncio.get_running_loop().add_reader(guard.inotify.fileno(), guard.on_inotify)
        holder = fork_child(hold_pty)
        return await asyncio.get_running_loop().run_in_executor(None, kill_if_alive, holder, 10.0)

    watchdog_module.terminals.holders = late_holders
    watchdog_module.log = capture
    holder_signal = asyncio.run(scenario())
    return {"holder": holder_signal, "sources": [kill["source"] for kill in kills],
            "scans": len(scans)}


def open_reported_after_the_pty_went(devpts: str) -> Dict[str, Any]:
    """A slave opened just before its master closed: by the time the open is handled the
    node is gone, and the opener holds the slave of a pty that no longer exists."""
    work = Path(tempfile.mkdtemp(prefix="sm-gone-"))
    guard = Watchdog(Settings(devpts=devpts, dev=str(work), grace_path=work / "grace.json"))
    master, slave = os.openpty()  # ours, the watchdog's own process: spared
    name = os.ttyname(slave)
    _handle_events(guard)  # its creation: watched from now on
    read_end, write_end = os.pipe()

    def open_slave() -> None:
        os.close(master)  # inherited: the pty must go when the scenario closes its own
        os.open(name, os.O_RDWR | os.O_NOCTTY)
        os.write(write_end, b"open")
        sleep_forever()

    opener = fork_child(open_slave)
    os.read(read_end, 4)
    os.close(master)  # the node goes with its master
    os.close(slave)
    node = os.path.join(devpts, os.path.basename(name))
    deadline = time.monotonic() + 5.0
    while os.path.exists(node) and time.monotonic() < deadline:
        time.sleep(0.01)  # the kernel removes it shortly after the close
    gone = not os.path.exists(node)
    _handle_events(guard)
    return {"gone_before_handled": gone, "opener": kill_if_alive(opener, 5.0)}


def periodic_reconcile(devpts: str) -> Dict[str, Any]:
    """Without its events (never read here), the periodic check still ends a pty holder."""
    work = Path(tempfile.mkdtemp(prefix="sm-periodic-"))
    guard = Watchdog(Settings(devpts=devpts, dev=str(work), grace_path=work / "grace.json"))
    quiet_round = guard.periodic(1)  # nothing in use: the cheap check finds nothing to do
    holder = fork_child(hold_pty)
    deadline = time.monotonic() + WAIT_SECONDS
    while not [name for name in os.listdir(devpts) if name.isdigit()] and time.monotonic() < deadline:
        time.sleep(0.01)
    checked = guard.periodic(1)
    return {"quiet_round": quiet_round, "checked": checked, "holder": wait_death(holder),
            "full_round": guard.periodic(watchdog_module.FULL_SCAN_EVERY)}
