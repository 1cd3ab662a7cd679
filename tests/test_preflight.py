"""Preflight: every reason to refuse is listed, and the installing session is allowed."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import pytest

from statemesh import grace, leftrunning, planted, preflight, proc, ufwfiles
from tests.fakebus import FakeBus, FakeSession, fakebus, package_units  # noqa: F401 - fixture
from tests.test_ufwfiles import ACCEPT_22, Ufw

DEBIAN12 = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'


def utmp_entry(kind: int, pid: int, line: str, user: str, host: str = "") -> bytes:
    return struct.pack(preflight._UTMP_FORMAT, kind, pid, line.encode(), b"", user.encode(),
                       host.encode(), 0, 0, 0, 0, 0, 0, 0, 0, 0, b"")


@pytest.fixture
def sleeper() -> Iterator[int]:
    """A live process to stand for a login's shell."""
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield process.pid
    process.kill()
    process.wait()


class Host:
    def __init__(self, tmp_path: Path):
        self.os_release = tmp_path / "os-release"
        self.os_release.write_text(DEBIAN12)
        self.comm = tmp_path / "comm"
        self.comm.write_text("systemd\n")
        self.utmp = tmp_path / "utmp"
        self.grace = tmp_path / "grace.json"
        self.holders: List[Tuple[int, int, str]] = []  # pty holders: this host's are not ours
        # This host's processes are in no unit (no systemd here): none is looked at.
        self.cgroup_of: Callable[[int], str] = lambda pid: ""

    def check(self) -> preflight.Report:
        return preflight.check(self.os_release, self.comm, self.utmp, self.grace,
                               holders=lambda: list(self.holders),
                               planted_problems=planted.environment_problems,
                               cgroup_of=self.cgroup_of)


@pytest.fixture
def host(tmp_path: Path, fakebus: FakeBus) -> Host:
    fakebus.systemd.add("display-manager.service", exists=False)
    package_units(fakebus.systemd)
    return Host(tmp_path)


@pytest.mark.parametrize("text, verdict", [
    (DEBIAN12, None),
    ('ID=debian\nVERSION_ID="13"\n', None),
    ('ID=ubuntu\nVERSION_ID="22.04"\nPRETTY_NAME="Ubuntu 22.04.4 LTS"\n', None),
    ('ID=ubuntu\nVERSION_ID="24.04"\n', None),
    ('ID=debian\nVERSION_ID="11"\nPRETTY_NAME="Debian GNU/Linux 11 (bullseye)"\n',
     "unsupported release 'Debian GNU/Linux 11 (bullseye)': debian 12 or later is needed"),
    ('ID=ubuntu\nVERSION_ID="20.04"\n', "ubuntu 22.04 or later is needed"),
    ('ID=debian\n', "debian 12 or later is needed"),
    ('ID=fedora\nVERSION_ID=40\nPRETTY_NAME="Fedora Linux 40"\n',
     "unsupported OS 'Fedora Linux 40': only Debian 12+ and Ubuntu 22.04+ are supported"),
])
def test_os_release(tmp_path: Path, text: str, verdict: str) -> None:
    path = tmp_path / "os-release"
    path.write_text(text)
    problem, _release = preflight.os_problem(path)
    if verdict is None:
        assert problem is None
    else:
        assert problem is not None and verdict in problem


def test_missing_os_release_and_pid1(tmp_path: Path) -> None:
    problem, _ = preflight.os_problem(tmp_path / "none")
    assert problem is not None and "cannot read" in problem
    (tmp_path / "comm").write_text("init\n")
    assert preflight.pid1_problem(tmp_path / "comm") == "PID 1 is 'init', not systemd"


@pytest.mark.usefixtures("returns_promptly")
def test_a_fifo_as_os_release_or_the_grace_record_is_never_waited_on(tmp_path: Path) -> None:
    """Both are the operator's to replace before installing; a FIFO at either held
    preflight and status for ever. os-release is named; a grace record spares nobody."""
    os.mkfifo(tmp_path / "os-release")
    problem, release = preflight.os_problem(tmp_path / "os-release")
    assert (problem, release) == (
        f"cannot read {tmp_path}/os-release: a FIFO, not a regular file", {})
    os.mkfifo(tmp_path / "grace.json")
    assert grace.recorded(tmp_path / "grace.json") is None


@pytest.mark.usefixtures("returns_promptly")
def test_a_fifo_as_utmp_is_named(host: Host) -> None:
    """A FIFO at /run/utmp hides every login, and held preflight for ever."""
    os.mkfifo(host.utmp)
    report = host.check()
    assert report.problems == [
        f"cannot read {host.utmp} to see who is logged in (a FIFO, not a regular file; "
        "remove it: the next boot makes it again)"], report.problems


def test_a_plain_server_passes(host: Host) -> None:
    report = host.check()
    assert report.ok, report.problems
    assert report.facts["os_id"] == "debian" and report.facts["display_manager"] == "inactive"


def test_every_reason_is_listed(host: Host, fakebus: FakeBus, sleeper: int) -> None:
    host.comm.write_text("sysvinit\n")
    fakebus.systemd.units["display-manager.service"].exists = True
    fakebus.systemd.units["display-manager.service"].active_state = "active"
    fakebus.do(fakebus.logind.add, FakeSession("2", type="wayland", tty="tty2", user="alice"))
    fakebus.do(fakebus.logind.add, FakeSession("5", tty="pts/3", remote=True, user="bob"))
    fakebus.do(fakebus.logind.add, FakeSession("c7", type="unspecified", class_="background"))
    host.utmp.write_bytes(utmp_entry(preflight.USER_PROCESS, sleeper, "pts/9", "carol", "10.0.0.9")
                          + utmp_entry(preflight.USER_PROCESS, 999999999, "pts/8", "gone")
                          + utmp_entry(8, sleeper, "pts/7", "dead-process-record"))
    report = host.check()
    assert report.problems == [
        "PID 1 is 'sysvinit', not systemd",
        "a display manager runs (display-manager.service is active)",
        "graphical (wayland) session 2 of alice on tty2",
        "interactive session 5 of bob on pts/3 (remote)",
        f"login of carol on pts/9 from 10.0.0.9 (pid {sleeper})",
    ]
    assert json.loads(json.dumps(report.as_dict()))["ok"] is False


def test_the_installing_session_is_allowed(host: Host, fakebus: FakeBus) -> None:
    fakebus.do(fakebus.logind.add, FakeSession("7", tty="pts/0"))
    host.grace.write_text(json.dumps({
        "pid": os.getpid(), "start_ticks": proc.start_ticks(os.getpid()),
        "session": "7", "sid": os.getsid(0), "tty": "/dev/pts/0"}))
    host.utmp.write_bytes(utmp_entry(preflight.USER_PROCESS, os.getpid(), "pts/0", "root"))
    assert host.check().ok
    fakebus.do(fakebus.logind.add, FakeSession("8", tty="tty1"))
    assert host.check().problems == ["interactive session 8 of root on tty1"]


def test_a_unit_of_the_package_prepared_before_installing_is_a_reason(
        host: Host, fakebus: FakeBus) -> None:
    dropin = "/etc/systemd/system/statemesh-watchdog.service.d/override.conf"
    fakebus.systemd.units["statemesh-watchdog.service"].dropins = [dropin]
    shadow = "/etc/systemd/system/statemesh-atls.service"
    fakebus.systemd.units["statemesh-atls.service"].fragment = shadow
    undo = " (remove what was planted, `systemctl daemon-reload`, restart it)"
    assert host.check().problems == [
        f"statemesh-watchdog.service has drop-ins: {dropin}{undo}",
        f"statemesh-atls.service is loaded from {shadow}, not the package's file{undo}",
    ]


def test_no_bus_is_a_reason(host: Host, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STATEMESH_DBUS_ADDRESS", f"unix:path={tmp_path}/none")
    problems = host.check().problems
    assert len(problems) == 1 and problems[0].startswith("cannot ask systemd and logind")


def test_a_pty_held_outside_the_installing_session_is_a_reason(host: Host) -> None:
    """A shell kept aside before installing: its loginuid taken off, written into
    systemd-logind.service's cgroup, where the watchdog would take it for logind's."""
    logind = "/system.slice/systemd-logind.service"
    host.holders = [(os.getpid(), os.getsid(0), "/user.slice/user-0.slice/session-1.scope")]
    assert host.check().ok  # the caller's own session
    host.holders.append((1, 1, logind))
    problems = host.check().problems
    assert len(problems) == 1 and problems[0].startswith("pid 1 (")
    assert f"holds a pty outside the installing session, in {logind}" in problems[0]



def test_only_the_installing_sessions_own_scope_is_excused() -> None:
    """A cgroup merely named like the installing session's scope, elsewhere than logind puts
    it (/system.slice/evil.service/session-4.scope), excuses nothing."""
    excused = preflight.installation_own(None, preflight.Own("4", None, os.getsid(0)))
    gone = 4_194_303  # no such process: neither the installer's lineage nor its child
    assert excused(leftrunning.Process(gone, "/user.slice/user-0.slice/session-4.scope",
                                       "session-4.scope"))
    for cgroup, unit in (("/system.slice/evil.service/session-4.scope", "evil.service"),
                         ("/system.slice/session-4.scope", "session-4.scope"),
                         ("/user.slice/user-0.slice/session-5.scope", "session-5.scope")):
        assert not excused(leftrunning.Process(gone, cgroup, unit)), cgroup
    assert excused(leftrunning.Process(os.getpid(), "/", ""))  # run by hand: its own lineage


def test_status_names_what_is_planted_on_an_installed_node(fakebus: FakeBus,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Preflight's checks, live: what the spared session planted after preflight fails
    status (stand-in: the manager's environment, which a `systemctl set-environment` in
    the grace changes)."""
    monkeypatch.setattr(preflight, "planted_for_later", planted.environment_problems)
    fakebus.systemd.environment = ["LANG=C.UTF-8", "LD_PRELOAD=/usr/lib/libhook.so"]
    finding = preflight.planted_finding()
    assert finding.name == "planted" and not finding.holds
    assert "LD_PRELOAD" in finding.detail
    fakebus.systemd.environment = ["LANG=C.UTF-8"]
    assert preflight.planted_finding().holds


@pytest.mark.system_apt  # planted_for_later reads apt's configuration too
def test_ufws_boot_time_files_are_refused_and_named_by_status(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An executable before.init of the operator's (run as root at every boot) and an
    accept added to before.rules (loaded at every boot, in a chain the firewall check does
    not read), in a stand-in of ufw's layout beside what dpkg installed on this host."""
    ufw = Ufw(tmp_path)
    (ufw.etc / "before.init").write_bytes(b"#!/bin/sh\n/root/way-in &\n")
    (ufw.etc / "before.init").chmod(0o700)
    (ufw.etc / "before.rules").write_bytes(ACCEPT_22)
    judge = ufwfiles.problems
    monkeypatch.setattr(ufwfiles, "problems",
                        lambda files: judge({**files, **ufw.files}, ufw.places))
    found = [line for line in preflight.planted_for_later([]) if str(ufw.etc) in line]
    assert [line.split(":")[0] for line in found] == [
        f"{ufw.etc}/before.init is executable and differs from the ufw package's "
        f"{ufw.places.templates}/before.init",
        f"{ufw.etc}/before.rules differs from the ufw package's "
        f"{ufw.places.templates}/iptables/before.rules"]
