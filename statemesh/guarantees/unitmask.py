"""Locking a set of units away (disable, mask, stop) and giving them back from a record.

The ssh, agents, logins and rescue guarantees all take units away from the operator the same
way, over systemd's D-Bus API: disable what is enabled (so that no .wants/ or alias symlink is
left to bring it back), mask every name (templates and aliases included, present or not,
so that a package installed later finds its units masked already), reload. What runs is
stopped first, sockets first so that they cannot start a service again, while the units
still have their own settings (KillMode=process), and once more after the reload. The
record of the previous unit-file states and of what ran lets purge give back exactly that.

A mask takes effect only when systemd reloads (until then a loaded unit starts as before,
and an unloaded one is looked up in the name map of the last reload), and each reload
costs seconds on a small machine: inside `one_reload()` (the installation's transaction)
lock() leaves the reload, and the second stop, to one reload at its end; inside
`one_give_back()` (purge, a give-back at boot) give_back() leaves the reload, and the
starts of what ran, to one reload at its end.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
from signal import SIGKILL
from typing import (Any, Awaitable, Callable, Dict, FrozenSet, Iterable, Iterator, List,
                    Optional, Sequence, Tuple, TypeVar)

from statemesh.guarantees.base import Finding, Probe, Step, Way
from statemesh.systemd import (JobTimeoutError, Systemd, SystemdError, UnknownUnitError, manager,
                               together)

T = TypeVar("T")
log = logging.getLogger(__name__)

ABSENT = "absent"
# What a unit-file listing says of a file whose state systemd could not look up (a dangling
# link): asked by name, it is an error or no such file.
UNREADABLE = "bad"
MASKED = "masked"
# Unit-file states that DisableUnitFiles undoes (lock() disables them before masking).
ENABLED_STATES = ("enabled", "enabled-runtime", "indirect", "linked", "linked-runtime")
# What EnableUnitFiles of the name itself re-creates. An "indirect" template (no
# DefaultInstance) cannot be enabled by name, and alias/indirect states come back with the
# unit they belong to.
RE_ENABLED_STATES = ("enabled",)
RUNNING_STATES = ("active", "activating", "reloading", "deactivating")
# How long a stop may take before every process of the unit gets SIGKILL. A prepared
# unit can make its stop endless (TimeoutStopSec=infinity, and a main process that a
# tracer holds, or that ignores SIGTERM): the transaction, or the tamper listener
# re-asserting, would wait on it forever. Debian's units stop in well under this.
STOP_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class UnitSet:
    """The unit names one guarantee locks; `restart_instances` says whether purge restarts
    the template instances that ran (gettys: yes; per-connection ssh@ instances: no)."""

    names: Sequence[str]
    restart_instances: bool = False

    def patterns(self) -> List[str]:
        """ListUnits patterns: a template name stands for all its instances."""
        return [name.replace("@.", "@*.") for name in self.names]


def _is_instance(name: str) -> bool:
    return "@" in name and "@." not in name


async def file_states(manager: Systemd, names: Iterable[str]) -> Dict[str, str]:
    """Each name's unit-file state, ABSENT where it has none. One listing answers every name
    with a file of its own (each masked name, on an installed node); only the others (an
    instance of a template, a name with no file, one the listing could not read) are asked
    one by one. systemd computes both answers with the same lookup, and status asks about
    some seventy names: a round trip each cost a second of it under emulation."""
    names = list(names)
    listed = {os.path.basename(path): state
              for path, state in (await manager.list_unit_files(names) if names else [])
              if state != UNREADABLE}
    unlisted = [name for name in names if name not in listed]
    asked = dict(zip(unlisted, await together(_file_state(manager, name) for name in unlisted)))
    return {name: listed[name] if name in listed else asked[name] for name in names}


async def _file_state(manager: Systemd, name: str) -> str:
    try:
        return await manager.get_unit_file_state(name)
    except UnknownUnitError:
        return ABSENT


async def running(manager: Systemd, units: UnitSet) -> List[str]:
    """Loaded units of the set that run (or are starting/stopping)."""
    listed = await manager.list_units(units.patterns())
    return sorted(u.name for u in listed if u.active_state in RUNNING_STATES)


async def snapshot(manager: Systemd, units: UnitSet) -> Dict[str, Any]:
    """What purge needs to give the units back: unit-file states and what ran."""
    active = await running(manager, units)
    if not units.restart_instances:
        active = [name for name in active if not _is_instance(name)]
    return {"unit_files": await file_states(manager, units.names), "active": active}


# The sets lock() masked inside one_reload(), with their spared units, for its one reload.
_UNRELOADED: contextvars.ContextVar[Optional[List[Tuple[UnitSet, FrozenSet[str]]]]] = (
    contextvars.ContextVar("unreloaded_unit_sets", default=None))


async def lock(manager: Systemd, units: UnitSet,
               spare: FrozenSet[str] = frozenset()) -> Dict[str, List[str]]:
    """Disable, mask and stop every unit of the set but those named in `spare`, which are
    left as they are: a running unit reloaded from its mask loses its own settings (a
    oneshot's TimeoutStartSec=0 becomes the default 90 s, and systemd ends what it runs).
    A spared instance of a template in the set (a getty) is not stopped, but its template's
    mask covers it. Inside one_reload() the masks are loaded, and what started meanwhile
    stopped, at its end."""
    stopped = await _stop_running(manager, units, spare)
    states = await file_states(manager, units.names)
    enabled = [name for name, state in states.items()
               if state in ENABLED_STATES and name not in spare]
    if enabled:
        await manager.disable_unit_files(enabled)
    masked = [name for name in units.names if name not in spare]
    await manager.mask_unit_files(masked)
    unreloaded = _UNRELOADED.get()
    if unreloaded is not None:
        unreloaded.append((units, spare))
    else:
        await manager.reload()
        stopped += [name for name in await _stop_running(manager, units, spare)
                    if name not in stopped]
    return {"disabled": enabled, "masked": masked, "stopped": stopped}


@contextlib.contextmanager
def one_reload(journal: Any) -> Iterator[None]:
    """Inside it, lock() masks without reloading; at its end (however it ends) one reload
    makes every mask take effect, and what started since the first stop (a getty logind
    spawned, a unit the operator started) is stopped and journaled."""
    unreloaded: List[Tuple[UnitSet, FrozenSet[str]]] = []
    token = _UNRELOADED.set(unreloaded)
    try:
        yield
    except BaseException:
        _UNRELOADED.reset(token)
        # What failed first is the error to report.
        with contextlib.suppress(SystemdError, OSError, ValueError):
            _load_masks(unreloaded, journal)
        raise
    _UNRELOADED.reset(token)
    _load_masks(unreloaded, journal)


def masks_unloaded() -> bool:
    """Inside one_reload(): masks may be on disk that systemd has not loaded yet."""
    return _UNRELOADED.get() is not None


def _load_masks(unreloaded: Sequence[Tuple[UnitSet, FrozenSet[str]]], journal: Any) -> None:
    """The one reload, and the second stop of every set locked without one."""
    if unreloaded:
        stopped = asyncio.run(with_manager(
            lambda systemd_manager: _reload_and_stop(systemd_manager, unreloaded)))
        journal.record("masks-loaded", stopped=stopped)


async def _reload_and_stop(manager: Systemd,
                           unreloaded: Sequence[Tuple[UnitSet, FrozenSet[str]]]) -> List[str]:
    await manager.reload()
    stopped: List[str] = []
    for units, spare in unreloaded:
        stopped += await _stop_running(manager, units, spare)
    return stopped


async def _stop_running(manager: Systemd, units: UnitSet, spare: FrozenSet[str]) -> List[str]:
    """Stop what runs, sockets first so that they cannot start a service again.

    Before the mask and reload: a unit reloaded from its mask (/dev/null) has lost its
    settings, KillMode=process among them, and stopping it would kill every process in its
    cgroup. For ssh.service without libpam-systemd that cgroup holds every connection's
    sshd and shell, and the installing apt itself."""
    stopped = []
    for name in sorted(await running(manager, units), key=lambda n: not n.endswith(".socket")):
        if name in spare:
            continue
        await stop_within_bound(manager, name)
        stopped.append(name)
    return stopped


async def stop_within_bound(manager: Systemd, name: str) -> None:
    """Stop `name`; if its stop job is not done within STOP_SECONDS, SIGKILL its whole
    cgroup (which no tracer or signal handler survives) and wait for the same job again."""
    try:
        await manager.stop_unit(name, timeout=STOP_SECONDS)
    except JobTimeoutError:
        log.warning("%s did not stop within %.0f s: killing every process of it", name,
                    STOP_SECONDS)
        try:
            await manager.kill_unit(name, SIGKILL)
            await manager.stop_unit(name, timeout=STOP_SECONDS)
        except UnknownUnitError:
            pass  # it stopped meanwhile and systemd let it go: stopped all the same


async def unlocked(manager: Systemd, units: UnitSet,
                   spare: FrozenSet[str] = frozenset()) -> Dict[str, Any]:
    """What is not locked: names not masked, and units still running (but spared ones)."""
    states = await file_states(manager, units.names)
    return {
        "not_masked": {name: state for name, state in states.items()
                       if state != MASKED and name not in spare},
        "running": [name for name in await running(manager, units) if name not in spare],
    }


def unlocked_problems(left: Dict[str, Any]) -> List[str]:
    """What `unlocked` found, as the problems a Finding's detail lists."""
    problems = []
    if left["not_masked"]:
        problems.append("not masked: " + ", ".join(sorted(left["not_masked"])))
    if left["running"]:
        problems.append("running: " + ", ".join(left["running"]))
    return problems


async def give_back(manager: Systemd, record: Dict[str, Any], owner: str) -> List[str]:
    """Unmask what we masked, re-enable what was enabled, start what ran; returns errors.
    Unmasking and enabling change files, read by systemd at the one reload before the
    starts. Inside one_give_back() the reload and the starts are left to its end, for
    `owner` (the guarantee giving the set back)."""
    states: Dict[str, str] = dict(record.get("unit_files", {}))
    ours = [name for name, state in states.items() if state != MASKED]
    if ours:  # what was enabled is among them: no state in RE_ENABLED_STATES is MASKED
        await manager.unmask_unit_files(ours)
        enable = [name for name, state in states.items() if state in RE_ENABLED_STATES]
        if enable:
            await manager.enable_unit_files(enable)
    ran = sorted(record.get("active", []), key=lambda n: not n.endswith(".socket"))
    unstarted = _UNSTARTED.get()
    if unstarted is not None:
        unstarted.append(_Unstarted(owner, ran, reload=bool(ours)))
        return []
    if ours:
        await manager.reload()
    return await _start_all(manager, ran)


async def _start_all(manager: Systemd, names: Sequence[str]) -> List[str]:
    errors: List[str] = []
    for name in names:
        try:
            await manager.start_unit(name)
        except SystemdError as error:
            errors.append(str(error))
    return errors


@dataclasses.dataclass(frozen=True)
class _Unstarted:
    """A set give_back() gave back inside one_give_back(): whose, what ran, and whether
    systemd must reload before that starts (unit files were unmasked or enabled)."""

    owner: str
    ran: List[str]
    reload: bool


_UNSTARTED: contextvars.ContextVar[Optional[List[_Unstarted]]] = (
    contextvars.ContextVar("unstarted_unit_sets", default=None))


@contextlib.contextmanager
def one_give_back() -> Iterator[Dict[str, List[str]]]:
    """Inside it, give_back() unmasks and enables without reloading; at its end (however
    it ends) one reload, then every set's units start again. Yields what could not be
    started, by owner, filled in at the end: purge gives five sets back, and each reload
    costs seconds on a small machine."""
    unstarted: List[_Unstarted] = []
    failed: Dict[str, List[str]] = {}
    token = _UNSTARTED.set(unstarted)
    try:
        yield failed
    finally:
        _UNSTARTED.reset(token)
        if unstarted:
            failed.update(_start_given_back(unstarted))


def _start_given_back(unstarted: Sequence[_Unstarted]) -> Dict[str, List[str]]:
    try:
        return asyncio.run(with_manager(
            lambda systemd_manager: _reload_and_start(systemd_manager, unstarted)))
    except Exception as error:  # noqa: BLE001 - charged to every set, as revert_all would
        return {given.owner: [f"not reloaded, nothing started again: {error}"]
                for given in unstarted}


async def _reload_and_start(manager: Systemd, unstarted: Sequence[_Unstarted]
                            ) -> Dict[str, List[str]]:
    if any(given.reload for given in unstarted):
        await manager.reload()
    failed: Dict[str, List[str]] = {}
    for given in unstarted:
        errors = await _start_all(manager, given.ran)
        if errors:
            failed[given.owner] = errors
    return failed


class LockdownError(RuntimeError):
    """A lockdown step did not take, or could not be given back; the message says which."""


class BusGuarantee(abc.ABC):
    """A guarantee enforced over systemd's D-Bus API.

    Subclasses implement the async `inspect`, `enforce` and `restore`, which the tamper
    listener calls on its own bus connection inside its event loop; the synchronous
    Guarantee protocol (check/apply/revert) wraps them with a connection of their own.
    """

    name = ""

    @abc.abstractmethod
    async def inspect(self, manager: Systemd) -> Finding:
        """Read the live state (no side effects)."""

    @abc.abstractmethod
    async def enforce(self, manager: Systemd, journal: Any) -> None:
        """Remember the previous state, lock, then verify (idempotent)."""

    @abc.abstractmethod
    async def restore(self, manager: Systemd, record: Dict[str, Any]) -> List[str]:
        """Give back what the record says; returns what could not be given back."""

    async def verify(self, manager: Systemd) -> None:
        """Read the state back after enforcing: raise unless the guarantee now holds. Not
        inside one_reload(): until its reload a unit may still start (a getty logind
        spawns), which its sweep stops; the transaction reads every guarantee back after."""
        if masks_unloaded():
            return
        finding = await self.inspect(manager)
        if not finding.holds:
            raise LockdownError(f"{self.name}: still not locked after enforcing: {finding.detail}")

    def check(self) -> Finding:
        try:
            return asyncio.run(with_manager(self.inspect))
        except SystemdError as error:
            return Finding(self.name, False, f"cannot ask systemd: {error}")

    def apply(self, journal: Any) -> None:
        asyncio.run(with_manager(lambda manager: self.enforce(manager, journal)))

    def revert(self, record: Dict[str, Any]) -> None:
        if not record:
            return
        errors = asyncio.run(with_manager(lambda manager: self.restore(manager, record)))
        if errors:
            raise LockdownError(f"{self.name}: not everything could be given back: "
                                + "; ".join(errors))


async def with_manager(action: Callable[[Systemd], Awaitable[T]]) -> T:
    """Run one action with a connection to systemd's manager, closed after it."""
    async with manager() as systemd_manager:
        return await action(systemd_manager)


def start_refused(unit: str) -> Way:
    """The way in of a unit that would give a shell: selftest asks systemd to start it."""
    name = f"start {unit}"
    return Way(name, Step.SHELL, functools.partial(_probe_start, name, unit))


def _probe_start(name: str, unit: str) -> Probe:
    """Ask systemd to start a unit that must not start: blocked only when systemd refuses
    and the unit is not running (started anyway, it is stopped again)."""
    try:
        return asyncio.run(with_manager(lambda systemd_manager: _try_start(systemd_manager,
                                                                            name, unit)))
    except SystemdError as error:
        return Probe(name, False, f"could not ask systemd: {error}")


async def _try_start(systemd_manager: Systemd, name: str, unit: str) -> Probe:
    try:
        await systemd_manager.start_unit(unit, timeout=30)
    except SystemdError as error:
        if await systemd_manager.get_active_state(unit) in ("active", "activating"):
            return Probe(name, False, f"refused ({error}) but the unit is running")
        return Probe(name, True, f"refused: {error}")
    await stop_within_bound(systemd_manager, unit)
    return Probe(name, False, "systemd started it (stopped again by selftest)")
