"""The watchdog guarantee: statemesh-watchdog.service is enabled at every boot and running.

Apart from the daemon (statemesh.watchdog.daemon) that the unit runs: this module only
reads the unit's state and starts, hands over or stops it through systemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from statemesh import grace, proc, systemd
from statemesh.config import NodeConfig
from statemesh.guarantees import unitprocs
from statemesh.guarantees.base import Finding, Probe, Step, Way
from statemesh.ownunits import PURGE_DROPIN_TEXT
from statemesh.watchdog import devicefilter, terminals

UNIT = "statemesh-watchdog.service"
FILTER_OPTION = "--terminal-filter"  # in the command line of a watchdog that attaches it
FILTER_REREAD_SECONDS = 0.2
# A runtime drop-in lifts RefuseManualStop for purge only; /run is gone at the next boot.
PURGE_DROPIN = Path(f"/run/systemd/system/{UNIT}.d/50-statemesh-purge.conf")
SERVICE_INTERFACE = "org.freedesktop.systemd1.Service"
# How long selftest's pty holder may live before the probe says the watchdog let it be.
PTY_DEADLINE_SECONDS = 5.0
PTY_PROBE = "pty"
GRACE_PROBE = "spared installing session"
UNSHARED_PROBE = "pty of a devpts of its own"
MOVED_PROBE = "login moved into an exempt unit"
# The probes below run long enough to start Python and mount, then be found (about a second).
CHILD_DEADLINE_SECONDS = 15.0
# A unit every node runs and the watchdog always exempts (it holds VTs): where an intruder
# would move a shell to.
ALWAYS_EXEMPT = "systemd-logind.service"
# A holder the kernel refused its terminal exits with this (the terminal filter's first line).
REFUSED_EXIT = 77
# Each runs in a child (python3 -I: nothing of the environment's Python), prints what it
# holds, then waits to be killed; argv[1] is how long it waits at most. Refused the open,
# it says so and exits with REFUSED_EXIT.
UNSHARED_PTY = """
import os, subprocess, sys, time
subprocess.run(["mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0600", "devpts",
                "/dev/pts"], check=True)
try:
    master = os.open("/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY)
except PermissionError as error:
    print(f"the open of ptmx of the devpts that `unshare -m` mounted refused ({error.strerror})")
    sys.exit(77)
print("a pty of the devpts that `unshare -m` mounted on its /dev/pts", flush=True)
time.sleep(float(sys.argv[1]))
"""
MOVED_LOGIN_PTY = """
import os, sys, time
try:
    with open("/proc/self/loginuid", "w") as loginuid:  # a login's; kept if it was one
        loginuid.write("0")
except OSError:
    pass
with open(sys.argv[2], "w") as procs:
    procs.write(str(os.getpid()))
try:
    master, slave = os.openpty()
except PermissionError as error:
    print(f"openpty of a login's process written into {sys.argv[2]} refused ({error.strerror})")
    sys.exit(77)
print(f"{os.ttyname(slave)} held by a login's process written into {sys.argv[2]}", flush=True)
time.sleep(float(sys.argv[1]))
"""


class WatchdogGuarantee:
    """statemesh-watchdog.service is enabled (at every boot) and running now.

    check() reads the kernel's and the filesystem's view (the unit's cgroup, its wants
    symlink), so that status works even where D-Bus does not; apply() and revert() act
    through systemd's D-Bus API.
    """

    name = "watchdog"
    boot_unit = None  # its unit is enabled: systemd starts it at every boot
    tamper_watched = False
    holds_workload_data = False
    kept_by_upgrades_while_holding = False

    def __init__(self, config: NodeConfig, cgroup_root: Path = unitprocs.CGROUP_ROOT,
                 unit_dir: Path = Path("/etc/systemd/system"), devpts: str = "/dev/pts",
                 grace_path: Path = grace.GRACE_PATH,
                 filter_pins: Path = devicefilter.PIN_DIRECTORY):
        self.config = config
        self.filter_pins = filter_pins
        self.grace_path = grace_path
        self.cgroup_root = cgroup_root
        self.wants = unit_dir / "multi-user.target.wants" / UNIT
        self.devpts = devpts

    def ways_in(self) -> Sequence[Way]:
        return (Way(GRACE_PROBE, Step.TERMINAL, self.probe_grace),
                Way(PTY_PROBE, Step.TERMINAL, probe_pty),
                Way(UNSHARED_PROBE, Step.TERMINAL, probe_unshared_pty),
                Way(MOVED_PROBE, Step.TERMINAL, self.probe_moved_login))

    def probe_grace(self) -> Probe:
        """A session the watchdog spares is a terminal it lets be: open while one runs."""
        spared = grace.current(self.grace_path)
        if spared is None:
            return Probe(GRACE_PROBE, True, "no installing session is spared")
        return Probe(GRACE_PROBE, False, f"spared: {spared.describe()}")

    def probe_moved_login(self, deadline: float = CHILD_DEADLINE_SECONDS) -> Probe:
        """A login's process written into an exempt unit's cgroup.procs opens a pty."""
        directory = unitprocs.unit_cgroup(ALWAYS_EXEMPT, self.cgroup_root)
        if directory is None:
            return Probe(MOVED_PROBE, False, f"cannot try: no cgroup of {ALWAYS_EXEMPT}")
        argv = [sys.executable, "-IS", "-c", MOVED_LOGIN_PTY, str(deadline * 4),
                str(directory / "cgroup.procs")]
        return _probe_child(MOVED_PROBE, argv, deadline)

    def check(self) -> Finding:
        """Running (and not stopped: a SIGSTOPped watchdog ends no terminal, and systemd,
        seeing it alive, does not restart it) and enabled at boot; the terminal filter,
        where attached, letting no cgroup but the watchdog's and the exempt units' open one."""
        pids = unitprocs.unit_pids(UNIT, self.cgroup_root)
        halted = unitprocs.stopped(pids)
        enabled = self.wants.is_symlink() or self.wants.exists()
        ptys = len(terminals.ptys(self.devpts)) if os.path.isdir(self.devpts) else 0
        refusal = self._refusal(pids)
        facts = {"running": bool(pids) and not halted, "pids": pids, "stopped": halted,
                 "enabled": enabled, "ptys_now": ptys,
                 "exempt_units": list(self.config.watchdog_exempt_units), **refusal}
        holds = facts["running"] and enabled and not refusal["filter_problem"]
        if facts["running"] and enabled:
            detail = (f"{UNIT} running (pid {pids[0]}), enabled at boot, {ptys} pty(s) in use; "
                      f"{refusal['filter']}")
        else:
            detail = (f"{UNIT} {_state(pids, halted)}, "
                      f"{'enabled' if enabled else 'not enabled'} at boot")
        return Finding(self.name, holds, detail, facts)

    def _refusal(self, pids: List[int]) -> Dict[str, Any]:
        """The terminal filter as the kernel has it. A problem (the guarantee fails): a
        watchdog that attaches it runs and it is not in force (detached and kept off, or
        not this package's program), or its map lets a cgroup open terminals that is
        neither the watchdog's nor an exempt unit's. A watchdog started before the package
        had the filter (an upgrade's hand-over keeps the running process) attaches none:
        said, not failed."""
        state = devicefilter.state(self.cgroup_root, self.filter_pins)
        if not state.attached:  # read again: a watchdog may have been between two pins
            time.sleep(FILTER_REREAD_SECONDS)
            state = devicefilter.state(self.cgroup_root, self.filter_pins)
        if not state.attached:
            if any(FILTER_OPTION in proc.cmdline(pid) for pid in pids):
                return {"filter_attached": False, "filter_problem": True,
                        "filter": f"the kernel does not refuse terminal opens: {state.detail}"}
            return {"filter_attached": False, "filter_problem": False,
                    "filter": "terminals are killed once opened, not refused (the running "
                              "watchdog attaches no filter: it predates it, until it restarts)"}
        units = (UNIT, *self.config.watchdog_exempt_units)
        expected = devicefilter.cgroups_of_units(units, self.cgroup_root)
        expected.update(self._installers_cgroup())
        allowed = devicefilter.names(state.allowed, self.cgroup_root)  # the ones that exist
        others = sorted(path for cgroup, path in allowed.items() if cgroup not in expected)
        if others:
            return {"filter_attached": True, "filter_problem": True,
                    "filter": f"the terminal filter lets {', '.join(others)} open terminals"}
        return {"filter_attached": True, "filter_problem": False,
                "filter": ("the kernel refuses terminal opens but for "
                           f"{', '.join(sorted(allowed.values()))}")}

    def _installers_cgroup(self) -> Dict[int, str]:
        """The cgroup of a running grace's package manager, which the filter allows."""
        spared = grace.current(self.grace_path)
        seen = devicefilter.process_cgroup(spared.pid, self.cgroup_root) if spared is not None else None
        return {} if seen is None else {seen[0]: seen[1]}

    def apply(self, journal: Any) -> None:
        asyncio.run(_start())
        journal.record("watchdog-started", unit=UNIT)

    def revert(self, record: Dict[str, Any]) -> None:
        del record  # the unit is the package's own: there is nothing of the operator's to restore
        PURGE_DROPIN.parent.mkdir(parents=True, exist_ok=True)
        PURGE_DROPIN.write_bytes(PURGE_DROPIN_TEXT)
        try:
            asyncio.run(_stop())
        finally:
            PURGE_DROPIN.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                PURGE_DROPIN.parent.rmdir()
        devicefilter.remove(self.cgroup_root, self.filter_pins)  # terminals open again


def _state(pids: List[int], halted: List[int]) -> str:
    if halted:
        return (f"stopped (pid {', '.join(map(str, halted))}: SIGSTOP or a tracer), "
                "ending no terminal")
    return "running" if pids else "not running"


async def _start() -> None:
    """Enable and start it; a running one hands over to a process running the code just
    installed. Starting needs no reload; the transaction's reload (one_reload) loads the
    enabling link: until then systemd reports its units as needing a reload."""
    async with systemd.manager() as manager:
        await manager.enable_unit_files([UNIT])
        if await manager.get_active_state(UNIT) == "active":
            pid = await manager.get_unit_property(UNIT, SERVICE_INTERFACE, "MainPID")
            os.kill(int(getattr(pid, "value", pid)), signal.SIGHUP)
        else:
            await manager.start_unit(UNIT)


async def _stop() -> None:
    async with systemd.manager() as manager:
        await manager.reload()
        await manager.stop_unit(UNIT)
        await manager.disable_unit_files([UNIT])
        PURGE_DROPIN.unlink(missing_ok=True)
        await manager.reload()


def probe_pty(deadline: float = PTY_DEADLINE_SECONDS) -> Probe:
    """Open a pty in a child process: refused by the kernel, or its holder killed."""
    name = PTY_PROBE
    ready_read, ready_write = os.pipe()
    child = os.fork()
    if child == 0:  # the holder: open a terminal, say so, and wait to be killed
        os.close(ready_read)
        try:
            _master, slave = os.openpty()
        except PermissionError as error:
            os.write(ready_write, f"refused ({error.strerror})".encode())
            os._exit(REFUSED_EXIT)
        os.write(ready_write, os.ttyname(slave).encode())
        time.sleep(deadline * 4)
        os._exit(0)
    os.close(ready_write)
    started = time.monotonic()
    # The watchdog may kill the holder before it has written the pty's name.
    terminal = os.read(ready_read, 64).decode() or "a new pty"
    os.close(ready_read)
    try:
        _pid, status = _wait_child(child, deadline)
    except TimeoutError:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        return Probe(name, False, f"{terminal} stayed open {deadline:.1f} s")
    elapsed_ms = (time.monotonic() - started) * 1000
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == REFUSED_EXIT:
        return Probe(name, True, f"openpty {terminal} by the kernel")
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return Probe(name, True, f"holder of {terminal} killed after {elapsed_ms:.0f} ms")
    return Probe(name, False, f"holder of {terminal} ended on its own (status {status})")


def probe_unshared_pty(deadline: float = CHILD_DEADLINE_SECONDS) -> Probe:
    """`unshare -m`, a devpts instance of its own on /dev/pts, a pty of it: never watched
    by /dev/pts, found all the same."""
    argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-IS", "-c",
            UNSHARED_PTY, str(deadline * 4)]
    return _probe_child(UNSHARED_PROBE, argv, deadline)


def _probe_child(name: str, argv: List[str], deadline: float) -> Probe:
    """Run a holder and wait for the watchdog to kill it: blocked only if SIGKILL ended it."""
    started = time.monotonic()
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        out, err = child.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        return Probe(name, False, f"{out.strip() or 'its holder'} stayed open {deadline:.0f} s")
    elapsed_ms = (time.monotonic() - started) * 1000
    if child.returncode == REFUSED_EXIT:
        return Probe(name, True, out.strip())
    if child.returncode == -signal.SIGKILL:
        return Probe(name, True, f"holder of {out.strip() or 'it'} killed "
                                 f"{elapsed_ms:.0f} ms after it was started")
    return Probe(name, False, f"could not try (exit {child.returncode}): "
                              f"{err.strip()[-200:] or out.strip()}")


def _wait_child(pid: int, timeout: float) -> tuple:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            return finished, status
        time.sleep(0.005)
    raise TimeoutError
