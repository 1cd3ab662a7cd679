"""The package's own units judged as systemd has them loaded (statemesh.ownunits): stand-in
units and processes here; the VM suite plants a drop-in and a stale main process on a node."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Set

import psutil
import pytest

from statemesh import ownunits
from statemesh.ownunits import LoadedUnit

SCRIPT = "/usr/bin/statemesh-node"
HEADS: Dict[str, bytes] = {SCRIPT: b"#!/usr/bin/python3\n# EASY-INSTALL-ENTRY-SCRIPT\n",
                           "/usr/bin/swtpm": b"\x7fELF\x02\x01\x01"}
EXITING: Set[int] = set()  # main processes gone, or zombies systemd has not reaped
RUNNING: Dict[int, Optional[List[str]]] = {
    10: ["/usr/bin/python3", SCRIPT, "watchdog"],
    11: ["sleep", "infinity"],
    12: ["/usr/bin/swtpm", "socket", "--tpm2"],
    13: None,  # gone, or not readable
}


def problems(unit: LoadedUnit, shipped: Path = Path("/lib/systemd/system")) -> List[str]:
    return ownunits.unit_problems(unit, shipped, RUNNING.get, lambda path: HEADS.get(path, b""),
                                  exiting=lambda pid: pid in EXITING)


def watchdog(**fields) -> LoadedUnit:
    values = dict(name="statemesh-watchdog.service", load_state="loaded",
                  fragment="/lib/systemd/system/statemesh-watchdog.service",
                  main_pid=10, exec_start=(SCRIPT, "watchdog"))
    values.update(fields)
    return LoadedUnit(**values)


def test_a_unit_as_shipped_running_its_own_command_has_no_problem() -> None:
    assert problems(watchdog()) == []
    swtpm = LoadedUnit("statemesh-vtpm.service", "loaded",
                       "/lib/systemd/system/statemesh-vtpm.service", main_pid=12,
                       exec_start=("/usr/bin/swtpm", "socket", "--tpm2"))
    assert problems(swtpm) == []
    # A oneshot that has finished has no main process to compare.
    assert problems(watchdog(main_pid=0)) == []


def test_the_fragment_is_compared_after_resolving_links(tmp_path: Path) -> None:
    (tmp_path / "usr/lib/systemd/system").mkdir(parents=True)
    (tmp_path / "lib").symlink_to("usr/lib")  # merged /usr, as on Debian 13
    fragment = str(tmp_path / "usr/lib/systemd/system/statemesh-watchdog.service")
    assert problems(watchdog(fragment=fragment), tmp_path / "lib/systemd/system") == []


@pytest.mark.parametrize("fields, problem", [
    (dict(fragment="/etc/systemd/system/statemesh-watchdog.service"),
     "statemesh-watchdog.service is loaded from /etc/systemd/system/statemesh-watchdog.service, "
     "not the package's file"),
    (dict(dropins=("/etc/systemd/system/service.d/zz.conf",)),
     "statemesh-watchdog.service has drop-ins: /etc/systemd/system/service.d/zz.conf"),
    (dict(needs_reload=True),
     "statemesh-watchdog.service changed on disk since systemd loaded it "
     "(a daemon-reload would load the change)"),
    (dict(main_pid=11),
     "statemesh-watchdog.service main process 11 runs 'sleep infinity', "
     "not '/usr/bin/statemesh-node watchdog'"),
    (dict(main_pid=13),
     "statemesh-watchdog.service main process 13 cannot be read "
     "(is it '/usr/bin/statemesh-node watchdog'?)"),
    (dict(load_state="masked"),
     "statemesh-watchdog.service is masked, not loaded from the package's file"),
])
def test_what_was_planted_is_named(fields: dict, problem: str) -> None:
    assert problems(watchdog(**fields)) == [problem]


@pytest.mark.usefixtures("returns_promptly")
def test_a_fifo_as_the_purge_dropin_is_named_and_never_waited_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The purge drop-in's path is root's to fill before installing: a FIFO there is no
    drop-in of ours (preflight and status waited on it for ever)."""
    dropin = str(tmp_path / "50-statemesh-purge.conf")
    os.mkfifo(dropin)
    monkeypatch.setattr(ownunits, "PURGE_DROPIN", dropin)
    assert ownunits.unit_problems(
        watchdog(dropins=(dropin,)), Path("/lib/systemd/system"), RUNNING.get,
        lambda path: ownunits._read_head(path) if path == dropin else HEADS.get(path, b""),
        exiting=lambda pid: pid in EXITING) == [
        f"statemesh-watchdog.service has drop-ins: {dropin}"]


def test_only_the_purge_dropin_of_the_watchdog_is_ours() -> None:
    """By its name and its bytes: a file of that name that says more was planted."""
    HEADS[ownunits.PURGE_DROPIN] = ownunits.PURGE_DROPIN_TEXT
    try:
        assert problems(watchdog(dropins=(ownunits.PURGE_DROPIN,))) == []
        HEADS[ownunits.PURGE_DROPIN] += b"[Service]\nEnvironment=LD_PRELOAD=/root/x.so\n"
        assert problems(watchdog(dropins=(ownunits.PURGE_DROPIN,))) == [
            f"statemesh-watchdog.service has drop-ins: {ownunits.PURGE_DROPIN}"]
    finally:
        del HEADS[ownunits.PURGE_DROPIN]
    from statemesh.guarantees import watchdog as watchdog_guarantee
    assert ownunits.PURGE_DROPIN == str(watchdog_guarantee.PURGE_DROPIN)


def test_a_process_that_only_ends_with_the_command_is_not_it() -> None:
    """`bash -c 'sleep infinity' /usr/bin/statemesh-node watchdog` ends with the right words."""
    RUNNING[14] = ["/bin/bash", "-c", "sleep infinity", SCRIPT, "watchdog"]
    try:
        assert problems(watchdog(main_pid=14))[0].startswith(
            "statemesh-watchdog.service main process 14 runs '/bin/bash -c")
    finally:
        del RUNNING[14]


def test_a_main_process_exiting_as_it_is_read_is_not_planted() -> None:
    """A service restarting (the aTLS endpoint while its port is taken): its main process is
    a zombie systemd has not reaped, and its cmdline reads empty."""
    RUNNING[15] = []
    EXITING.add(15)
    try:
        assert problems(watchdog(main_pid=15)) == []
        EXITING.discard(15)
        assert problems(watchdog(main_pid=15)) == [
            "statemesh-watchdog.service main process 15 runs '', "
            "not '/usr/bin/statemesh-node watchdog'"]
    finally:
        del RUNNING[15]


def test_a_zombie_is_exiting_and_a_live_process_is_not() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        assert not ownunits._exiting(child.pid)
        child.kill()
        for _ in range(100):  # dead, not reaped: a zombie
            if psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.01)
        assert ownunits._exiting(child.pid)
    finally:
        child.kill()
        child.wait()
    assert ownunits._exiting(child.pid)  # reaped: gone


def test_exec_start_property_shape() -> None:
    """ExecStart over D-Bus is a(sasbttttuii): path, argv (argv[0] as written), flags, times."""
    raw = [[SCRIPT, ["statemesh-node", "watchdog"], False, 0, 0, 0, 0, 0, 0, 0]]
    assert ownunits.exec_start_argv(raw) == (SCRIPT, "watchdog")
    assert ownunits.exec_start_argv([]) == ()


class RestartingManager:
    """systemd as `read_settled_units` asks it: the watchdog's main process is first a
    process between fork and exec (systemd-executor's command line), then its command."""

    def __init__(self, main_pids: List[int]):
        self.main_pids = main_pids
        self.reads = 0

    async def get_unit_properties(self, name: str, interface: str, names) -> dict:
        if interface != ownunits.SERVICE:
            return {"LoadState": "loaded", "ActiveState": "active",
                    "FragmentPath": f"/lib/systemd/system/{name}", "DropInPaths": []}
        pid = self.main_pids[min(self.reads, len(self.main_pids) - 1)]
        self.reads += 1
        return {"MainPID": pid, "ExecStart": [[SCRIPT, ["statemesh-node", "watchdog"]]]}


def settled(manager: RestartingManager) -> List[LoadedUnit]:
    import asyncio
    return asyncio.run(ownunits.read_settled_units(
        manager, ["statemesh-watchdog.service"], pause=0,
        unsettled=lambda unit: bool(problems(unit))))


def test_a_unit_seen_between_fork_and_exec_is_judged_on_a_later_read() -> None:
    """The watchdog restarting on Debian 13: its new main process first runs
    systemd-executor, then the command. A planted process stays what it is, and is named."""
    RUNNING[16] = ["/usr/lib/systemd/systemd-executor", "--deserialize", "51"]
    try:
        starting = RestartingManager([16, 16, 10])
        assert [problems(unit) for unit in settled(starting)] == [[]]
        assert starting.reads == 3
        planted = RestartingManager([11])
        [unit] = settled(planted)
        assert problems(unit) == ["statemesh-watchdog.service main process 11 runs "
                                  "'sleep infinity', not '/usr/bin/statemesh-node watchdog'"]
        assert planted.reads == 1 + ownunits.SETTLE_READS
    finally:
        del RUNNING[16]
