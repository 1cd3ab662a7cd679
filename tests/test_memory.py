"""Nothing of RAM reaches a disk (statemesh.guarantees.memory) on a stand-in machine: files
under a temporary root, systemd on a private bus. The VM suite swaps on, hibernates and
crashes a process on a real node."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List

import pytest

from statemesh import journal, preflight
from statemesh.guarantees import memory
from statemesh.guarantees.unitmask import LockdownError
from tests.fakebus import FakeBus, debian12_units, fakebus  # noqa: F401 - fixture

SWAP_HEADER = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A machine's /proc and /sys files as the guarantee reads and writes them."""
    machine = tmp_path / "root"
    (machine / "proc/sys/kernel").mkdir(parents=True)
    (machine / "proc/sys/kernel/core_pattern").write_text("core\n")
    (machine / "proc/swaps").write_text(SWAP_HEADER)
    (machine / "sys/kernel").mkdir(parents=True)
    (machine / "sys/kernel/kexec_crash_loaded").write_text("0\n")
    (machine / "sys/kernel/kexec_loaded").write_text("0\n")
    (machine / "proc/sys/kernel/kexec_load_disabled").write_text("0\n")
    (machine / "etc/systemd").mkdir(parents=True)
    return machine


@pytest.fixture
def debian(fakebus: FakeBus) -> FakeBus:
    debian12_units(fakebus.systemd)
    fakebus.systemd.add("hibernate.target", file_state="static")
    fakebus.systemd.add("systemd-hibernate.service", file_state="static")
    return fakebus


def test_applied_it_holds_and_purge_gives_everything_back(debian: FakeBus, root: Path,
                                                          tmp_path: Path) -> None:
    book = journal.Journal(tmp_path / "state")
    unloaded: List[bool] = []
    guarantee = memory.Memory(root, unload_kernel=unloaded.append)
    (root / memory.CRASH_KERNEL_LOADED).write_text("1\n")
    (root / memory.KEXEC_LOADED).write_text("1\n")  # kexec -l before installing
    before = guarantee.check()
    assert not before.holds
    assert "core dumps are written (core_pattern 'core')" in before.detail
    assert "a crash kernel is loaded" in before.detail
    assert "a kernel is loaded for kexec (started, it would find all of RAM)" in before.detail
    assert ("loading a kernel for kexec is not turned off (kernel.kexec_load_disabled is not "
            "1)") in before.detail

    # The stand-in cannot unload: verify() must name what is still there.
    with pytest.raises(LockdownError, match="a crash kernel is loaded"):
        guarantee.apply(book)
    assert unloaded == [True, False]
    assert (root / memory.KEXEC_LOAD_DISABLED).read_text() == "1\n"
    (root / memory.CRASH_KERNEL_LOADED).write_text("0\n")
    (root / memory.KEXEC_LOADED).write_text("0\n")
    guarantee.apply(book)
    finding = guarantee.check()
    assert finding.holds, finding.detail
    assert "kernel.kexec_load_disabled = 1" in (root / memory.SYSCTL_DROPIN).read_text()
    assert (root / memory.CORE_PATTERN_FILE).read_text() == "|/bin/false\n"
    assert "AllowHibernation=no" in (root / memory.SLEEP_DROPIN).read_text()
    assert "kernel.core_pattern = |/bin/false" in (root / memory.SYSCTL_DROPIN).read_text()
    units = debian.systemd.units
    assert all(units[name].masked for name in memory.UNITS.names)

    record = book.restore_record()["memory"]
    assert record["core_pattern"] == "core"
    guarantee.revert(record)
    assert (root / memory.CORE_PATTERN_FILE).read_text() == "core\n"
    assert not (root / memory.SLEEP_DROPIN).exists()
    assert not (root / "etc/systemd/sleep.conf.d").exists()  # made by us, removed by us
    assert not (root / "etc/sysctl.d").exists()
    assert not any(units[name].masked for name in memory.UNITS.names if name in units)


def test_a_kernel_without_kexec_has_no_switch_to_set(debian: FakeBus, root: Path,
                                                      tmp_path: Path) -> None:
    (root / memory.KEXEC_LOAD_DISABLED).unlink()
    (root / memory.KEXEC_LOADED).unlink()
    guarantee = memory.Memory(root)
    guarantee.apply(journal.Journal(tmp_path / "state"))
    assert guarantee.check().holds
    assert not (root / memory.KEXEC_LOAD_DISABLED).exists()


def test_unloading_asks_the_kernel_with_kexec_file_loads_unload_flag(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No kexec-tools needed: the call, its flags, the machine's number."""
    calls = []

    class Syscall:
        restype = None

        def __call__(self, *args):
            calls.append([getattr(arg, "value", arg) for arg in args])
            return 0

    class Libc:
        syscall = Syscall()

    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name, use_errno: Libc())
    monkeypatch.setattr(memory.os, "uname", lambda: os.uname_result(
        ("Linux", "node", "6.1", "#1", "x86_64")))
    memory.unload_kexec_kernel(crash=True)
    memory.unload_kexec_kernel(crash=False)
    assert calls == [[320, -1, -1, 0, None, 0x3], [320, -1, -1, 0, None, 0x1]]


def test_a_plain_swap_fails_it_and_zram_does_not(debian: FakeBus, root: Path,
                                                 tmp_path: Path) -> None:
    guarantee = memory.Memory(root)
    guarantee.apply(journal.Journal(tmp_path / "state"))
    (root / "proc/swaps").write_text(
        SWAP_HEADER + "/dev/zram0  partition\t1048572\t0\t100\n"
        "/swapfile  file\t\t65532\t\t0\t\t-2\n")
    finding = guarantee.check()
    assert not finding.holds
    assert finding.detail == ("swap on /swapfile (not compressed RAM): workload pages reach "
                              "a disk")
    assert memory.plain_swaps(root / "proc/swaps") == ["/swapfile"]


def test_preflight_refuses_a_plain_swap(tmp_path: Path, fakebus: FakeBus) -> None:
    swaps = tmp_path / "swaps"
    swaps.write_text(SWAP_HEADER + "/dev/vda3  partition\t1048572\t0\t-2\n")
    report = preflight.check(tmp_path / "none", tmp_path / "none", tmp_path / "none",
                             tmp_path / "none", swaps, planted_problems=lambda environment: [])
    assert ("swap on /dev/vda3 is not compressed RAM: workload memory would reach a disk "
            "(swapoff it and remove it from /etc/fstab, or use zram)") in report.problems


@pytest.mark.usefixtures("returns_promptly")
def test_a_fifo_as_a_drop_in_fails_it_and_is_never_waited_on(root: Path) -> None:
    """The drop-ins' paths are root's to fill before installing: a FIFO there is not the
    drop-in written (it held the installation and status for ever)."""
    (root / memory.SLEEP_DROPIN).parent.mkdir(parents=True)
    os.mkfifo(root / memory.SLEEP_DROPIN)
    (root / memory.SYSCTL_DROPIN).parent.mkdir(parents=True)
    os.mkfifo(root / memory.SYSCTL_DROPIN)
    problems = memory.Memory(root)._problems()
    assert f"hibernation not turned off ({root / memory.SLEEP_DROPIN} missing)" in problems
    assert any(str(root / memory.SYSCTL_DROPIN) in problem for problem in problems), problems
