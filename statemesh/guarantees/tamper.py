"""Tamper response: re-assert the lockdown as soon as anything unmasks or enables a locked unit.

`systemctl unmask ssh`, `systemctl enable`, a unit file dropped into /etc followed by a
daemon-reload: each makes systemd emit UnitFilesChanged or Reloading on its bus. The
listener (running inside statemesh-harden.service once the hardening is done) checks every
guarantee that declares itself tamper_watched on each such signal and enforces again those
that no longer hold,
logging what had changed. A periodic check is the safety net for changes that emit no
signal (a symlink removed by hand without a reload).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, cast

from statemesh import safefile, systemd
from statemesh.events import log
from statemesh.journal import write_atomically
from statemesh.guarantees import unitprocs
from statemesh.guarantees.base import HARDEN_UNIT, Finding, Guarantee
from statemesh.guarantees.unitmask import BusGuarantee

# Seconds between checks when no signal came: the safety net, not the reaction time.
PERIOD = 5.0
RECONNECT_DELAY = 1.0
# What ends the listener's connection: it reconnects (listen), anything else is one
# guarantee's error (enforce_tampered).
BUS_LOST = (systemd.NoBusError, ConnectionError, EOFError)
# What the listener could not enforce in its last round, with its pid, for status: a file
# left by a listener that is gone (or written by anyone else) counts for nothing.
LISTENER_STATE = Path("/run/statemesh-node/listener.json")


def watched(ordered: Sequence[Guarantee]) -> List[BusGuarantee]:
    """The guarantees that declare tamper_watched, in order (BusGuarantees, by the protocol)."""
    return [cast(BusGuarantee, guarantee) for guarantee in ordered if guarantee.tamper_watched]


def listener_finding(ordered: Sequence[Guarantee], installed: bool,
                     cgroup_root: Path = unitprocs.CGROUP_ROOT) -> Finding:
    """Whether the listener runs, for status: on an installed node statemesh-harden.service
    stays up as the listener, and nothing else re-asserts the lockdown when it is undone.
    It is not restarted (Restart=no), so a stopped or killed listener stays gone; one whose
    last round failed to enforce a guarantee does not re-assert it, and says so."""
    pids = unitprocs.unit_pids(HARDEN_UNIT, cgroup_root)
    halted = unitprocs.stopped(pids)
    names = ", ".join(guarantee.name for guarantee in watched(ordered))
    facts = {"unit": HARDEN_UNIT, "pids": pids, "stopped": halted, "watches": names}
    if not installed:
        return Finding("tamper_listener", False, "none: the node is not installed", facts)
    if not pids:
        return Finding("tamper_listener", False, f"{HARDEN_UNIT} is not running: nothing "
                       f"re-asserts {names} when they are undone", facts)
    if halted:
        return Finding("tamper_listener", False, f"{HARDEN_UNIT} is stopped (pid "
                       f"{', '.join(map(str, halted))}: SIGSTOP or a tracer): nothing "
                       f"re-asserts {names} when they are undone", facts)
    failing = cannot_enforce(pids)
    if failing:
        facts["cannot_enforce"] = failing
        return Finding("tamper_listener", False, f"{HARDEN_UNIT} running (pid {pids[0]}), but "
                       "its last try to re-assert failed: " + "; ".join(
                           f"{name}: {error}" for name, error in sorted(failing.items())), facts)
    return Finding("tamper_listener", True, f"{HARDEN_UNIT} running (pid {pids[0]}), "
                   f"re-asserts {names} when they are undone", facts)


def cannot_enforce(pids: Sequence[int]) -> Dict[str, str]:
    """The guarantees the running listener (one of `pids`) failed to enforce in its last
    round, with the error; {} when it failed none, or the record is not its own."""
    try:
        record = json.loads(safefile.read_text(LISTENER_STATE))
    except (OSError, ValueError):  # a FIFO or a device too, never waited on
        return {}
    if not isinstance(record, dict) or record.get("pid") not in pids:
        return {}
    failing = record.get("cannot_enforce")
    return {str(name): str(error) for name, error in failing.items()} if isinstance(
        failing, dict) else {}


def publish(failing: Dict[str, str]) -> None:
    """Write what this listener could not enforce, for status; a failure to write is logged
    (status then sees no record of this listener's: it holds, as before this existed)."""
    try:
        LISTENER_STATE.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(LISTENER_STATE, {"pid": os.getpid(), "cannot_enforce": failing})
    except OSError as error:
        log("tamper-error", guarantee="", error=f"writing {LISTENER_STATE}: {error}")


async def enforce_tampered(manager: systemd.Systemd, lockdown: Sequence[BusGuarantee],
                           journal: Any, failed: Optional[Dict[str, str]] = None) -> List[str]:
    """Enforce again every watched guarantee that no longer holds; returns their names.

    One that cannot be checked or enforced, whatever the error (a stop job, a file it
    writes, a process it reads), is logged and tried again at the next signal or period,
    and the others are still enforced: a failure the operator prepared for one must not
    shield the rest from the listener. Only a lost bus ends the round (listen reconnects).
    Each error is also kept in `failed`, by guarantee, for status."""
    fixed = []
    for guarantee in lockdown:
        try:
            if await _enforce_if_tampered(manager, guarantee, journal):
                fixed.append(guarantee.name)
        except BUS_LOST:
            raise
        except Exception as error:  # noqa: BLE001 - see the docstring
            message = f"{type(error).__name__}: {error}"
            log("tamper-error", guarantee=guarantee.name, error=message)
            if failed is not None:
                failed[guarantee.name] = message
    return fixed


async def _enforce_if_tampered(manager: systemd.Systemd, guarantee: BusGuarantee,
                               journal: Any) -> bool:
    finding = await guarantee.inspect(manager)
    if finding.holds:
        return False
    log("tamper-detected", guarantee=guarantee.name, changed=finding.detail)
    journal.record("tamper-detected", guarantee=guarantee.name, changed=finding.detail)
    await guarantee.enforce(manager, journal)
    journal.record("tamper-reasserted", guarantee=guarantee.name)
    log("tamper-reasserted", guarantee=guarantee.name)
    return True


async def _listen_once(lockdown: Sequence[BusGuarantee], journal: Any,
                       ready: Callable[[], None], period: float) -> None:
    async with systemd.manager() as manager:
        changed = asyncio.Event()
        await manager.on_unit_files_changed(changed.set)
        await manager.on_reloading(lambda active: None if active else changed.set())
        published = await _round(manager, lockdown, journal, None)
        # Cleared after each round, not before: an enforce reloads systemd, and the
        # Reloading signal it emits would wake the next round at once. A guarantee whose
        # enforce keeps failing (prepared so) would reload systemd hundreds of times a
        # second; it is tried again at the next change or period instead. A change made
        # while a round runs is found by the next period's round at the latest.
        changed.clear()
        ready()
        while manager.bus.connected:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), period)
            published = await _round(manager, lockdown, journal, published)
            changed.clear()


async def _round(manager: systemd.Systemd, lockdown: Sequence[BusGuarantee], journal: Any,
                 published: Optional[Dict[str, str]]) -> Dict[str, str]:
    """One round of enforce_tampered; what it could not enforce is published when it
    differs from what was (always after the listener's start). Returns what is published."""
    failed: Dict[str, str] = {}
    await enforce_tampered(manager, lockdown, journal, failed)
    if failed != published:
        publish(failed)
    return failed


async def listen(ordered: Sequence[Guarantee], journal: Any,
                 ready: Callable[[], None] = lambda: None, period: float = PERIOD) -> None:
    """Watch every tamper_watched guarantee of the ordered list, forever; a lost bus (dbus
    restarted) is reconnected rather than giving up."""
    lockdown = watched(ordered)
    while True:
        try:
            await _listen_once(lockdown, journal, ready, period)
        except BUS_LOST as error:
            log("tamper-bus-lost", error=str(error))
        await asyncio.sleep(RECONNECT_DELAY)
