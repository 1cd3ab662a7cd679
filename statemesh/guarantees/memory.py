"""Nothing of RAM reaches a disk: no hibernation, no core dump, no crash dump, no plain swap.

The volume key exists only in the kernel and the workload's data only in RAM and on the
encrypted volume. Four ways of the kernel's would copy either to a disk that the operator
can read once it is out of the machine:
- hibernation (`systemctl hibernate`, logind's Hibernate key, hybrid sleep, suspend then
  hibernate) writes all of RAM, the key included, to swap: the sleep targets and services
  that hibernate are masked, and a sleep.conf drop-in tells systemd-sleep and logind that
  hibernation is not allowed, so neither a key press nor a D-Bus call can start it;
- a core dump writes a crashing process's memory to its working directory (the kernel's
  default pattern, "core") or under /var (systemd-coredump): the kernel's core_pattern
  becomes a pipe to /bin/false, which reads nothing, now and at every boot (sysctl.d, and
  the harden unit re-asserts it);
- kdump boots a crash kernel that saves all of RAM under /var/crash: kdump-tools is masked
  and a crash kernel already loaded is unloaded;
- swap receives workload pages: any swap but compressed RAM (zram) makes this guarantee
  fail and preflight refuse. Swapping it off would take memory the operator sized the
  machine with; a swap encrypted with a key that is random at every boot is safe, but the
  kernel cannot tell it from one whose key the operator knows.
Everything changed is recorded and given back at purge (suspend to RAM is left alone: RAM
stays RAM).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from statemesh import safefile
from statemesh.guarantees.base import HARDEN_UNIT, Finding, Way
from statemesh.guarantees.unitmask import (BusGuarantee, UnitSet, give_back, lock, snapshot,
                                           unlocked, unlocked_problems)
from statemesh.run import have, run
from statemesh.systemd import Systemd

UNITS = UnitSet(("hibernate.target", "hybrid-sleep.target", "suspend-then-hibernate.target",
                 "systemd-hibernate.service", "systemd-hybrid-sleep.service",
                 "systemd-suspend-then-hibernate.service", "kdump-tools.service"))
SLEEP_DROPIN = Path("etc/systemd/sleep.conf.d/50-statemesh-node.conf")
SLEEP_SETTINGS = """\
# Written by statemesh-node (removed at purge): hibernating writes RAM to disk.
[Sleep]
AllowHibernation=no
AllowHybridSleep=no
AllowSuspendThenHibernate=no
"""
CORE_PATTERN = "|/bin/false"
SYSCTL_DROPIN = Path("etc/sysctl.d/90-statemesh-node.conf")
SYSCTL_SETTINGS = f"""\
# Written by statemesh-node (removed at purge): a core dump writes process memory to disk.
kernel.core_pattern = {CORE_PATTERN}
"""
CORE_PATTERN_FILE = Path("proc/sys/kernel/core_pattern")
CRASH_KERNEL_LOADED = Path("sys/kernel/kexec_crash_loaded")
SWAPS = Path("proc/swaps")


def swaps(path: Path) -> List[str]:
    """The active swap areas (/proc/swaps without its header)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()[1:]
    except OSError:
        return []
    return [line.split()[0] for line in lines if line.strip()]


def plain_swaps(path: Path = Path("/") / SWAPS) -> List[str]:
    """Active swap areas that are not compressed RAM: workload pages would reach a disk."""
    return [area for area in swaps(path) if not area.startswith("/dev/zram")]


def _read(path: Path) -> str:
    """The file's text; "" when it cannot be read, a FIFO or a device left by root before
    installing too (never waited on)."""
    try:
        return safefile.read_text(path)
    except OSError:
        return ""


class Memory(BusGuarantee):
    """No hibernation, no core dump, no crash kernel, no swap but zram."""

    name = "memory"
    boot_unit = HARDEN_UNIT
    tamper_watched = True
    holds_workload_data = False
    kept_by_upgrades_while_holding = False

    def __init__(self, root: Path = Path("/"),
                 unload_crash_kernel: Optional[Callable[[], None]] = None):
        self.root = root
        self.sleep_dropin = root / SLEEP_DROPIN
        self.sysctl_dropin = root / SYSCTL_DROPIN
        self.core_pattern = root / CORE_PATTERN_FILE
        self.unload_crash_kernel = unload_crash_kernel or _unload_crash_kernel

    def ways_in(self) -> Sequence[Way]:
        return ()  # trying to hibernate a live node is no test to run on it

    def _problems(self) -> List[str]:
        problems = []
        if _read(self.sleep_dropin) != SLEEP_SETTINGS:
            problems.append(f"hibernation not turned off ({self.sleep_dropin} missing)")
        pattern = _read(self.core_pattern).strip()
        if pattern != CORE_PATTERN:
            problems.append(f"core dumps are written (core_pattern {pattern!r})")
        if _read(self.sysctl_dropin) != SYSCTL_SETTINGS:
            problems.append(f"core dumps not turned off for the next boot ({self.sysctl_dropin} "
                            "missing)")
        if _read(self.root / CRASH_KERNEL_LOADED).strip() == "1":
            problems.append("a crash kernel is loaded (kdump would save RAM to disk)")
        problems += [f"swap on {area} (not compressed RAM): workload pages reach a disk"
                     for area in plain_swaps(self.root / SWAPS)]
        return problems

    async def inspect(self, manager: Systemd) -> Finding:
        left = await unlocked(manager, UNITS)
        problems = unlocked_problems(left) + self._problems()
        detail = "; ".join(problems) or ("no hibernation, core dumps to /bin/false, "
                                         "no crash kernel, no swap but zram")
        return Finding(self.name, not problems, detail, left)

    async def enforce(self, manager: Systemd, journal: Any) -> None:
        journal.remember(self.name, {
            **await snapshot(manager, UNITS),
            "core_pattern": _read(self.core_pattern).strip(),
            "new_dirs": [str(d) for d in (self.sleep_dropin.parent, self.sysctl_dropin.parent)
                         if not d.is_dir()],
        })
        journal.record("memory-locked", **await lock(manager, UNITS))
        for dropin, settings in ((self.sleep_dropin, SLEEP_SETTINGS),
                                 (self.sysctl_dropin, SYSCTL_SETTINGS)):
            dropin.parent.mkdir(parents=True, exist_ok=True)
            dropin.write_text(settings, encoding="utf-8")
        self.core_pattern.write_text(CORE_PATTERN + "\n", encoding="utf-8")
        if _read(self.root / CRASH_KERNEL_LOADED).strip() == "1":
            self.unload_crash_kernel()
            journal.record("crash-kernel-unloaded")
        await self.verify(manager)

    async def restore(self, manager: Systemd, record: Dict[str, Any]) -> List[str]:
        errors = await give_back(manager, record, self.name)
        for dropin in (self.sleep_dropin, self.sysctl_dropin):
            dropin.unlink(missing_ok=True)
        for directory in record.get("new_dirs", []):
            with contextlib.suppress(OSError):
                Path(directory).rmdir()
        if record.get("core_pattern"):
            try:
                self.core_pattern.write_text(record["core_pattern"] + "\n", encoding="utf-8")
            except OSError as error:
                errors.append(f"core_pattern: {error.strerror}")
        return errors


def _unload_crash_kernel() -> None:
    """kexec-tools loaded it (kdump-tools); without kexec, verify() names the loaded kernel."""
    if have("kexec"):
        run(["kexec", "-p", "-u"])
