"""Programs left running by hand: systemd says which units are transient (a deleted unit file
changes nothing), a process in no unit is named, the installation's own processes are
excused but not a shell beside them, and units that start a program later count too."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from statemesh import leftrunning, proc, pulledin, systemd
from tests.fakebus import FakeBus, FakeSession, fakebus  # noqa: F401 - fixture


@pytest.fixture
def sleepers() -> Iterator[List[int]]:
    """Live processes to stand for what runs in units, each once its command line reads
    (Popen may return inside the child's exec, before the kernel has set its arguments)."""
    processes = [subprocess.Popen(["sleep", str(60 + n)], start_new_session=True)
                 for n in range(3)]
    for process in processes:
        while Path(f"/proc/{process.pid}/cmdline").read_bytes() == b"":
            time.sleep(0.001)
    yield [process.pid for process in processes]
    for process in processes:
        process.kill()
        process.wait()


def placed(cgroups: Dict[int, str]) -> leftrunning.CgroupOf:
    """A stand-in for /proc/PID/cgroup: these pids in these cgroups, every other gone."""
    return lambda pid: cgroups.get(pid, "")


def left(fakebus: FakeBus, cgroups: Dict[int, str], _unused: object = None,
         excused: leftrunning.Excused = leftrunning.nothing_excused) -> List[str]:
    async def ask() -> List[str]:
        async with systemd.manager() as manager:
            return await leftrunning.left_running(manager, excused, placed(cgroups))
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
    assert proc.system_unit(cgroup) == unit


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
    found = left(fakebus, cgroups)
    assert found == [
        f"in no unit systemd owns (/made-by-hand): pid {hidden} (sleep 62)",
        "restarting.service (started by hand): nothing runs in it now; it may start again",
        f"way-back.service (started by hand): pid {way_back} (sleep 60)",
        "way-in.timer (started by hand): nothing runs in it now; it may start again",
    ]
    # The root cgroup of a unified-only system (`echo $$ > /sys/fs/cgroup/cgroup.procs`).
    in_root = left(fakebus, {hidden: "/"})[0]
    assert in_root == f"in no unit systemd owns (/): pid {hidden} (sleep 62)"
    assert leftrunning.refusal(found)[0].startswith(
        "programs left running by hand, which would keep running as root after the lockdown: "
        f"in no unit systemd owns (/made-by-hand): pid {hidden} (sleep 62), restarting.service")


def test_a_cgroup_made_by_hand_and_named_like_a_unit_is_no_unit(
        fakebus: FakeBus, sleepers: List[int], tmp_path: Path) -> None:
    cgroups = {sleepers[0]: "/system.slice/innocent.service"}  # mkdir, not systemd's
    assert left(fakebus, cgroups, tmp_path) == [
        "in no unit systemd owns (/system.slice/innocent.service): "
        f"pid {sleepers[0]} (sleep 60)"]
    # Named like a running packaged unit, elsewhere than systemd put it, or inside it: the
    # one inside is the unit's (delegated units make their own); the other is not.
    fakebus.systemd.add("cron.service", active_state="active")
    cgroups = {sleepers[0]: "/user.slice/cron.service", sleepers[1]: "/system.slice/cron.service",
               sleepers[2]: "/system.slice/cron.service/payload"}
    assert left(fakebus, cgroups) == [
        f"in no unit systemd owns (/user.slice/cron.service): pid {sleepers[0]} (sleep 60)"]


def test_a_service_restarting_when_asked_is_asked_again(
        fakebus: FakeBus, sleepers: List[int]) -> None:
    """A failing endpoint (Restart=always) has no cgroup between its process's exit and its
    restart; its process listed a moment before is the unit's, as the next question
    shows. A cgroup made by hand beside a unit that never has one stays named."""
    fakebus.systemd.add("statemesh-atls.service", active_state="activating",
                        control_groups=["", "", "/system.slice/statemesh-atls.service"])
    cgroups = {sleepers[0]: "/system.slice/statemesh-atls.service"}
    assert left(fakebus, cgroups) == []
    fakebus.systemd.add("cron.service", control_groups=[""])  # idle, loaded
    assert left(fakebus, {sleepers[1]: "/system.slice/cron.service"}) == [
        f"in no unit systemd owns (/system.slice/cron.service): pid {sleepers[1]} (sleep 61)"]


def test_the_installation_is_excused_but_not_a_shell_beside_it(
        fakebus: FakeBus, sleepers: List[int], tmp_path: Path) -> None:
    """`systemd-run --unit=inst sh -c 'REVSHELL & exec apt-get install ...'`: apt and its
    session are the installation's; the shell in the same unit is not."""
    fakebus.systemd.add("inst.service", active_state="active", transient=True)
    fakebus.systemd.add("session-4.scope", active_state="active", transient=True)
    apt, shell, session_process = sleepers
    cgroups = {apt: "/system.slice/inst.service", shell: "/system.slice/inst.service",
               session_process: "/user.slice/user-0.slice/session-4.scope"}
    files = None

    def installation(process: leftrunning.Process) -> bool:
        return process.pid == apt or process.unit == "session-4.scope"

    assert left(fakebus, cgroups, files, installation) == [
        f"inst.service (started by hand): pid {shell} (sleep 61)"]
    # Nothing excused (status, once installed): the session's scope is named too.
    assert len(left(fakebus, cgroups, files)) == 2


ON_REQUEST = "(started on request: nothing the boot starts pulls it in or triggers it)"


def test_a_packaged_service_nothing_pulls_in_was_started_on_request(
        fakebus: FakeBus, sleepers: List[int]) -> None:
    """`systemctl start systemd-nspawn@box` (a container, root's) and a timer started the
    same way: packaged units, not transient, and no boot would start them; nor a service
    wanted only by a target started by hand (machines.target, not enabled)."""
    fake = fakebus.systemd
    fake.add("systemd-nspawn@box.service", active_state="active", wanted_by=[])
    fake.add("fstrim.timer", active_state="active", wanted_by=[])
    fake.add("machines.target", active_state="active", wanted_by=[])
    fake.add("systemd-nspawn@other.service", active_state="active",
             wanted_by=["machines.target"])
    box, other, _ = sleepers
    cgroups = {box: "/system.slice/systemd-nspawn@box.service",
               other: "/system.slice/systemd-nspawn@other.service"}
    assert left(fakebus, cgroups) == [
        f"fstrim.timer {ON_REQUEST}: nothing runs in it now; it may start again",
        f"systemd-nspawn@box.service {ON_REQUEST}: pid {box} (sleep 60)",
        f"systemd-nspawn@other.service {ON_REQUEST}: pid {other} (sleep 61)"]
    # Booted into machines.target (systemd.unit= on the kernel's command line), the boot
    # brought it and what it wants up.
    cmdline = Path(tempfile.mkdtemp()) / "cmdline"
    cmdline.write_text("root=/dev/vda1 systemd.unit=rescue.target systemd.unit=machines.target\n")

    async def brought_up(unit: str) -> bool:
        async with systemd.manager() as manager:
            chain = await pulledin.BootChain.of(manager, cmdline)
            return await chain.brought_up(unit)
    assert fakebus.call(brought_up("systemd-nspawn@other.service"))
    assert not fakebus.call(brought_up("systemd-nspawn@box.service"))


def test_what_the_machine_brings_up_itself_is_not_on_request(
        fakebus: FakeBus, sleepers: List[int]) -> None:
    """Pulled in by the boot through a chain of units, triggered by a socket the boot
    listens on, activated over D-Bus, wanted by a present device (udev), a user's service
    manager logind keeps: none is named. Two units that want each
    other and nothing else are named, and the walk ends."""
    fake = fakebus.systemd
    fake.add("basic.target", active_state="active", wanted_by=[], file_state="static")
    fake.add("sockets.target", active_state="active", wanted_by=["basic.target"])
    fake.add("dbus.socket", active_state="active", wanted_by=["sockets.target"])
    fake.add("dbus.service", active_state="active", wanted_by=[], triggered_by=["dbus.socket"])
    fake.add("polkit.service", active_state="active", wanted_by=[],
             bus_name="org.freedesktop.PolicyKit1")
    fake.add("sys-subsystem-net-devices-eth0.device", active_state="active", wanted_by=[])
    # ifupdown's udev hotplug helper runs `systemctl --no-block start ifup@eth0.service`:
    # nothing wants it, it is bound to its interface.
    fake.add("ifup@eth0.service", active_state="active", wanted_by=[],
             binds_to=["sys-subsystem-net-devices-eth0.device"])
    fake.add("apt-news.service", active_state="active", wanted_by=[])  # ubuntu-pro's APT hook
    fake.add("user@0.service", active_state="active", wanted_by=[])
    fake.add("a.service", active_state="active", wanted_by=["b.service"])
    fake.add("b.service", active_state="active", wanted_by=["a.service"])
    fake.units["basic.target"].wanted_by = ["multi-user.target"]  # RequiredBy in systemd
    names = ("dbus.service", "polkit.service", "ifup@eth0.service", "apt-news.service")
    assert left(fakebus, {pid: f"/system.slice/{name}"
                          for pid, name in zip(sleepers, names)}) == []
    assert left(fakebus, {sleepers[0]: "/system.slice/apt-news.service"}) == []
    # What the boot pulled in through a unit that has ended since (skipped by its
    # condition) is the boot's; a service wanted by a device that is not there is not.
    fake.add("local-fs.target", active_state="active", wanted_by=["multi-user.target"])
    fake.add("systemd-fsck-root.service", wanted_by=["local-fs.target"])
    fake.add("systemd-fsckd.socket", active_state="active",
             wanted_by=["systemd-fsck-root.service"])
    fake.add("sys-subsystem-net-devices-eth9.device", wanted_by=[])
    fake.add("ifup@eth9.service", active_state="active", wanted_by=[],
             binds_to=["sys-subsystem-net-devices-eth9.device"])
    assert left(fakebus, {sleepers[0]: "/system.slice/ifup@eth9.service"}) == [
        f"ifup@eth9.service {ON_REQUEST}: pid {sleepers[0]} (sleep 60)"]
    # root's service manager: logind's while root has a session (or a moment after the
    # last one, while logind stops it) or lingers; with neither, started by hand.
    cgroups = {sleepers[0]: "/system.slice/user@0.service/init.scope",
               sleepers[1]: "/system.slice/a.service", sleepers[2]: "/system.slice/b.service"}
    on_request = [f"a.service {ON_REQUEST}: pid {sleepers[1]} (sleep 61)",
                  f"b.service {ON_REQUEST}: pid {sleepers[2]} (sleep 62)"]
    fakebus.logind.add(FakeSession("3", uid=0, scope="session-3.scope"))
    assert left(fakebus, cgroups) == on_request
    fakebus.logind.remove("3")
    assert left(fakebus, cgroups) == on_request + [
        f"user@0.service {ON_REQUEST}: pid {sleepers[0]} (sleep 60)"]
    fakebus.logind.lingering.add(0)
    assert left(fakebus, cgroups) == on_request
    # Where a boot was told to start elsewhere: the last systemd.unit= counts.
    assert pulledin.command_line_target("quiet systemd.unit=a.target systemd.unit=b.target") \
        == {"b.target"}
    assert pulledin.command_line_target("quiet") == set()


def test_a_unit_made_to_want_it_vouches_for_nothing_that_would_not_start_at_boot(
        fakebus: FakeBus, sleepers: List[int]) -> None:
    """`systemd-run -p Wants=... -p BusName=x.y true` (transient, active, no processes),
    and `systemd-run --scope -p Wants=... apt-get install`: gone at the next boot, neither
    brings up what it wants; a packaged service that wants it, active only because it has
    a bus name, does not either."""
    fake = fakebus.systemd
    fake.add("anchor.service", active_state="active", transient=True, wanted_by=[],
             bus_name="x.y")
    fake.add("run-u9.scope", active_state="active", transient=True, wanted_by=[])
    fake.add("busy.service", active_state="active", wanted_by=[], bus_name="org.example.Busy")
    fake.add("systemd-nspawn@a.service", active_state="active", wanted_by=["anchor.service"])
    fake.add("systemd-nspawn@b.service", active_state="active", wanted_by=["run-u9.scope"])
    fake.add("systemd-nspawn@c.service", active_state="active", wanted_by=["busy.service"])
    names = ("systemd-nspawn@a.service", "systemd-nspawn@b.service", "systemd-nspawn@c.service")
    found = left(fakebus, {pid: f"/system.slice/{name}" for pid, name in zip(sleepers, names)})
    assert [entry.split(" (")[0] for entry in found] == list(names), found
    assert all(ON_REQUEST in entry for entry in found), found
    # Judged first (its name sorts first) and running: it vouches for itself, not for c.
    cgroups = {sleepers[0]: "/system.slice/busy.service",
               sleepers[1]: "/system.slice/systemd-nspawn@c.service"}
    assert left(fakebus, cgroups) == [
        f"systemd-nspawn@c.service {ON_REQUEST}: pid {sleepers[1]} (sleep 61)"]
    # ifup@ bound to its interface is udev's; another unit bound to a device is not.
    fake.add("sys-subsystem-net-devices-eth0.device", active_state="active", wanted_by=[])
    fake.add("ifup@eth0.service", active_state="active", wanted_by=[],
             binds_to=["sys-subsystem-net-devices-eth0.device"])
    fake.add("systemd-nspawn@d.service", active_state="active", wanted_by=["ifup@eth0.service"],
             binds_to=["sys-subsystem-net-devices-eth0.device"])
    cgroups = {sleepers[0]: "/system.slice/ifup@eth0.service",
               sleepers[1]: "/system.slice/systemd-nspawn@d.service"}
    assert left(fakebus, cgroups) == [
        f"systemd-nspawn@d.service {ON_REQUEST}: pid {sleepers[1]} (sleep 61)"]


def test_a_machine_with_nothing_by_hand_has_no_finding(fakebus: FakeBus, sleepers: List[int],
                                                        tmp_path: Path) -> None:
    """systemd's own init.scope is transient: PID 1 there is the manager, not a finding
    (found so in the VM: every installation was refused); another process there is."""
    fakebus.systemd.add("cron.service", active_state="active")
    fakebus.systemd.add("init.scope", active_state="active", transient=True)
    files = None
    cgroups = {1: "/init.scope", sleepers[0]: "/system.slice/cron.service"}
    assert left(fakebus, cgroups, files) == []
    assert leftrunning.refusal([]) == []
    cgroups[sleepers[1]] = "/init.scope"
    assert left(fakebus, cgroups, files) == [
        f"init.scope (started by hand): pid {sleepers[1]} (sleep 61)"]


def test_a_zombie_leader_whose_threads_run_on_is_judged() -> None:
    """Its main thread gone (pthread_exit), the process shows as a zombie and still runs."""
    code = ("import ctypes, threading, time; threading.Thread(target=time.sleep, args=(60,))"
            ".start(); ctypes.CDLL(None).pthread_exit(None)")
    process = subprocess.Popen(["/usr/bin/python3", "-c", code], start_new_session=True)
    try:
        for _ in range(200):
            if open(f"/proc/{process.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.02)
        assert leftrunning._parent_and_flags(process.pid) == (0, 0)
        judged = leftrunning.userland(placed({process.pid: "/system.slice/x.service"}))
        assert [p.pid for p in judged] == [process.pid]
    finally:
        process.kill()
        process.wait()


MOUNTINFO = """\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
24 23 0:36 / /proc/sys/fs/binfmt_misc rw,relatime shared:13 - autofs systemd-1 rw
91 23 0:21 /1 /proc/4242 rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
92 23 0:21 /2/task /proc/4243/task rw,relatime shared:12 - proc proc rw
"""


def test_a_mount_that_hides_a_process_in_proc_is_named(fakebus: FakeBus, tmp_path: Path) -> None:
    """Bound over /proc/PID, PID 1's or a kernel thread's directory stands in for whatever
    runs as PID: every reader of /proc judges that one instead."""
    assert leftrunning.hidden_by_mounts(MOUNTINFO) == [
        "hidden by a mount over /proc/4242, from every reader of /proc (umount /proc/4242)",
        "hidden by a mount over /proc/4243/task, from every reader of /proc "
        "(umount /proc/4243/task)"]
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(MOUNTINFO)

    async def ask() -> List[str]:
        async with systemd.manager() as manager:
            return await leftrunning.left_running(manager, cgroup_of=placed({}),
                                                  mountinfo=mountinfo)
    found = fakebus.call(ask())
    assert found[0].startswith("hidden by a mount over /proc/4242") and len(found) == 2


def test_a_unit_that_stops_while_it_is_asked_about_leaves_nothing_running(
        fakebus: FakeBus, sleepers: List[int]) -> None:
    """root's user manager, stopped by logind after `loginctl disable-linger root`: listed
    in user@0.service, gone with its unit by the time systemd is asked (no such unit left,
    or no cgroup). Found in CI: status said programs were left running when none were."""
    manager = sleepers[0]
    listed = "/user.slice/user-0.slice/user@0.service/init.scope"
    exits_after_listing = listings({manager: listed}, {})

    async def ask() -> List[str]:
        async with systemd.manager() as bus:
            return await leftrunning.left_running(bus, cgroup_of=exits_after_listing)
    assert fakebus.call(ask()) == []
    # Still there in a cgroup of a unit systemd no longer has: named.
    assert left(fakebus, {manager: listed}) == [
        f"in no unit systemd owns ({listed}): pid {manager} (sleep 60)"]


def listings(*placements: Dict[int, str]) -> leftrunning.CgroupOf:
    """A stand-in for /proc/PID/cgroup that changes between listings of every process: the
    n-th read of a pid answers from the n-th placement (the last one from then on)."""
    reads: Dict[int, int] = {}

    def cgroup_of(pid: int) -> str:
        reads[pid] = reads.get(pid, 0) + 1
        return placements[min(reads[pid], len(placements)) - 1].get(pid, "")
    return cgroup_of


def test_a_process_that_moves_while_it_is_looked_at_is_named_where_it_went(
        fakebus: FakeBus, sleepers: List[int]) -> None:
    """A reverse shell that forks and exits (a new pid), or moves itself from one cgroup made
    by hand to another, between the listing and systemd's answers: judged where the last
    listing found it, never left out."""
    old, new, mover = sleepers
    cgroup_of = listings({old: "/made-by-hand", mover: "/system.slice/a.service"},
                         {new: "/made-by-hand", mover: "/system.slice/b.service"})

    async def ask() -> List[str]:
        async with systemd.manager() as bus:
            return await leftrunning.left_running(bus, cgroup_of=cgroup_of)
    assert fakebus.call(ask()) == [
        f"in no unit systemd owns (/made-by-hand, /system.slice/b.service): pid {new} "
        f"(sleep 61), pid {mover} (sleep 62)"]


@pytest.mark.parametrize("program, seconds, ppid, unit, own", [
    ("/usr/lib/systemd/systemd", 0.5, 1, "init.scope", True),  # the generators' executor
    ("/usr/lib/systemd/systemd", 600.0, 1, "init.scope", False),  # orphaned there by root
    ("/usr/lib/systemd/x (deleted)", 0.5, 1, "init.scope", False),  # a copy since deleted
    ("/usr/bin/sleep", 0.5, 1, "init.scope", False),
    ("/usr/lib/systemd/systemd", 0.5, 77, "init.scope", False),  # not PID 1's fork
    ("/usr/lib/systemd/systemd", 0.5, 1, "cron.service", False),
    ("/usr/lib/systemd/systemd", None, 1, "init.scope", False),  # gone meanwhile
])
def test_only_pid_1s_passing_forks_of_its_own_programs_in_its_scope_are_the_managers(
        program: str, seconds, ppid: int, unit: str, own: bool) -> None:
    """Root can write any process into init.scope and orphan it to PID 1: a program of
    systemd's running there for long, or from a file since deleted, is not the manager's."""
    assert leftrunning._managers_own(4242, ppid, unit, lambda pid: program,
                                     lambda pid: seconds) is own
    assert leftrunning._managers_own(1, 0, "init.scope", lambda pid: "", lambda pid: None)


def test_a_processs_age_and_executable_are_read_from_proc() -> None:
    assert proc.executable(os.getpid()) == os.path.realpath(sys.executable)
    assert proc.executable(2 ** 22 + 1) == "" and proc.age(2 ** 22 + 1) is None
    started = subprocess.Popen(["sleep", "30"])
    try:
        assert 0 <= proc.age(started.pid) < 10
    finally:
        started.kill()
        started.wait()
