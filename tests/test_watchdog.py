"""The terminal watchdog on the host: only inside private devpts namespaces, with our own processes.

The scenarios (harness/watchdog_scenarios.py) run the real `statemesh-node watchdog` in a
private mount namespace whose /dev/pts is a new devpts instance (harness/private_devpts.py),
with an empty terminal-device directory and no logind, so no terminal or session of this
host can be seen or touched. The policy and parsing are tested directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import FrozenSet, Iterator, Optional, Tuple

import psutil
import pytest

from harness.private_devpts import ROOT, run_scenario
from harness.watchdog_scenarios import FakeSession
from statemesh import config, grace, proc
from statemesh.guarantees import watchdog as guarantee
from statemesh.watchdog import daemon, inotify, terminals

SCENARIOS = "harness.watchdog_scenarios"


# An event's own scan, or one of the rechecks it schedules: the opener's fd appears only
# after the kernel reported the open, so a preempted opener is found by a recheck.
EVENT_SOURCES = {"inotify", "inotify-recheck"}


def kills(log) -> list:
    return [line for line in log if line["event"] == "kill"]


# -- end to end, in a private devpts ------------------------------------------------------


def test_pty_holders_are_killed_and_logged_and_a_plain_process_lives() -> None:
    result = run_scenario(f"{SCENARIOS}:terminals_are_ended")
    assert result["signals"] == [9, 9, 9]
    assert result["orphans_left"] == []
    assert result["plain_alive"] and result["watchdog_alive"]
    logged = kills(result["log"])
    assert sorted(line["pid"] for line in logged) == sorted(result["holders"])
    assert {line["source"] for line in logged} <= EVENT_SOURCES
    for line in logged:
        assert set(line) >= {"pid", "user", "terminal", "command", "latency_ms"}
        assert line["user"] == "root" and line["terminal"].startswith(result["devpts"] + "/")
        assert "harness.watchdog_scenarios" in line["command"] and line["latency_ms"] >= 0


def test_terminals_open_before_start_are_ended_even_a_controlling_tty_without_fds() -> None:
    result = run_scenario(f"{SCENARIOS}:existing_terminals_at_start")
    assert result["holder"] == 9 and result["ctty_parent"] == 9 and result["forking"] == 9
    assert len(result["ctty_children"]) == 1 and len(result["grandchildren"]) == 1
    assert result["children_left"] == []
    killed = {line["pid"] for line in kills(result["log"])}
    # the child ignores SIGHUP: only the watchdog (by TIOCGSID) can have ended it
    assert result["ctty_children"][0] in killed
    # the forked holder's child, in a session of its own with the pty as controlling tty
    assert result["grandchildren"][0] in killed
    assert {line["source"] for line in kills(result["log"])} == {"start"}


def test_every_devpts_instance_is_watched_and_the_hosts_is_out_of_reach() -> None:
    host_devpts = os.stat("/dev/pts").st_dev
    result = run_scenario(f"{SCENARIOS}:every_devpts_instance_is_watched",
                          {"host_devpts_dev": host_devpts})
    # inside the namespace /dev/pts is the private instance, not the host's; its /proc shows
    # the scenario's processes only, and the host's instance is never found
    assert result["namespace_devpts_dev"] == result["watched_devpts_dev"] != host_devpts
    assert f"{os.major(host_devpts)}:{os.minor(host_devpts)}" not in result["devpts_logged"]
    assert len(result["devpts_logged"]) >= 2  # the one beside ours, the unshared one
    # a pty with the very same index and device number in another instance, held as
    # controlling tty and fd: a terminal of its own, ended
    assert result["other_index"] == 0 and result["other_rdev"] == terminals.pty_rdev(0)
    assert result["ours_signal"] == 9 and result["other_signal"] == 9
    # `unshare -m` with a devpts of its own, mounted after the watchdog started
    assert result["unshared_instance"] not in (0, host_devpts, result["watched_devpts_dev"])
    assert result["unshared_signal"] == 9
    # through a ptmx node into an instance mounted late: found by the next look, not the
    # minute's full scan, and named by the instance the kernel gave it
    assert result["ptmx_signal"] == 9
    assert result["ptmx_source"] in ("devpts-found", "devpts-recheck", "inotify")


@pytest.mark.parametrize("ending", ["exit", "stop", "deadline"])
def test_installing_session_is_spared_until_the_grace_ends(ending: str) -> None:
    """The package manager exits; or it is stopped (Ctrl-Z), which ends the grace for good;
    or it runs on past the deadline stamped after the transaction."""
    result = run_scenario(f"{SCENARIOS}:installation_grace", {"ending": ending})
    assert result["manager_alive_after"] == (ending != "exit")
    assert result["believed_again"] == []  # a record rewritten after the end changes nothing
    assert result["outsider"] == 9
    # opening the spared pty's slave is an event of its own, not left to the reconcile
    assert result["intruder"] == 9 and result["intruder_source"] in EVENT_SOURCES
    assert result["spared_while_installing"]
    assert result["leader_after_install"] == 9
    events = [line["event"] for line in result["log"]]
    assert events.index("grace") < events.index("grace-ended")
    last_kill = kills(result["log"])[-1]
    assert last_kill["source"] == "grace-ended"


def test_hangup_hands_over_to_a_successor_that_is_watching_before_the_old_one_exits() -> None:
    result = run_scenario(f"{SCENARIOS}:hand_over_on_hangup")
    successor, old = result["successor"], result["old"]
    assert result["message"] == f"MAINPID={successor}" and successor != old
    assert result["old_status"] == 0 and result["successor_alive"]
    # opened while the successor started (the old one ended it), and after the old one left
    assert result["signals"] == {"during": 9, "after": 9}
    events = [(line["event"], line.get("pid")) for line in result["log"]]
    assert events.index(("ready", successor)) < events.index(("handed-over", old))
    handed = [line for line in result["log"] if line["event"] == "handed-over"]
    assert handed == [{"event": "handed-over", "pid": old, "successor": successor}]


def test_a_stop_ends_every_task_before_the_process_exits() -> None:
    """Stopped at shutdown, the watchdog's loops were left pending and Python said so in the
    journal ("Task was destroyed but it is pending!"): they are cancelled and awaited now."""
    result = run_scenario(f"{SCENARIOS}:stopped_by_sigterm")
    assert result["status"] == 0
    assert "Task was destroyed" not in result["output"], result["output"]


class FailsAtStart:
    """A watchdog whose start fails before it has started any loop beside its main one."""

    def __init__(self, *_args: object) -> None:
        pass

    async def run(self) -> None:
        raise RuntimeError("the predecessor went away mid-hand-over")


def test_a_failure_at_start_is_what_the_watchdog_exits_with(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing else pending: the start's own error is raised, not one of the clean-up's."""
    monkeypatch.setattr(daemon, "Watchdog", FailsAtStart)
    settings = daemon.Settings(logind=False)
    with pytest.raises(RuntimeError, match="predecessor went away"):
        daemon.main(settings)


def test_an_inotify_overflow_rearms_the_open_watch_of_every_pty() -> None:
    result = run_scenario(f"{SCENARIOS}:overflow_rearms_pty_watches")
    assert result["watched"] and result["seen"] and result["opener"] == 9


def test_a_pty_whose_opener_is_not_visible_yet_is_looked_at_again_at_once() -> None:
    result = run_scenario(f"{SCENARIOS}:creation_seen_before_its_opener")
    assert result["holder"] == 9 and result["sources"] == ["inotify-recheck"]
    assert result["scans"] >= 2


def test_an_open_handled_after_its_pty_went_still_ends_the_opener() -> None:
    result = run_scenario(f"{SCENARIOS}:open_reported_after_the_pty_went")
    assert result["gone_before_handled"] and result["opener"] == 9


def test_a_successor_that_cannot_start_leaves_the_running_watchdog_in_charge() -> None:
    result = run_scenario(f"{SCENARIOS}:hand_over_refused_by_a_failing_successor")
    assert result["message"] is None  # systemd was told of no new main process
    assert result["holder"] == 9 and result["old_alive"]
    errors = [line for line in result["log"] if line["event"] == "error"]
    assert len(errors) == 1 and errors[0]["what"] == "handover"
    assert "before it was ready" in errors[0]["error"]
    assert not any(line["event"] == "handed-over" for line in result["log"])


def test_logind_sessions_are_terminated_unless_spared() -> None:
    result = run_scenario(f"{SCENARIOS}:logind_sessions")
    assert result["ended"] == ["2", "3", "4", "6"]
    assert result["calls"][:3] == [["subscribed"], ["kill", "2", 9], ["terminate", "2"]]
    # A session logind no longer knows ended by itself: the goal, not an error.
    assert ["kill", "7", 9] in result["calls"]
    assert [line["session"] for line in result["log"] if line["event"] == "session-gone"] == ["7"]
    assert not [line for line in result["log"] if line["event"] == "error"], result["log"]


# -- the command line ----------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["/usr/bin/python3", "-m", "statemesh.cli", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


def test_cli_refuses_a_directory_that_is_not_devpts(tmp_path: Path) -> None:
    done = _cli("--config", str(tmp_path / "none.conf"), "watchdog", "--devpts", str(tmp_path),
                "--dev", str(tmp_path), "--no-logind")
    assert done.returncode == 1
    assert f"{tmp_path} is not a devpts mount" in done.stderr


def test_cli_refuses_a_missing_terminal_device_directory(tmp_path: Path) -> None:
    done = _cli("--config", str(tmp_path / "none.conf"), "watchdog", "--devpts", "/dev/pts",
                "--dev", str(tmp_path / "missing"), "--no-logind")
    assert done.returncode == 1
    assert "is not a directory of terminal devices" in done.stderr


def test_cli_reports_an_exemption_that_would_exempt_logins(tmp_path: Path) -> None:
    conf = tmp_path / "node.conf"
    conf.write_text("Watchdog-Exempt-Units: workload.service user.slice\n")
    done = _cli("--config", str(conf), "watchdog", "--no-logind")
    assert done.returncode == 2
    assert f"{conf}:1: Watchdog-Exempt-Units: 'user.slice' holds logins" in done.stderr


# -- policy --------------------------------------------------------------------------------


def process(pid: int = 4242, ppid: int = 100, sid: int = 4242, kernel: bool = False) -> terminals.Process:
    return terminals.Process(pid, ppid, sid, terminals.pty_rdev(3), kernel, 1000, frozenset())


@pytest.mark.parametrize("proc, reason", [
    (process(pid=os.getpid()), "self"),
    (process(pid=1, ppid=0), "init"),
    (process(pid=57, ppid=2, kernel=True), "kernel thread"),
    (process(ppid=2), "kernel thread"),
])
def test_never_kills_itself_init_or_kernel_threads(proc, reason) -> None:
    assert daemon.spare_reason(proc, "/", (), None) == reason


def not_a_login(pid: int) -> bool:
    del pid
    return False


def test_logind_holding_its_reserved_vt_is_never_killed() -> None:
    assert daemon.spare_reason(process(), "/system.slice/systemd-logind.service", (), None,
                               not_a_login) == "exempt unit systemd-logind.service"


def test_exempt_units_match_any_component_of_the_cgroup() -> None:
    exempt = ("workload.service", "machine.slice")
    def spare(cgroup: str):
        return daemon.spare_reason(process(), cgroup, exempt, None, not_a_login)
    assert spare("/system.slice/workload.service") == "exempt unit workload.service"
    assert spare("/machine.slice/c1.scope/payload") == "exempt unit machine.slice"
    assert spare("/system.slice/workload2.service") is None
    assert spare("/user.slice/user-0.slice/session-3.scope") is None


def test_a_logins_process_moved_into_an_exempt_unit_is_not_exempt() -> None:
    """echo PID > /sys/fs/cgroup/system.slice/workload.service/cgroup.procs"""
    def a_login(pid: int) -> bool:
        return pid == 4242
    exempt = ("workload.service", "systemd-logind.service")
    for cgroup in ("/system.slice/workload.service", "/system.slice/systemd-logind.service"):
        assert daemon.spare_reason(process(), cgroup, exempt, None, a_login) is None
        assert daemon.spare_reason(process(pid=4343), cgroup, exempt, None, a_login)


def test_a_loginuid_tells_a_login_from_a_service(tmp_path: Path) -> None:
    assert proc.born_of_a_login(os.getpid()) == (Path("/proc/self/loginuid").read_text()
                                                 != str(proc.LOGINUID_UNSET))
    assert proc.born_of_a_login(2 ** 22 + 1)  # no such process: counted as a login


def test_grace_spares_only_the_installing_session() -> None:
    by_logind = grace.Grace(pid=10, start_ticks=1, session="7", sid=99, tty="/dev/pts/0")
    in_session = "/user.slice/user-0.slice/session-7.scope"
    assert daemon.spare_reason(process(sid=5), in_session, (), by_logind) == "installation grace"
    assert daemon.spare_reason(process(sid=99), "/user.slice/user-0.slice/session-17.scope", (),
                                 by_logind) is None
    own_child = grace.Grace(pid=os.getppid(), start_ticks=1, session="7", sid=99, tty=None)
    assert daemon.spare_reason(process(pid=os.getpid() + 10**6), "/", (), own_child) is None
    assert own_child.spares(os.getpid(), 5, "/")  # apt's dpkg, on apt's pty in a new session
    # What carries the installing terminal: sshd's session process (the pty's master, a
    # Unix session of its own, no logind session without libpam-systemd), a tmux server.
    ours = grace.Grace(pid=os.getpid(), start_ticks=1, session=None, sid=99, tty=None)
    assert ours.spares(os.getppid(), 5, "/system.slice/ssh.service")
    assert not ours.spares(os.getpid() + 10**6, 5, "/system.slice/ssh.service")
    by_sid = grace.Grace(pid=10, start_ticks=1, session=None, sid=99, tty=None)
    assert daemon.spare_reason(process(sid=99), "/system.slice/agent.service", (), by_sid) \
        == "installation grace"
    assert daemon.spare_reason(process(sid=98), "/system.slice/agent.service", (), by_sid) is None


def test_sessions_spared_are_those_without_a_way_in_exempt_or_installing() -> None:
    installing = grace.Grace(pid=10, start_ticks=1, session="9", sid=9, tty=None)
    assert daemon.session_spared(FakeSession("1", type="unspecified"), (), None)
    assert not daemon.session_spared(FakeSession("2", tty="tty1"), (), None)
    assert not daemon.session_spared(FakeSession("3", remote=True), (), None)
    assert not daemon.session_spared(FakeSession("4", type="wayland"), (), None)
    assert daemon.session_spared(FakeSession("9", type="tty", tty="pts/0"), (), installing)
    assert daemon.session_spared(FakeSession("5", remote=True, scope="wl.scope"), ("wl.scope",), None)


# -- reading /proc ---------------------------------------------------------------------------


def test_systemd_cgroup_path_from_unified_and_hybrid_hierarchies() -> None:
    assert proc.systemd_cgroup("0::/system.slice/a.service\n") == "/system.slice/a.service"
    assert proc.systemd_cgroup("0::/\n") == "/"  # the root cgroup, where root can put anything
    hybrid = "12:memory:/x\n1:name=systemd:/user.slice/user-0.slice/session-2.scope\n0::/\n"
    assert proc.systemd_cgroup(hybrid) == "/user.slice/user-0.slice/session-2.scope"
    assert grace.logind_session(proc.systemd_cgroup(hybrid)) == "2"
    assert grace.logind_session("/system.slice/a.service") is None


def test_pty_device_numbers_follow_the_kernel() -> None:
    assert terminals.pty_rdev(0) == os.makedev(136, 0)
    assert terminals.pty_rdev(300) == os.makedev(136, 300)  # /dev/pts/300 is 136:300


def test_a_pty_found_by_the_sweep_alone_is_named_by_its_node_where_its_instance_is_known() -> None:
    # The sweep lists the ptys first and reads /proc after: a pty made in between is held by
    # no listed terminal (CI run of dce2c05 logged "pts/1 of devpts 0:23" for /dev/pts/1).
    instance = os.makedev(0, 23)
    holder = terminals.Process(pid=10, ppid=1, sid=10, tty_nr=0, kernel_thread=False,
                               start_ticks=0, holds=frozenset({(instance, terminals.pty_rdev(1))}))
    known = terminals.any_pty(holder, {instance: "/dev/pts"})
    assert known is not None and known.path == "/dev/pts/1" and known.key == (instance, terminals.pty_rdev(1))
    unknown = terminals.any_pty(holder, {})
    assert unknown is not None and unknown.path == "pts/1 of devpts 0:23"


@pytest.mark.parametrize("mode, holds", [(os.O_WRONLY, False), (os.O_RDWR, True), (os.O_RDONLY, True)])
def test_a_terminal_device_open_only_for_writing_is_not_held(mode: int, holds: bool) -> None:
    # /dev/full stands in for a terminal device: this only reads our own fds, kills nothing.
    device = os.stat("/dev/full").st_rdev
    fd = os.open("/dev/full", mode | os.O_CLOEXEC)
    try:
        held = terminals._held_terminals(os.getpid(), frozenset({device}))
    finally:
        os.close(fd)
    assert ((0, device) in held) == holds


def test_a_terminal_fd_whose_number_was_reused_since_its_stat_is_not_held() -> None:
    # systemd's executor closes its write-only /dev/console fd and opens a /proc file
    # read-only under the same number, between a scan's stat of the fd and its fdinfo read.
    fd = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
    seen = os.stat(f"/proc/self/fd/{fd}")
    os.close(fd)
    reused = os.open("/proc/sys/kernel/cap_last_cap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert reused == fd
        assert not terminals._reads(os.getpid(), str(fd), seen)
        assert terminals._reads(os.getpid(), str(fd), os.stat(f"/proc/self/fd/{fd}"))
    finally:
        os.close(reused)
    assert not terminals._reads(os.getpid(), str(fd), seen)  # closed: holds nothing


def test_only_character_devices_are_terminals(tmp_path: Path) -> None:
    (tmp_path / "ttyS0").write_text("")
    (tmp_path / "7").write_text("")
    assert terminals.tty_device(str(tmp_path / "ttyS0")) is None
    assert terminals.tty_device("/dev/null") is not None  # a char device: callers filter names
    assert terminals.pty(str(tmp_path), "7") is None
    assert terminals.pty(str(tmp_path), "ptmx") is None
    assert not terminals.is_devpts_mount(str(tmp_path))


def test_inotify_reports_creations_and_opens(tmp_path: Path) -> None:
    watcher = inotify.Inotify()
    try:
        directory = watcher.add_watch(str(tmp_path), inotify.IN_CREATE)
        (tmp_path / "tty7").write_text("")
        opened = watcher.add_watch(str(tmp_path / "tty7"), inotify.IN_OPEN)
        (tmp_path / "tty7").read_text()
        events = watcher.read()
        assert inotify.Event(directory, inotify.IN_CREATE, "tty7") in events
        assert inotify.Event(opened, inotify.IN_OPEN, "") in events
        assert watcher.read() == []
        with pytest.raises(OSError, match="inotify_add_watch .*missing"):
            watcher.add_watch(str(tmp_path / "missing"), inotify.IN_OPEN)
    finally:
        watcher.close()


# -- installation grace record ----------------------------------------------------------------


def _package_manager(tmp_path: Path, name: str) -> Tuple[subprocess.Popen, FrozenSet[str]]:
    """A stand-in package manager: a copy of dash named `name` whose child sleeps, and the
    executables to pass for it to count as one (a file of ours, not /usr/bin/apt-get)."""
    executable = tmp_path / name
    shutil.copy("/bin/dash", executable)
    manager = subprocess.Popen([str(executable), "-c", "sleep 60 & wait"], start_new_session=True)
    return manager, frozenset({os.path.realpath(executable)})


def _child_of(pid: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.02)
    raise AssertionError("no child")


def _end(process: subprocess.Popen) -> None:
    os.killpg(process.pid, 9)
    process.wait()


def test_grace_records_the_package_manager_by_its_executable_and_ends_with_it(
        tmp_path: Path) -> None:
    manager, executables = _package_manager(tmp_path, "apt-get")
    record = tmp_path / "run" / "install-grace.json"
    try:
        grace.record_installer(_child_of(manager.pid), record, executables)
        saved = json.loads(record.read_text())
        assert saved["pid"] == manager.pid and saved["sid"] == manager.pid
        assert saved["ends_at"] is None
        current: Optional[grace.Grace] = grace.current(record)
        assert current is not None and current.pid == manager.pid and current.session is None
        assert "until the transaction ends" in current.describe()
    finally:
        _end(manager)
    assert grace.current(record) is None


def test_a_shell_renamed_apt_is_not_the_installer(tmp_path: Path) -> None:
    """`exec -a apt bash`: the name is the package manager's, the executable is not."""
    renamed = subprocess.Popen(["bash", "-c", "exec -a apt-get dash -c 'sleep 60 & wait'"],
                               start_new_session=True)
    try:
        child = _child_of(renamed.pid)
        assert psutil.Process(renamed.pid).cmdline()[0] == "apt-get"
        grace.record_installer(child, tmp_path / "g.json")
        assert json.loads((tmp_path / "g.json").read_text())["pid"] == child
    finally:
        _end(renamed)


@contextlib.contextmanager
def _recorded_grace(tmp_path: Path,
                    name: str) -> Iterator[Tuple[subprocess.Popen, Path, FrozenSet[str]]]:
    """A stand-in package manager named `name`, recorded as the installer."""
    manager, executables = _package_manager(tmp_path, name)
    record = tmp_path / "g.json"
    try:
        grace.record_installer(manager.pid, record, executables)
        yield manager, record, executables
    finally:
        _end(manager)


def test_a_stopped_installer_spares_nothing(tmp_path: Path) -> None:
    with _recorded_grace(tmp_path, "apt") as (manager, record, _executables):
        os.kill(manager.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while not proc.is_stopped(manager.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert grace.current(record) is None
        os.kill(manager.pid, signal.SIGCONT)
        assert grace.current(record) is not None


def test_the_deadline_ends_the_grace_and_is_never_moved_later(tmp_path: Path) -> None:
    with _recorded_grace(tmp_path, "dpkg") as (manager, record, executables):
        assert grace.end_after(3600, record) is not None
        first = grace.recorded(record)
        assert first is not None and first.ends_at is not None
        assert grace.current(record) is not None
        assert "s more at most" in first.describe()
        # installing again from the spared session, and the harden unit stamping again
        grace.record_installer(manager.pid, record, executables)
        grace.end_after(7200, record)
        again = grace.recorded(record)
        assert again is not None and again.ends_at == first.ends_at
        grace.end_after(0, record)
        assert grace.current(record) is None
        assert grace.recorded(record) is not None  # kept: the next record keeps its deadline
        grace.forget(record)
        assert grace.recorded(record) is None
        # removed by the spared root before the harden unit stamps it: stamped all the same,
        # with no installer in it
        grace.end_after(1, record)
        nobody = grace.recorded(record)
        assert nobody is not None and nobody.pid == 0 and nobody.ends_at is not None
        assert grace.current(record) is None


def test_grace_without_a_package_manager_records_the_caller(tmp_path: Path) -> None:
    other = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], start_new_session=True)
    try:
        child = _child_of(other.pid)
        grace.record_installer(child, tmp_path / "g.json")
        assert json.loads((tmp_path / "g.json").read_text())["pid"] == child
    finally:
        _end(other)


@pytest.mark.parametrize("text", ["", "not json", "[]", '{"pid": "x"}',
                                  '{"pid": 1, "start_ticks": 0, "session": null, "sid": 1, "tty": null}'])
def test_grace_is_none_for_a_bad_or_stale_record(tmp_path: Path, text: str) -> None:
    path = tmp_path / "g.json"
    path.write_text(text)
    assert grace.current(path) is None
    assert grace.current(tmp_path / "missing.json") is None


# -- the guarantee -----------------------------------------------------------------------------


def _guarantee(tmp_path: Path, pids: str, enabled: bool) -> guarantee.WatchdogGuarantee:
    cgroup = tmp_path / "cgroup" / "system.slice" / guarantee.UNIT
    cgroup.mkdir(parents=True)
    (cgroup / "cgroup.procs").write_text(pids)
    wants = tmp_path / "units" / "multi-user.target.wants"
    wants.mkdir(parents=True)
    if enabled:
        (wants / guarantee.UNIT).symlink_to(f"/usr/lib/systemd/system/{guarantee.UNIT}")
    return guarantee.WatchdogGuarantee(config.NodeConfig(), tmp_path / "cgroup", tmp_path / "units",
                                      devpts=str(tmp_path / "no-devpts"))


def test_guarantee_holds_when_the_unit_runs_and_is_enabled(tmp_path: Path) -> None:
    pid = os.getpid()  # a running process stands in for the daemon
    finding = _guarantee(tmp_path, f"{pid}\n", enabled=True).check()
    assert finding.holds and finding.name == "watchdog"
    assert finding.facts["pids"] == [pid] and f"running (pid {pid})" in finding.detail


@pytest.mark.parametrize("running, enabled, detail", [
    (False, True, "not running, enabled at boot"),
    (True, False, "running, not enabled at boot"),
])
def test_guarantee_fails_when_stopped_or_not_enabled(tmp_path: Path, running: bool, enabled: bool,
                                                     detail: str) -> None:
    finding = _guarantee(tmp_path, f"{os.getpid()}\n" if running else "", enabled).check()
    assert not finding.holds and finding.detail.endswith(detail)


def test_guarantee_fails_when_its_process_is_stopped(tmp_path: Path, stopped_process: int) -> None:
    """SIGSTOP leaves the daemon alive (systemd restarts nothing) and watching nothing."""
    finding = _guarantee(tmp_path, f"{stopped_process}\n", enabled=True).check()
    assert not finding.holds and finding.facts["stopped"] == [stopped_process]
    assert finding.detail == (f"{guarantee.UNIT} stopped (pid {stopped_process}: "
                              "SIGSTOP or a tracer), ending no terminal, enabled at boot")


def test_periodic_check_ends_what_the_events_missed() -> None:
    result = run_scenario(f"{SCENARIOS}:periodic_reconcile")
    assert result["quiet_round"] is None
    assert result["checked"] == "reconcile-check" and result["holder"] == 9
    assert result["full_round"] == "reconcile"
