"""A small typed asyncio client for systemd (org.freedesktop.systemd1) and logind (login1).

Unit management goes over D-Bus, never through a `systemctl` subprocess: the D-Bus API
reports a job's real result (JobRemoved), lets us mask and enable without parsing text,
and is what lintian expects maintainer scripts' helpers to use. Calls are sent as plain
messages (no introspection round trip) on a statemesh.dbusconn connection (dbus-next, or
jeepney where dbus-next is not packaged), and every D-Bus error is mapped to one of a few
exceptions whose message names the unit and what systemd said.

Tests point the client at a private bus with stand-in services through the
STATEMESH_DBUS_ADDRESS environment variable (see tests/fakebus/).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import os
from typing import (Any, AsyncIterator, Awaitable, Callable, Dict, Iterable, List, Optional,
                    Sequence, Tuple, TypeVar)

from statemesh import dbusconn
from statemesh.dbusconn import Connection, Received

ADDRESS_ENV = "STATEMESH_DBUS_ADDRESS"
T = TypeVar("T")

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
LOGIND = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
LOGIND_MANAGER = "org.freedesktop.login1.Manager"
SESSION = "org.freedesktop.login1.Session"
PROPERTIES = "org.freedesktop.DBus.Properties"

# Job results (JobRemoved) that mean the job did what was asked. "skipped" is what systemd
# reports for a reload or restart of a unit that was not running: nothing was left undone.
JOB_SUCCESS = ("done", "skipped")

_ACCESS_DENIED = (
    "org.freedesktop.DBus.Error.AccessDenied",
    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
    "org.freedesktop.DBus.Error.AuthFailed",
)
_UNKNOWN_UNIT = (
    "org.freedesktop.systemd1.NoSuchUnit",
    "org.freedesktop.systemd1.LoadFailed",
    "org.freedesktop.DBus.Error.FileNotFound",
    "org.freedesktop.login1.NoSuchSession",
    "org.freedesktop.DBus.Error.UnknownObject",
)
_NO_SERVICE = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Disconnected",
    # The bus refused the call (too many waiting): not an answer about any unit.
    "org.freedesktop.DBus.Error.LimitsExceeded",
)


class SystemdError(RuntimeError):
    """systemd or logind refused or failed a request."""


class NoBusError(SystemdError):
    """There is no system bus, or systemd/logind is not on it (a chroot, a container)."""


class AccessDeniedError(SystemdError):
    """The bus policy or polkit refused the call (not root, most likely)."""


class UnknownUnitError(SystemdError, LookupError):
    """No unit (or session) of that name. A LookupError too: callers that must not import
    the D-Bus client (the watchdog's session manager protocol) can still tell it apart."""


class JobFailedError(SystemdError):
    """A start/stop/restart job finished with a result other than done."""

    def __init__(self, unit: str, verb: str, result: str):
        self.unit = unit
        self.result = result
        super().__init__(f"{verb} {unit}: job {result}")


class JobTimeoutError(JobFailedError):
    """A job did not finish within the caller's bound; it is still queued or running."""


@dataclasses.dataclass(frozen=True)
class UnitInfo:
    """One loaded unit as ListUnits reports it."""

    name: str
    description: str
    load_state: str
    active_state: str
    sub_state: str


@dataclasses.dataclass(frozen=True)
class UnitFileChange:
    """One change systemd made to unit files (type is symlink, unlink, ...)."""

    type: str
    path: str
    source: str


@dataclasses.dataclass(frozen=True)
class Session:
    """A logind session with the properties that tell whether it is a way in."""

    id: str
    uid: int
    user: str
    seat: str
    type: str
    class_: str
    tty: str
    remote: bool
    leader: int
    scope: str
    state: str


async def connect(address: Optional[str] = None) -> Connection:
    """Connect to the system bus (or `address`, or $STATEMESH_DBUS_ADDRESS)."""
    address = address or os.environ.get(ADDRESS_ENV) or None
    try:
        return await dbusconn.connect(address)
    except (ValueError, ImportError) as error:  # a bad choice of library, not a missing bus
        raise SystemdError(f"no D-Bus library to reach {address or 'the system bus'}: {error}") from None
    except Exception as error:  # noqa: BLE001 - OSError, EOFError, AuthError or bare Exception
        where = address or "the system bus"
        raise NoBusError(f"cannot connect to {where}: {error}") from None


@contextlib.asynccontextmanager
async def manager(address: Optional[str] = None) -> AsyncIterator["Systemd"]:
    """The systemd manager on a connection of its own, disconnected however the block ends.

    A connection left open keeps the process's bus name and match rules alive: every
    short conversation with systemd goes through here. `manager.bus` reaches logind on
    the same connection.
    """
    bus = await connect(address)
    try:
        yield Systemd(bus)
    finally:
        bus.disconnect()


def _raise_for(reply: Received, what: str) -> None:
    """Turn an error reply into the matching SystemdError."""
    if reply.kind != "error":
        return
    said = reply.body[0] if reply.body else reply.error_name
    text = f"{what}: {said}"
    name = reply.error_name or ""
    if name in _ACCESS_DENIED:
        raise AccessDeniedError(text)
    if name in _UNKNOWN_UNIT:
        raise UnknownUnitError(text)
    if name in _NO_SERVICE:
        raise NoBusError(text)
    raise SystemdError(f"{text} ({name})")


class _Client:
    """Method calls and signal subscriptions to one service on one bus."""

    def __init__(self, bus: Connection, destination: str):
        self.bus = bus
        self.destination = destination
        self._matches: List[str] = []

    async def call(self, path: str, interface: str, member: str, signature: str = "",
                   body: Sequence[Any] = (), what: str = "") -> List[Any]:
        try:
            reply = await self.bus.call(self.destination, path, interface, member, signature, body)
        except (OSError, EOFError) as error:
            raise NoBusError(f"{what or member}: the bus connection failed: {error}") from None
        _raise_for(reply, what or member)
        return reply.body

    async def get_property(self, path: str, interface: str, prop: str, what: str = "") -> Any:
        (value,) = await self.call(path, PROPERTIES, "Get", "ss", [interface, prop],
                                   what=what or f"{prop} of {path}")
        return self.bus.unwrap(value)

    async def get_all(self, path: str, interface: str, what: str = "") -> Dict[str, Any]:
        (values,) = await self.call(path, PROPERTIES, "GetAll", "s", [interface],
                                    what=what or f"properties of {path}")
        return {key: self.bus.unwrap(value) for key, value in values.items()}

    async def add_match(self, rule: str) -> None:
        try:
            reply = await self.bus.call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                        "org.freedesktop.DBus", "AddMatch", "s", [rule])
        except (OSError, EOFError) as error:
            raise NoBusError(f"subscribing to {rule}: the bus connection failed: {error}") from None
        _raise_for(reply, f"subscribing to {rule}")
        self._matches.append(rule)

    def on_signal(self, interface: str, member: str,
                  handler: Callable[[Received], None]) -> Awaitable[None]:
        """Call handler(signal) for each such signal; returns the AddMatch to await."""

        def filter_(signal: Received) -> None:
            if signal.interface == interface and signal.member == member:
                handler(signal)

        self.bus.add_signal_handler(filter_)
        return self.add_match(f"type='signal',interface='{interface}',member='{member}'")


def _schedule(callback: Callable[..., Any], *args: Any) -> None:
    """Run a signal callback; a coroutine callback becomes a task."""
    result = callback(*args)
    if inspect.isawaitable(result):
        asyncio.ensure_future(result)


# Calls one together() has waiting at once. dbus-daemon refuses a connection more than 128
# pending replies (max_replies_per_connection, LimitsExceeded); a together() inside another
# (a unit's properties, for each of the package's eight units) stays well within it.
IN_FLIGHT = 32


async def together(calls: Iterable[Awaitable[T]]) -> List[T]:
    """Each call's result, in order, the calls sent IN_FLIGHT at a time: they wait for their
    replies together instead of one round trip after another (under emulation a round trip
    costs milliseconds of the guest's one CPU in switches alone). The first failure is
    raised once every call has ended: none is left running unawaited."""
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def in_turn(call: Awaitable[T]) -> T:
        async with slots:
            return await call

    results = await asyncio.gather(*(in_turn(call) for call in calls), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return list(results)


UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"


def _bus_label(name: str) -> str:
    """systemd's escaping of a unit name in its object path (bus_label_escape: bytes but
    ASCII letters and digits, and a leading digit, as _xx). A name it escapes otherwise
    merely goes uncached."""
    return "".join(chr(byte) if chr(byte).isascii() and chr(byte).isalnum()
                   and not (index == 0 and chr(byte).isdigit()) else f"_{byte:02x}"
                   for index, byte in enumerate(name.encode())) or "_"


class Systemd:
    """The systemd manager: jobs, unit files, unit properties."""

    def __init__(self, bus: Connection):
        self.bus = bus
        self._client = _Client(bus, SYSTEMD)
        self._finished: Dict[str, str] = {}
        self._waiters: Dict[str, asyncio.Future] = {}
        self._jobs_watched = False
        self._subscribed = False
        self._paths: Dict[str, str] = {}

    async def _manager(self, member: str, signature: str = "", body: Sequence[Any] = (),
                       what: str = "") -> List[Any]:
        return await self._client.call(SYSTEMD_PATH, MANAGER, member, signature, body,
                                       what=what or member)

    # -- jobs ------------------------------------------------------------------------------

    def _job_removed(self, message: Received) -> None:
        _id, job, _unit, result = message.body
        waiter = self._waiters.pop(job, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(result)
        else:
            self._finished[job] = result

    async def _watch_jobs(self) -> None:
        """Listen to JobRemoved before the first job exists, so no result can be missed."""
        if self._jobs_watched:
            return
        await self._client.on_signal(MANAGER, "JobRemoved", self._job_removed)
        await self._subscribe()
        self._jobs_watched = True

    async def _job(self, verb: str, name: str, mode: str, timeout: Optional[float]) -> str:
        await self._watch_jobs()
        (job,) = await self._manager(verb, "ss", [name, mode], what=f"{verb} {name}")
        if job in self._finished:
            result = self._finished.pop(job)
        else:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[job] = waiter
            try:
                result = await asyncio.wait_for(waiter, timeout)
            except asyncio.TimeoutError:
                self._waiters.pop(job, None)
                raise JobTimeoutError(name, verb, f"not finished within {timeout} s") from None
        if result not in JOB_SUCCESS:
            raise JobFailedError(name, verb, result)
        return result

    async def start_unit(self, name: str, mode: str = "replace",
                         timeout: Optional[float] = None) -> str:
        """Start a unit and wait for its job; JobFailedError unless it is done."""
        return await self._job("StartUnit", name, mode, timeout)

    async def stop_unit(self, name: str, mode: str = "replace",
                        timeout: Optional[float] = None) -> str:
        return await self._job("StopUnit", name, mode, timeout)

    async def restart_unit(self, name: str, mode: str = "replace",
                           timeout: Optional[float] = None) -> str:
        return await self._job("RestartUnit", name, mode, timeout)

    # -- unit files ------------------------------------------------------------------------

    @staticmethod
    def _changes(raw: Sequence[Sequence[str]]) -> List[UnitFileChange]:
        return [UnitFileChange(*change) for change in raw]

    async def get_unit_file_state(self, name: str) -> str:
        """enabled, disabled, static, masked, alias, ...; UnknownUnitError if no such file."""
        (state,) = await self._manager("GetUnitFileState", "s", [name],
                                       what=f"unit file state of {name}")
        return state

    async def mask_unit_files(self, names: Sequence[str], runtime: bool = False,
                              force: bool = True) -> List[UnitFileChange]:
        (changes,) = await self._manager("MaskUnitFiles", "asbb", [list(names), runtime, force],
                                         what=f"masking {' '.join(names)}")
        return self._changes(changes)

    async def unmask_unit_files(self, names: Sequence[str],
                                runtime: bool = False) -> List[UnitFileChange]:
        (changes,) = await self._manager("UnmaskUnitFiles", "asb", [list(names), runtime],
                                         what=f"unmasking {' '.join(names)}")
        return self._changes(changes)

    async def enable_unit_files(self, names: Sequence[str], runtime: bool = False,
                                force: bool = False) -> List[UnitFileChange]:
        _install_info, changes = await self._manager(
            "EnableUnitFiles", "asbb", [list(names), runtime, force],
            what=f"enabling {' '.join(names)}")
        return self._changes(changes)

    async def disable_unit_files(self, names: Sequence[str],
                                 runtime: bool = False) -> List[UnitFileChange]:
        (changes,) = await self._manager("DisableUnitFiles", "asb", [list(names), runtime],
                                         what=f"disabling {' '.join(names)}")
        return self._changes(changes)

    async def reload(self) -> None:
        """daemon-reload: systemd re-reads unit files; returns when it has."""
        await self._manager("Reload", what="reloading systemd")
        self._paths.clear()

    # -- units -----------------------------------------------------------------------------

    async def list_units(self, patterns: Sequence[str],
                         states: Sequence[str] = ()) -> List[UnitInfo]:
        """Loaded units matching shell-style patterns (getty@*.service)."""
        (units,) = await self._manager("ListUnitsByPatterns", "asas",
                                       [list(states), list(patterns)], what="listing units")
        return [UnitInfo(*unit[:5]) for unit in units]

    async def unit_processes(self, name: str) -> List[Tuple[int, str]]:
        """(pid, command line) of every process in a loaded unit's cgroup, the unit active
        or not: a unit stopped with KillMode=process leaves what it started there."""
        (processes,) = await self._manager("GetUnitProcesses", "s", [name],
                                           what=f"listing the processes of {name}")
        return [(int(pid), command) for _cgroup, pid, command in processes]

    async def kill_unit(self, name: str, signal: int, whom: str = "all") -> None:
        """Send `signal` to a unit's processes ("all": its whole cgroup, stopped or not)."""
        await self._manager("KillUnit", "ssi", [name, whom, signal],
                            what=f"killing the processes of {name}")

    async def list_unit_files(self, patterns: Sequence[str],
                              states: Sequence[str] = ()) -> List[Tuple[str, str]]:
        """(path, state) of installed unit files matching the patterns."""
        (files,) = await self._manager("ListUnitFilesByPatterns", "asas",
                                       [list(states), list(patterns)], what="listing unit files")
        return [(path, state) for path, state in files]

    async def _unit_path(self, name: str) -> str:
        """The unit's object path, loading the unit the first time it is asked for. Kept per
        connection (status reads a few hundred properties) when it is the name's own path:
        systemd loads a unit again when its path is read, but an alias's name leads to
        another unit's path, and to its own once a mask of it is loaded."""
        if name in self._paths:
            return self._paths[name]
        (path,) = await self._manager("LoadUnit", "s", [name], what=f"loading {name}")
        if path == UNIT_PATH_PREFIX + _bus_label(name):
            self._paths[name] = path
        return path

    async def get_unit_property(self, name: str, interface: str, prop: str) -> Any:
        """A property of a unit (loaded on demand), as a plain Python value."""
        path = await self._unit_path(name)
        return await self._client.get_property(path, interface, prop, what=f"{prop} of {name}")

    async def get_unit_properties(self, name: str, interface: str,
                                  props: Sequence[str]) -> Dict[str, Any]:
        """Some properties of one of a unit's interfaces (loaded on demand). One Get each,
        sent together: GetAll's few hundred values cost more to unmarshal (both D-Bus
        libraries are pure Python) than a handful of Gets."""
        path = await self._unit_path(name)
        values = await together(self._client.get_property(path, interface, prop,
                                                          what=f"{prop} of {name}")
                                for prop in props)
        return dict(zip(props, values))

    async def default_target(self) -> str:
        """The unit a boot starts from (what default.target links to)."""
        (name,) = await self._manager("GetDefaultTarget", what="the default target")
        return name

    async def get_environment(self) -> List[str]:
        """The manager's environment ("NAME=value"), which every service it starts inherits."""
        return list(await self._client.get_property(SYSTEMD_PATH, MANAGER, "Environment"))

    async def get_active_state(self, name: str) -> str:
        """active, inactive, failed, activating, deactivating."""
        return await self.get_unit_property(name, UNIT, "ActiveState")

    async def get_load_state(self, name: str) -> str:
        """loaded, not-found, masked, error."""
        return await self.get_unit_property(name, UNIT, "LoadState")

    # -- signals ---------------------------------------------------------------------------

    async def on_unit_files_changed(self, callback: Callable[[], Any]) -> None:
        await self._client.on_signal(MANAGER, "UnitFilesChanged", lambda _m: _schedule(callback))
        await self._subscribe()

    async def on_reloading(self, callback: Callable[[bool], Any]) -> None:
        """callback(active): True when a reload starts, False when it has finished."""
        await self._client.on_signal(MANAGER, "Reloading",
                                     lambda m: _schedule(callback, bool(m.body[0])))
        await self._subscribe()

    async def _subscribe(self) -> None:
        """Ask systemd for its signals, once per connection (a second time is an error)."""
        if not self._subscribed:
            await self._manager("Subscribe")
            self._subscribed = True


class Logind:
    """logind's sessions: list them, end them, hear about new ones."""

    def __init__(self, bus: Connection):
        self._client = _Client(bus, LOGIND)
        self._pending: List[Awaitable[None]] = []

    async def list_sessions(self) -> List[Session]:
        """Every session with its properties; one that ends while listed is left out."""
        (listed,) = await self._client.call(LOGIND_PATH, LOGIND_MANAGER, "ListSessions",
                                            what="listing logind sessions")
        sessions = []
        for session_id, uid, user, seat, path in listed:
            try:
                props = await self._client.get_all(path, SESSION, what=f"session {session_id}")
            except UnknownUnitError:
                continue
            sessions.append(_session(session_id, uid, user, seat, props))
        return sessions

    async def list_users(self) -> List[int]:
        """The uids logind keeps a user manager for: with a session, closing, or lingering."""
        (listed,) = await self._client.call(LOGIND_PATH, LOGIND_MANAGER, "ListUsers",
                                            what="listing logind users")
        return [int(uid) for uid, _name, _path in listed]

    async def terminate_session(self, session_id: str) -> None:
        await self._client.call(LOGIND_PATH, LOGIND_MANAGER, "TerminateSession", "s",
                                [session_id], what=f"terminating session {session_id}")

    async def kill_session(self, session_id: str, signal: int) -> None:
        await self._client.call(LOGIND_PATH, LOGIND_MANAGER, "KillSession", "ssi",
                                [session_id, "all", int(signal)],
                                what=f"killing session {session_id}")

    def on_session_new(self, callback: Callable[[str], Any]) -> None:
        """callback(session_id) for each new session (the subscription completes in the loop)."""
        self._subscribe("SessionNew", callback)

    def on_session_removed(self, callback: Callable[[str], Any]) -> None:
        self._subscribe("SessionRemoved", callback)

    def _subscribe(self, member: str, callback: Callable[[str], Any]) -> None:
        pending = self._client.on_signal(LOGIND_MANAGER, member,
                                         lambda m: _schedule(callback, str(m.body[0])))
        self._pending.append(asyncio.ensure_future(pending))

    async def subscribed(self) -> None:
        """Wait until every signal subscription made so far is in place on the bus."""
        pending, self._pending = self._pending, []
        for subscription in pending:
            await subscription


def _session(session_id: str, uid: int, user: str, seat: str,
             props: Dict[str, Any]) -> Session:
    return Session(
        id=session_id, uid=int(uid), user=user, seat=seat,
        type=str(props.get("Type", "")), class_=str(props.get("Class", "")),
        tty=str(props.get("TTY", "")), remote=bool(props.get("Remote", False)),
        leader=int(props.get("Leader", 0)), scope=str(props.get("Scope", "")),
        state=str(props.get("State", "")),
    )
