"""Units started by hand before installing: every one is named, but logind's sessions, the
installation's own unit and slices; a scope merely named like a session is not excused."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict, Iterator

import pytest

from statemesh import leftrunning


@pytest.fixture
def sleeper() -> Iterator[int]:
    """A live process to stand for what runs in a unit."""
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield process.pid
    process.kill()
    process.wait()


def transient(tmp_path: Path, *units: str) -> Path:
    directory = tmp_path / "transient"
    directory.mkdir()
    for unit in units:
        (directory / unit).write_text("# This is a transient unit file\n")
    return directory


def placed(cgroups: Dict[int, str]):
    """A stand-in for /proc/PID/cgroup: these pids in these cgroups, every other in none."""
    return lambda pid: cgroups.get(pid, "")


def test_a_unit_started_by_hand_is_named_with_what_it_runs(tmp_path: Path, sleeper: int) -> None:
    directory = transient(tmp_path, "way-back.service", "user-0.slice", "session-3.scope",
                          "session-99.scope", "run-u7.service")
    cgroups = {sleeper: "/system.slice/way-back.service",
               os.getpid(): "/user.slice/user-0.slice/session-3.scope"}
    found = leftrunning.problems(["3"], [os.getpid()], directory, placed(cgroups))
    assert len(found) == 1, found
    problem = found[0]
    assert problem.startswith("units started by hand (systemd-run), which would keep running "
                              "as root after the lockdown: ")
    assert f"way-back.service: pid {sleeper} (sleep 60)" in problem
    # Stopped now, but loaded: it may be started again (a Restart= with a long delay).
    assert "run-u7.service (nothing runs in it now; it may start again)" in problem
    # logind does not know session 99: a scope named so by `systemd-run --scope` is refused.
    assert "session-99.scope" in problem
    assert "session-3.scope" not in problem and "user-0.slice" not in problem
    assert problem.endswith("(systemctl stop them; systemctl reset-failed)")


def test_the_unit_the_installation_runs_in_is_its_own(tmp_path: Path, sleeper: int) -> None:
    directory = transient(tmp_path, "bg-install.service", "listener.service")
    parent = os.getppid()
    cgroups = {parent: "/system.slice/bg-install.service",
               os.getpid(): "/system.slice/bg-install.service",
               sleeper: "/system.slice/listener.service/payload"}  # a sub-cgroup counts
    found = leftrunning.problems([], [os.getpid(), parent], directory, placed(cgroups))
    assert len(found) == 1 and "bg-install" not in found[0], found
    assert f"listener.service: pid {sleeper} (sleep 60)" in found[0]


def test_no_transient_unit_no_problem(tmp_path: Path) -> None:
    assert leftrunning.problems([], [os.getpid()], tmp_path / "none") == []
    assert leftrunning.problems(["1"], [], transient(tmp_path, "user-0.slice",
                                                      "session-1.scope")) == []
