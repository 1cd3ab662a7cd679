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
  and a crash kernel already loaded is unloaded; so is a kernel loaded for kexec, which
  would start with all of RAM, the volume key included, in reach (kexec -l before
  installing, kexec -e after), and loading another is turned off until the next boot
  (kernel.kexec_load_disabled, which cannot be turned on again; the sysctl drop-in sets it
  at every boot);
- swap receives workload pages: any swap but compressed RAM (zram) makes this guarantee
  fail and preflight refuse. Swapping it off would take memory the operator sized the
  machine with; a swap encrypted with a key that is random at every boot is safe, but the
  kernel cannot tell it from one whose key the operator knows.
Everything changed is recorded and given back at purge (suspend to RAM is left alone: RAM
stays RAM).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
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
# Written by statemesh-node (removed at purge): a core dump writes process memory to disk,
# and a kernel started with kexec would find all of RAM.
kernel.core_pattern = {CORE_PATTERN}
-kernel.kexec_load_disabled = 1
"""
CORE_PATTERN_FILE = Path("proc/sys/kernel/core_pattern")
CRASH_KERNEL_LOADED = Path("sys/kernel/kexec_crash_loaded")
KEXEC_LOADED = Path("sys/kernel/kexec_loaded")
KEXEC_LOAD_DISABLED = Path("proc/sys/kernel/kexec_load_disabled")
# kexec_file_load(2) by machine, and its flags: unloading needs no kexec-tools.
_KEXEC_FILE_LOAD = {"x86_64": 320, "aarch64": 294, "riscv64": 294, "s390x": 381,
                    "ppc64le": 382}
KEXEC_FILE_UNLOAD, KEXEC_FILE_ON_CRASH = 0x1, 0x2
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
                 unload_kernel: Optional[Callable[[bool], None]] = None):
        self.root = root
        self.sleep_dropin = root / SLEEP_DROPIN
        self.sysctl_dropin = root / SYSCTL_DROPIN
        self.core_pattern = root / CORE_PATTERN_FILE
        self.kexec_disabled = root / KEXEC_LOAD_DISABLED
        self.unload_kernel = unload_kernel or unload_kexec_kernel

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
        if _read(self.root / KEXEC_LOADED).strip() == "1":
            problems.append("a kernel is loaded for kexec (started, it would find all of RAM)")
        if self.kexec_disabled.exists() and _read(self.kexec_disabled).strip() != "1":
            problems.append("loading a kernel for kexec is not turned off "
                            "(kernel.kexec_load_disabled is not 1)")
        problems += [f"swap on {area} (not compressed RAM): workload pages reach a disk"
                     for area in plain_swaps(self.root / SWAPS)]
        return problems

    async def inspect(self, manager: Systemd) -> Finding:
        left = await unlocked(manager, UNITS)
        problems = unlocked_problems(left) + self._problems()
        detail = "; ".join(problems) or ("no hibernation, core dumps to /bin/false, "
                                         "no crash kernel, kexec off, no swap but zram")
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
        for loaded, crash in ((CRASH_KERNEL_LOADED, True), (KEXEC_LOADED, False)):
            if _read(self.root / loaded).strip() == "1":
                self.unload_kernel(crash)
                journal.record("crash-kernel-unloaded" if crash else "kexec-kernel-unloaded")
        if self.kexec_disabled.exists():  # last: once set, nothing can be unloaded either
            self.kexec_disabled.write_text("1\n", encoding="utf-8")
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


def unload_kexec_kernel(crash: bool) -> None:
    """Unload the kernel kexec would start (kdump's crash kernel, with `crash`) through
    kexec_file_load's unload flag, which takes whatever kexec_load or kexec_file_load
    loaded; kexec-tools where the machine's call is not known. What is still loaded
    afterwards, verify() names."""
    number = _KEXEC_FILE_LOAD.get(os.uname().machine)
    if number is None:
        if have("kexec"):
            run(["kexec", "-p", "-u"] if crash else ["kexec", "-u"])
        return
    flags = KEXEC_FILE_UNLOAD | (KEXEC_FILE_ON_CRASH if crash else 0)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.syscall(ctypes.c_long(number), ctypes.c_int(-1), ctypes.c_int(-1), ctypes.c_ulong(0),
                 None, ctypes.c_ulong(flags))
