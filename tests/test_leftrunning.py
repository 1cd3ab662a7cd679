"""Programs left running by hand: systemd says which units are transient (a deleted unit file
changes nothing), a process in no unit is named, the installation's own processes are
excused but not a shell beside them, and units that start a program later count too."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from statemesh import leftrunning, systemd
from tests.fakebus import FakeBus, fakebus  # noqa: F401 - fixture


@pytest.fixture
def sleepers() -> Iterator[List[int]]:
    """Live processes to stand for what runs in units."""
    processes = [subprocess.Popen(["sleep", str(60 + n)], start_new_session=True)
                 for n in range(3)]
    yield [process.pid for process in processes]
    for process in processes:
        process.kill()
        process.wait()


def placed(cgroups: Dict[int, str]) -> leftrunning.CgroupOf:
    """A stand-in for /proc/PID/cgroup: these pids in these cgroups, every other gone."""
    return lambda pid: cgroups.get(pid, "")


def left(fakebus: FakeBus, cgroups: Dict[int, str], transient_dir: Path,
         excused: leftrunning.Excused = leftrunning.nothing_excused) -> List[str]:
    async def ask() -> List[str]:
        async with systemd.manager() as manager:
            return await leftrunning.left_running(manager, excused, placed(cgroups),
                                                  transient_dir)
    return fakebus.call(ask())


@pytest.mark.parametrize("cgroup, unit", [
    ("/system.slice/x.service", "x.service"),
    ("/system.slice/x.service/payload", "x.service"),
    ("/user.slice/user-0.slice/session-3.scope", "session-3.scope"),
    ("/user.slice/user-0.slice/user@0.service/app.slice/run-u3.service", "user@0.service"),
    ("/init.scope", "init.scope"),
    ("/", ""),
    ("/made-by-hand", ""),
    ("/system.slice/made-by-hand", ""),
])
def test_the_system_unit_of_a_cgroup(cgroup: str, unit: str) -> None:
    assert leftrunning.system_unit(cgroup) == unit


def test_transient_units_and_processes_in_no_unit_are_named(
        fakebus: FakeBus, sleepers: List[int], tmp_path: Path) -> None:
    """The file of way-back.service was deleted: systemd still says it is transient."""
    fakebus.systemd.add("way-back.service", active_state="active", transient=True)
    fakebus.systemd.add("cron.service", active_state="active")
    fakebus.systemd.add("restarting.service", active_state="activating", transient=True)
    fakebus.systemd.add("way-in.timer", active_state="active", transient=True)
    fakebus.systemd.add("logrotate.timer", active_state="active")
    way_back, cron, hidden = sleepers
    cgroups = {way_back: "/system.slice/way-back.service", cron: "/system.slice/cron.service",
               hidden: "/made-by-hand"}
    found = left(fakebus, cgroups, tmp_path / "no-files")
    assert found == [
        f"in no unit (/made-by-hand): pid {hidden} (sleep 62)",
        "restarting.service (started by hand): nothing runs in it now; it may start again",
        f"way-back.service (started by hand): pid {way_back} (sleep 60)",
        "way-in.timer (started by hand): nothing runs in it now; it may start again",
    ]
    assert leftrunning.refusal(found)[0].startswith(
        "programs left running by hand, which would keep running as root after the lockdown: "
        f"in no unit (/made-by-hand): pid {hidden} (sleep 62), restarting.service")


def test_a_cgroup_made_by_hand_and_named_like_a_unit_is_no_unit(
        fakebus: FakeBus, sleepers: List[int], tmp_path: Path) -> None:
    cgroups = {sleepers[0]: "/system.slice/innocent.service"}  # mkdir, not systemd's
    assert left(fakebus, cgroups, tmp_path) == [
        f"innocent.service (no unit systemd knows): pid {sleepers[0]} (sleep 60)"]


def test_the_installation_is_excused_but_not_a_shell_beside_it(
        fakebus: FakeBus, sleepers: List[int], tmp_path: Path) -> None:
    """`systemd-run --unit=inst sh -c 'REVSHELL & exec apt-get install ...'`: apt and its
    session are the installation's; the shell in the same unit is not."""
    fakebus.systemd.add("inst.service", active_state="active", transient=True)
    fakebus.systemd.add("session-4.scope", active_state="active", transient=True)
    apt, shell, session_process = sleepers
    cgroups = {apt: "/system.slice/inst.service", shell: "/system.slice/inst.service",
               session_process: "/user.slice/user-0.slice/session-4.scope"}
    files = tmp_path / "transient"
    files.mkdir()
    for name in ("inst.service", "session-4.scope", "user-0.slice"):
        (files / name).write_text("")

    def installation(process: leftrunning.Process) -> bool:
        return process.pid == apt or process.unit == "session-4.scope"

    assert left(fakebus, cgroups, files, installation) == [
        f"inst.service (started by hand): pid {shell} (sleep 61)"]
    # Nothing excused (status, once installed): the session's scope is named too.
    assert len(left(fakebus, cgroups, files)) == 2


def test_a_machine_with_nothing_by_hand_has_no_finding(fakebus: FakeBus, sleepers: List[int],
                                                        tmp_path: Path) -> None:
    """systemd's own init.scope is transient: PID 1 there is the manager, not a finding
    (found so in the VM: every installation was refused); another process there is."""
    fakebus.systemd.add("cron.service", active_state="active")
    fakebus.systemd.add("init.scope", active_state="active", transient=True)
    files = tmp_path / "transient"
    files.mkdir()
    (files / "init.scope").write_text("")
    cgroups = {1: "/init.scope", sleepers[0]: "/system.slice/cron.service"}
    assert left(fakebus, cgroups, files) == []
    assert leftrunning.refusal([]) == []
    cgroups[sleepers[1]] = "/init.scope"
    assert left(fakebus, cgroups, files) == [
        f"init.scope (started by hand): pid {sleepers[1]} (sleep 61)"]
