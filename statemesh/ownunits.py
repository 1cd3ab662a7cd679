"""The package's own units run what the package shipped, and nothing planted beside it.

An operator who is root before installing can prepare systemd so that a unit of ours is
"active" and does nothing: a drop-in that replaces the watchdog's ExecStart= with
`sleep infinity`, a same-named unit in /etc or /run that shadows the packaged one, a
`service.d/` or `statemesh-.service.d/` drop-in (systemd applies those to every unit, or
every unit whose name starts so), a generator that writes any of these at each boot. None
of it needs a terminal afterwards. systemd says, for each loaded unit, which file it was
built from (FragmentPath), which drop-ins it applied (DropInPaths) and whether the files on
disk changed since (NeedDaemonReload); that is read here over D-Bus, not from the file
system, so that whatever systemd runs is what is judged. A service's main process is also
compared with what its ExecStart= names: a process started from a planted definition keeps
running after the definition is removed.

No drop-in at all is accepted on these units (Debian and Ubuntu ship none that applies to
them): a package-owned drop-in is no better, since an operator can build and install a
package. The one exception is the watchdog's own drop-in, present only while purge stops it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import psutil

from statemesh import safefile, systemd
from statemesh.guarantees.base import Finding

SHIPPED_DIR = Path("/lib/systemd/system")
PACKAGE_UNITS = (
    "statemesh-node.target",
    "statemesh-storage.service",
    "statemesh-harden.service",
    "statemesh-firewall.service",
    "statemesh-watchdog.service",
    "statemesh-vtpm.service",
    "statemesh-state.socket",
    "statemesh-state.service",
    "statemesh-atls.service",
)
# statemesh.guarantees.watchdog.PURGE_DROPIN, named here so that reading units does not load
# the watchdog guarantee.
PURGE_DROPIN = "/run/systemd/system/statemesh-watchdog.service.d/50-statemesh-purge.conf"
# All it may say: a file of that name saying more is root's, planted.
PURGE_DROPIN_TEXT = b"[Unit]\nRefuseManualStop=no\n"
SERVICE = "org.freedesktop.systemd1.Service"
RUNNING = ("active", "activating", "reloading", "deactivating")
# What is read of each unit, and of a running one's service.
UNIT_PROPERTIES = ("LoadState", "FragmentPath", "DropInPaths", "NeedDaemonReload", "ActiveState")
SERVICE_PROPERTIES = ("MainPID", "ExecStart")
# A main process not running its unit's command is read again this often, this many times,
# before it is named (read_settled_units): 2 s in all, a service's start under emulation.
SETTLE_SECONDS = 0.25
SETTLE_READS = 8


@dataclasses.dataclass(frozen=True)
class LoadedUnit:
    """What systemd has loaded for one unit, and the main process it runs."""

    name: str
    load_state: str
    fragment: str
    dropins: Tuple[str, ...] = ()
    needs_reload: bool = False
    main_pid: int = 0
    exec_start: Tuple[str, ...] = ()  # the first ExecStart=: its path, then argv[1:]


def exec_start_argv(exec_start: Sequence[Sequence[Any]]) -> Tuple[str, ...]:
    """The first command of an ExecStart property (a(sasbttttuii)) as path + argv[1:]."""
    if not exec_start:
        return ()
    path, argv = exec_start[0][0], list(exec_start[0][1])
    return (path, *argv[1:])


def expected_cmdline(command: Sequence[str], read_head: Callable[[str], bytes]) -> List[str]:
    """What the kernel shows as the command line of `command` run by systemd: a script's
    interpreter (its #! line) comes first, then the script's path and its arguments."""
    head = read_head(command[0])
    if head.startswith(b"#!"):
        interpreter = head[2:].split(b"\n", 1)[0].decode(errors="replace").split()
        return [*interpreter, *command]
    return list(command)


def _read_head(path: str) -> bytes:
    """A file's first bytes; b"" when it cannot be read, a FIFO or a device too (never
    waited on: a drop-in's path is root's to fill before installing)."""
    try:
        with safefile.open_regular(path) as script:
            return script.read(256)
    except OSError:
        return b""


def _cmdline(pid: int) -> Optional[List[str]]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return None


def _exiting(pid: int) -> bool:
    """Gone, or a zombie with no thread left: a main process systemd has not reaped yet
    (its cmdline reads empty). A zombie leader whose other threads run on is not exiting."""
    try:
        process = psutil.Process(pid)
        return process.status() == psutil.STATUS_ZOMBIE and process.num_threads() <= 1
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def unit_problems(unit: LoadedUnit, shipped_dir: Path = SHIPPED_DIR,
                  cmdline: Callable[[int], Optional[List[str]]] = _cmdline,
                  read_head: Callable[[str], bytes] = _read_head,
                  exiting: Callable[[int], bool] = _exiting) -> List[str]:
    """Why `unit` is not what the package shipped (empty: it is)."""
    if unit.load_state != "loaded":
        return [f"{unit.name} is {unit.load_state}, not loaded from the package's file"]
    problems = []
    if os.path.realpath(unit.fragment) != os.path.realpath(shipped_dir / unit.name):
        problems.append(f"{unit.name} is loaded from {unit.fragment}, not the package's file")
    planted = [path for path in unit.dropins
               if path != PURGE_DROPIN or read_head(path) != PURGE_DROPIN_TEXT]
    if planted:
        problems.append(f"{unit.name} has drop-ins: {', '.join(planted)}")
    if unit.needs_reload:
        problems.append(f"{unit.name} changed on disk since systemd loaded it "
                        "(a daemon-reload would load the change)")
    running_wrong = main_process_problem(unit, cmdline, read_head, exiting)
    return problems + ([running_wrong] if running_wrong else [])


def main_process_problem(unit: LoadedUnit,
                         cmdline: Callable[[int], Optional[List[str]]] = _cmdline,
                         read_head: Callable[[str], bytes] = _read_head,
                         exiting: Callable[[int], bool] = _exiting) -> Optional[str]:
    """Why the unit's main process is not running what its ExecStart= names, if it is not."""
    if not unit.main_pid or not unit.exec_start:
        return None
    running = cmdline(unit.main_pid)
    expected = expected_cmdline(unit.exec_start, read_head)
    if running == expected or exiting(unit.main_pid):
        return None  # an exiting one ends as it was read (a service restarting), not planted
    named = " ".join(unit.exec_start)
    if running is None:
        return f"{unit.name} main process {unit.main_pid} cannot be read (is it {named!r}?)"
    return f"{unit.name} main process {unit.main_pid} runs {' '.join(running)!r}, not {named!r}"


async def loaded_unit(manager: systemd.Systemd, name: str) -> LoadedUnit:
    """One unit as systemd has it loaded (loading it if it is not)."""
    props = await manager.get_unit_properties(name, systemd.UNIT, UNIT_PROPERTIES)
    unit = LoadedUnit(name, str(props.get("LoadState", "")), str(props.get("FragmentPath", "")),
                      tuple(props.get("DropInPaths", ())), bool(props.get("NeedDaemonReload")))
    if (unit.load_state != "loaded" or props.get("ActiveState") not in RUNNING
            or not name.endswith(".service")):
        return unit
    service = await manager.get_unit_properties(name, SERVICE, SERVICE_PROPERTIES)
    return dataclasses.replace(unit, main_pid=int(service.get("MainPID", 0)),
                               exec_start=exec_start_argv(service.get("ExecStart", ())))


async def read_units(manager: systemd.Systemd,
                     names: Sequence[str] = PACKAGE_UNITS) -> List[LoadedUnit]:
    return await systemd.together(loaded_unit(manager, name) for name in names)


async def read_settled_units(manager: systemd.Systemd, names: Sequence[str] = PACKAGE_UNITS,
                             unsettled: Callable[[LoadedUnit], bool] = lambda unit: bool(
                                 main_process_problem(unit)),
                             pause: float = SETTLE_SECONDS) -> List[LoadedUnit]:
    """The units, each whose main process does not run its command read again a few times
    a short while apart, and kept as last read. A service being (re)started shows, between
    systemd's fork and the exec of its command, the forking program's command line
    (systemd-executor's on systemd 255 and later, which sets up the sandbox first): a
    start in progress, which is over long before the reads are, not a planted process."""
    units = await read_units(manager, names)
    for _ in range(SETTLE_READS):
        moving = [index for index, unit in enumerate(units) if unsettled(unit)]
        if not moving:
            break
        await asyncio.sleep(pause)
        for index in moving:
            units[index] = await loaded_unit(manager, units[index].name)
    return units


async def _read_all() -> List[LoadedUnit]:
    async with systemd.manager() as manager:
        return await read_settled_units(manager)


def problems(units: Sequence[LoadedUnit]) -> List[str]:
    return [problem for unit in units for problem in unit_problems(unit)]


def finding() -> Finding:
    """status's line for the package's units: each as shipped, nothing planted."""
    try:
        units = asyncio.run(_read_all())
    except systemd.SystemdError as error:
        return Finding("package_units", False, f"cannot ask systemd: {error}")
    found = problems(units)
    facts = {"units": [dataclasses.asdict(unit) for unit in units]}
    if found:
        return Finding("package_units", False, "; ".join(found), facts)
    return Finding("package_units", True,
                   f"{len(units)} units as the package shipped them, no drop-ins", facts)
