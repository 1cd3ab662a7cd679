"""A private dbus-daemon with stand-in org.freedesktop.systemd1 and org.freedesktop.login1.

Tests never talk to this host's buses: `FakeBus` starts a dbus-daemon of its own (its
config and socket in a temp dir), and runs stand-in systemd and logind services on it in
a background thread. The stand-ins implement the methods the product uses with systemd's
signatures and error names, keep a simple model of units and sessions, record every call,
and can be told to deny access, to fail jobs, or to answer a job before its reply.
Point the product at it with STATEMESH_DBUS_ADDRESS=bus.address.

They can also behave as an older systemd: `FakeBus(workdir, systemd_version=249)` (or
`pytest --systemd-version 249`, which make test-jammy passes: Ubuntu 22.04 has 249) leaves
out every member its interface gained after that version, as systemd's own History records
it (tests/data/systemd-dbus-history.txt). A client asking for one gets the error
systemd 249 would give: the bus's UnknownMethod or UnknownProperty.
"""

import asyncio
import contextlib
import dataclasses
import fnmatch
import functools
import inspect
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import pytest
from dbus_next import DBusError, Message
from dbus_next.aio import MessageBus
from dbus_next.service import PropertyAccess, ServiceInterface, dbus_property, method, signal
from dbus_next.service import _Property  # how dbus-next marks a property; no public name

CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""

UNIT_PREFIX = "/org/freedesktop/systemd1/unit/"
JOB_PREFIX = "/org/freedesktop/systemd1/job/"
SESSION_PREFIX = "/org/freedesktop/login1/session/"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
HISTORY = Path(__file__).resolve().parent.parent / "data" / "systemd-dbus-history.txt"
SYSTEMD = "org.freedesktop.systemd1"
LOGIND = "org.freedesktop.login1"


@functools.lru_cache(maxsize=None)
def added_after_250() -> Dict[Tuple[str, str], int]:
    """(interface, member) -> the systemd version that added it, for everything added after
    250 (the recorded History; anything else is in 249)."""
    added = {}
    for line in HISTORY.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            interface, member, version = line.split()
            added[(interface, member)] = int(version)
    return added


def members(cls: type) -> Set[str]:
    """The D-Bus members (methods, properties, signals) a ServiceInterface class exports."""
    names = set()
    for _name, member in inspect.getmembers(cls):
        if isinstance(member, _Property):
            names.add(member.name)
        for marker in ("__DBUS_METHOD", "__DBUS_SIGNAL"):
            if marker in getattr(member, "__dict__", {}):
                names.add(member.__dict__[marker].name)
    return names


@functools.lru_cache(maxsize=None)
def as_of(cls: type, interface: str, version: Optional[int]) -> type:
    """`cls` without the members `interface` gained after systemd `version` (None: newest).
    dbus-next exports what the class has: a name set to None is not exported."""
    if version is None:
        return cls
    newer = {member: None for member in members(cls)
             if added_after_250().get((interface, member), 0) > version}
    return type(f"{cls.__name__}As{version}", (cls,), newer) if newer else cls


def escape(name: str) -> str:
    """systemd's bus path escaping of a unit name."""
    return "".join(c if c.isalnum() else f"_{ord(c):02x}" for c in name)


@dataclasses.dataclass
class FakeUnit:
    """A unit as the stand-in systemd models it."""

    name: str
    file_state: str = "disabled"  # the state of its file when neither masked nor enabled
    enabled: bool = False
    masked: bool = False
    active_state: str = "inactive"
    exists: bool = True
    fragment: str = ""  # FragmentPath: the unit's file in /lib/systemd/system unless set
    dropins: List[str] = dataclasses.field(default_factory=list)
    transient: bool = False  # started with systemd-run
    # What pulls it in (WantedBy; RequiredBy, BoundBy and UpheldBy are left empty) or
    # triggers it: by default, the boot (enabled, or static and wanted by a boot target).
    wanted_by: List[str] = dataclasses.field(default_factory=lambda: ["multi-user.target"])
    triggered_by: List[str] = dataclasses.field(default_factory=list)
    binds_to: List[str] = dataclasses.field(default_factory=list)
    bus_name: str = ""
    # (pid, command) in its cgroup: a unit stopped with KillMode=process keeps them.
    processes: List[Tuple[int, str]] = dataclasses.field(default_factory=list)
    # As systemd, a mask refuses starts only once a reload has loaded it (and an unmask
    # lets them again only then).
    mask_loaded: Optional[bool] = None
    # ControlGroup's answers in turn, each read taking one and the last one kept (a unit
    # restarting has none a moment); none given: its cgroup under system.slice.
    control_groups: List[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mask_loaded is None:
            self.mask_loaded = self.masked

    def unit_file_state(self) -> str:
        if self.masked:
            return "masked"
        if self.enabled:
            return "enabled"
        return self.file_state


class UnitObject(ServiceInterface):
    """org.freedesktop.systemd1.Unit of one unit (live properties)."""

    def __init__(self, unit: FakeUnit):
        super().__init__("org.freedesktop.systemd1.Unit")
        self.unit = unit

    @dbus_property(access=PropertyAccess.READ)
    def ActiveState(self) -> "s":  # noqa: N802,F821
        return self.unit.active_state

    @dbus_property(access=PropertyAccess.READ)
    def LoadState(self) -> "s":  # noqa: N802,F821
        if self.unit.mask_loaded:
            return "masked"
        return "loaded" if self.unit.exists else "not-found"

    @dbus_property(access=PropertyAccess.READ)
    def FragmentPath(self) -> "s":  # noqa: N802,F821
        return self.unit.fragment or f"/lib/systemd/system/{self.unit.name}"

    @dbus_property(access=PropertyAccess.READ)
    def DropInPaths(self) -> "as":  # noqa: N802,F821
        return self.unit.dropins

    @dbus_property(access=PropertyAccess.READ)
    def NeedDaemonReload(self) -> "b":  # noqa: N802,F821
        return False

    @dbus_property(access=PropertyAccess.READ)
    def Transient(self) -> "b":  # noqa: N802,F821
        return self.unit.transient

    @dbus_property(access=PropertyAccess.READ)
    def WantedBy(self) -> "as":  # noqa: N802,F821
        return self.unit.wanted_by

    @dbus_property(access=PropertyAccess.READ)
    def RequiredBy(self) -> "as":  # noqa: N802,F821
        return []

    @dbus_property(access=PropertyAccess.READ)
    def BoundBy(self) -> "as":  # noqa: N802,F821
        return []

    @dbus_property(access=PropertyAccess.READ)
    def UpheldBy(self) -> "as":  # noqa: N802,F821
        return []

    @dbus_property(access=PropertyAccess.READ)
    def TriggeredBy(self) -> "as":  # noqa: N802,F821
        return self.unit.triggered_by

    @dbus_property(access=PropertyAccess.READ)
    def BindsTo(self) -> "as":  # noqa: N802,F821
        return self.unit.binds_to


def unit_type_interface(name: str) -> str:
    return f"{SYSTEMD}.{name.rpartition('.')[2].capitalize()}"


class UnitTypeObject(ServiceInterface):
    """org.freedesktop.systemd1.Service (Scope, Socket...) of one unit: where systemd keeps
    what only units with processes have."""

    def __init__(self, unit: FakeUnit):
        super().__init__(unit_type_interface(unit.name))
        self.unit = unit

    @dbus_property(access=PropertyAccess.READ)
    def ControlGroup(self) -> "s":  # noqa: N802,F821
        """As systemd: a unit that exists has its cgroup under system.slice."""
        answers = self.unit.control_groups
        if answers:
            return answers.pop(0) if len(answers) > 1 else answers[0]
        return f"/system.slice/{self.unit.name}" if self.unit.exists else ""

    @dbus_property(access=PropertyAccess.READ)
    def BusName(self) -> "s":  # noqa: N802,F821
        return self.unit.bus_name


class FakeSystemd(ServiceInterface):
    """org.freedesktop.systemd1.Manager over a dict of FakeUnit."""

    def __init__(self, bus: MessageBus, version: Optional[int] = None):
        super().__init__(f"{SYSTEMD}.Manager")
        self.bus = bus
        self.version = version  # the systemd it behaves as (None: the newest)
        self.units: Dict[str, FakeUnit] = {}
        self.calls: List[Tuple[str, Any]] = []
        self.denied: Set[str] = set()        # method names answered with AccessDenied
        self.failing: Dict[str, str] = {}    # unit name -> job result other than done
        self.early_job_signal = False       # send JobRemoved before the method's reply
        self.environment: List[str] = []    # the manager's Environment property
        self.after: Dict[str, Callable[[Any], None]] = {}  # method -> what follows a call
        # Units whose stop job runs until KillUnit SIGKILLs their cgroup (TimeoutStopSec=
        # infinity and a main process held by a tracer), each with its stop job once queued.
        self.endless_stops: Dict[str, Optional[Tuple[int, str]]] = {}
        self._jobs = 0
        self._exported: Set[str] = set()
        self._subscribers: Set[str] = set()
        bus.add_message_handler(self._refuse_second_subscribe)
        # Where every unit's default WantedBy leads: the booted machine's target.
        self.add("multi-user.target", file_state="static", active_state="active", wanted_by=[])

    @dbus_property(access=PropertyAccess.READ)
    def Environment(self) -> "as":  # noqa: N802,F821
        return list(self.environment)

    # -- model -----------------------------------------------------------------------------

    def add(self, name: str, **fields: Any) -> FakeUnit:
        unit = FakeUnit(name, **fields)
        self.units[name] = unit
        return unit

    def _guard(self, member: str, args: Any) -> None:
        self.calls.append((member, args))
        if member in self.denied:
            raise DBusError(ACCESS_DENIED, f"Access denied to {member}")
        if member in self.after:
            self.after[member](args)

    def _unit(self, name: str) -> FakeUnit:
        unit = self.units.get(name)
        if unit is None or not (unit.exists or unit.masked):
            raise DBusError("org.freedesktop.systemd1.NoSuchUnit", f"Unit {name} not loaded.")
        return unit

    def _path(self, unit: FakeUnit) -> str:
        path = UNIT_PREFIX + escape(unit.name)
        if path not in self._exported:
            self.bus.export(path, as_of(UnitObject, f"{SYSTEMD}.Unit", self.version)(unit))
            self.bus.export(path, as_of(UnitTypeObject, unit_type_interface(unit.name),
                                        self.version)(unit))
            self._exported.add(path)
        return path

    def _finish_job(self, unit: FakeUnit, verb: str) -> str:
        if verb == "StopUnit" and unit.name in self.endless_stops:
            return self._endless_stop(unit)
        self._jobs += 1
        job = f"{JOB_PREFIX}{self._jobs}"
        result = self.failing.get(unit.name, "done")
        if result == "done":
            unit.active_state = "inactive" if verb == "StopUnit" else "active"
        elif verb != "StopUnit":
            unit.active_state = "failed"
        if self.early_job_signal:
            self.JobRemoved(self._jobs, job, unit.name, result)
        else:
            asyncio.get_running_loop().call_soon(self.JobRemoved, self._jobs, job, unit.name,
                                                 result)
        return job

    def _endless_stop(self, unit: FakeUnit) -> str:
        """As systemd: a second StopUnit of the unit returns the job already running."""
        queued = self.endless_stops[unit.name]
        if queued is None:
            self._jobs += 1
            queued = self.endless_stops[unit.name] = (self._jobs, f"{JOB_PREFIX}{self._jobs}")
        unit.active_state = "deactivating"
        return queued[1]

    def _start(self, verb: str, name: str, mode: str) -> str:
        self._guard(verb, (name, mode))
        unit = self._unit(name)
        if unit.mask_loaded and verb != "StopUnit":
            raise DBusError("org.freedesktop.systemd1.UnitMasked", f"Unit {name} is masked.")
        return self._finish_job(unit, verb)

    # -- methods ---------------------------------------------------------------------------

    @method()
    def StartUnit(self, name: "s", mode: "s") -> "o":  # noqa: N802,F821
        return self._start("StartUnit", name, mode)

    @method()
    def StopUnit(self, name: "s", mode: "s") -> "o":  # noqa: N802,F821
        return self._start("StopUnit", name, mode)

    @method()
    def RestartUnit(self, name: "s", mode: "s") -> "o":  # noqa: N802,F821
        return self._start("RestartUnit", name, mode)

    @method()
    def GetDefaultTarget(self) -> "s":  # noqa: N802,F821
        self._guard("GetDefaultTarget", ())
        return "graphical.target"

    @method()
    def GetUnitProcesses(self, name: "s") -> "a(sus)":  # noqa: N802,F821
        self._guard("GetUnitProcesses", name)
        unit = self._unit(name)
        return [[f"/system.slice/{name}", pid, command] for pid, command in unit.processes]

    @method()
    def KillUnit(self, name: "s", whom: "s", signal: "i") -> None:  # noqa: N802,F821
        self._guard("KillUnit", (name, whom, signal))
        unit = self._unit(name)
        if whom == "all" and signal == 9:
            unit.processes = []
            queued = self.endless_stops.pop(name, None)
            if queued is not None:  # the main process is gone: the stop job is done
                unit.active_state = "inactive"
                asyncio.get_running_loop().call_soon(self.JobRemoved, *queued, name, "done")

    @method()
    def LoadUnit(self, name: "s") -> "o":  # noqa: N802,F821
        self._guard("LoadUnit", name)
        unit = self.units.get(name) or self.add(name, exists=False)
        return self._path(unit)

    @method()
    def GetUnitFileState(self, name: "s") -> "s":  # noqa: N802,F821
        self._guard("GetUnitFileState", name)
        unit = self.units.get(name)
        if unit is None or not (unit.exists or unit.masked):
            raise DBusError("org.freedesktop.DBus.Error.FileNotFound",
                            "No such file or directory")
        return unit.unit_file_state()

    def _changed(self) -> None:
        asyncio.get_running_loop().call_soon(self.UnitFilesChanged)

    @method()
    def MaskUnitFiles(self, names: "as", runtime: "b", force: "b") -> "a(sss)":  # noqa: N802,F821
        self._guard("MaskUnitFiles", (names, runtime, force))
        for name in names:
            (self.units.get(name) or self.add(name, exists=False)).masked = True
        self._changed()
        return [["symlink", f"/etc/systemd/system/{n}", "/dev/null"] for n in names]

    @method()
    def UnmaskUnitFiles(self, names: "as", runtime: "b") -> "a(sss)":  # noqa: N802,F821
        self._guard("UnmaskUnitFiles", (names, runtime))
        changes = []
        for name in names:
            unit = self.units.get(name)
            if unit is not None and unit.masked:
                unit.masked = False
                changes.append(["unlink", f"/etc/systemd/system/{name}", ""])
        self._changed()
        return changes

    @method()
    def EnableUnitFiles(self, names: "as", runtime: "b", force: "b") -> "ba(sss)":  # noqa: N802,F821
        self._guard("EnableUnitFiles", (names, runtime, force))
        for name in names:
            unit = self._unit(name)
            if unit.masked:
                raise DBusError("org.freedesktop.systemd1.UnitMasked", f"Unit {name} is masked.")
            if unit.file_state == "indirect":
                raise DBusError("org.freedesktop.systemd1.BadUnitSetting",
                                "Destination unit getty.target is a non-template unit.")
            unit.enabled = True
        self._changed()
        return [True, [["symlink", f"/etc/systemd/system/multi-user.target.wants/{n}", n]
                       for n in names]]

    @method()
    def DisableUnitFiles(self, names: "as", runtime: "b") -> "a(sss)":  # noqa: N802,F821
        self._guard("DisableUnitFiles", (names, runtime))
        for name in names:
            self._unit(name).enabled = False
        self._changed()
        return [["unlink", f"/etc/systemd/system/multi-user.target.wants/{n}", ""] for n in names]

    @method()
    def Reload(self):  # noqa: N802
        self._guard("Reload", ())
        for unit in self.units.values():
            unit.mask_loaded = unit.masked
        self.Reloading(True)
        self.Reloading(False)

    @method()
    def Subscribe(self):  # noqa: N802
        self._guard("Subscribe", ())

    def _refuse_second_subscribe(self, message: Message) -> Optional[Message]:
        """systemd answers a client's second Subscribe with AlreadySubscribed."""
        if message.member != "Subscribe" or message.interface != self.name:
            return None
        if message.sender in self._subscribers:
            return Message.new_error(message, "org.freedesktop.systemd1.AlreadySubscribed",
                                     "Client is already subscribed.")
        self._subscribers.add(message.sender)
        return None

    @method()
    def ListUnitsByPatterns(self, states: "as", patterns: "as") -> "a(ssssssouso)":  # noqa: N802,F821
        self._guard("ListUnitsByPatterns", (states, patterns))
        listed = []
        for unit in self.units.values():
            if not unit.exists:
                continue
            if patterns and not any(fnmatch.fnmatchcase(unit.name, p) for p in patterns):
                continue
            if states and unit.active_state not in states:
                continue
            listed.append([unit.name, "", "loaded", unit.active_state, "running", "",
                           self._path(unit), 0, "", "/"])
        return listed

    @method()
    def ListUnitFilesByPatterns(self, states: "as", patterns: "as") -> "a(ss)":  # noqa: N802,F821
        self._guard("ListUnitFilesByPatterns", (states, patterns))
        return [[f"/usr/lib/systemd/system/{u.name}", u.unit_file_state()]
                for u in self.units.values()
                if (u.exists or u.masked)
                and (not patterns or any(fnmatch.fnmatchcase(u.name, p) for p in patterns))
                and (not states or u.unit_file_state() in states)]

    # -- signals ---------------------------------------------------------------------------

    @signal()
    def JobRemoved(self, job_id: int, job: str, unit: str, result: str) -> "uoss":  # noqa: N802,F821
        return [job_id, job, unit, result]

    @signal()
    def UnitFilesChanged(self):  # noqa: N802
        return None

    @signal()
    def Reloading(self, active: bool) -> "b":  # noqa: N802,F821
        return active


@dataclasses.dataclass
class FakeSession:
    """A logind session as the stand-in logind models it."""

    id: str
    uid: int = 0
    user: str = "root"
    seat: str = ""
    type: str = "tty"
    class_: str = "user"
    tty: str = ""
    remote: bool = False
    leader: int = 1
    scope: str = ""
    state: str = "active"


class SessionObject(ServiceInterface):
    """org.freedesktop.login1.Session of one session."""

    def __init__(self, session: FakeSession):
        super().__init__("org.freedesktop.login1.Session")
        self.session = session

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":  # noqa: N802,F821
        return self.session.id

    @dbus_property(access=PropertyAccess.READ)
    def Type(self) -> "s":  # noqa: N802,F821
        return self.session.type

    @dbus_property(access=PropertyAccess.READ)
    def Class(self) -> "s":  # noqa: N802,F821
        return self.session.class_

    @dbus_property(access=PropertyAccess.READ)
    def TTY(self) -> "s":  # noqa: N802,F821
        return self.session.tty

    @dbus_property(access=PropertyAccess.READ)
    def Remote(self) -> "b":  # noqa: N802,F821
        return self.session.remote

    @dbus_property(access=PropertyAccess.READ)
    def Leader(self) -> "u":  # noqa: N802,F821
        return self.session.leader

    @dbus_property(access=PropertyAccess.READ)
    def Scope(self) -> "s":  # noqa: N802,F821
        return self.session.scope

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":  # noqa: N802,F821
        return self.session.state


class FakeLogind(ServiceInterface):
    """org.freedesktop.login1.Manager over a dict of FakeSession."""

    def __init__(self, bus: MessageBus, version: Optional[int] = None):
        super().__init__(f"{LOGIND}.Manager")
        self.bus = bus
        self.version = version
        self.sessions: Dict[str, FakeSession] = {}
        self.calls: List[Tuple[str, Any]] = []
        self.denied: Set[str] = set()
        self.after: Dict[str, Callable[[Any], None]] = {}  # method -> what follows a call
        self.lingering: Set[int] = set()  # uids of users whose manager starts at boot

    def _guard(self, member: str, args: Any) -> None:
        self.calls.append((member, args))
        if member in self.denied:
            raise DBusError(ACCESS_DENIED, f"Access denied to {member}")
        if member in self.after:
            self.after[member](args)

    def _path(self, session_id: str) -> str:
        return SESSION_PREFIX + escape(session_id)

    def add(self, session: FakeSession) -> None:
        """Open a session (emits SessionNew, as logind does)."""
        self.sessions[session.id] = session
        self.bus.export(self._path(session.id),
                        as_of(SessionObject, f"{LOGIND}.Session", self.version)(session))
        self.SessionNew(session.id, self._path(session.id))

    def remove(self, session_id: str) -> None:
        self.sessions.pop(session_id)
        self.bus.unexport(self._path(session_id))
        self.SessionRemoved(session_id, self._path(session_id))

    def _existing(self, session_id: str) -> FakeSession:
        if session_id not in self.sessions:
            raise DBusError("org.freedesktop.login1.NoSuchSession",
                            f"No session '{session_id}' known")
        return self.sessions[session_id]

    @method()
    def ListUsers(self) -> "a(uso)":  # noqa: N802,F821
        """The users logind knows: those with a session, and lingering ones."""
        self._guard("ListUsers", ())
        uids = {s.uid for s in self.sessions.values()} | self.lingering
        return [[uid, "root" if uid == 0 else f"user{uid}", f"/org/freedesktop/login1/user/_{uid}"]
                for uid in sorted(uids)]

    @method()
    def ListSessions(self) -> "a(susso)":  # noqa: N802,F821
        self._guard("ListSessions", ())
        return [[s.id, s.uid, s.user, s.seat, self._path(s.id)] for s in self.sessions.values()]

    @method()
    def TerminateSession(self, session_id: "s"):  # noqa: N802,F821
        self._guard("TerminateSession", session_id)
        self._existing(session_id)
        self.remove(session_id)

    @method()
    def KillSession(self, session_id: "s", who: "s", signal_number: "i"):  # noqa: N802,F821
        self._guard("KillSession", (session_id, who, signal_number))
        self._existing(session_id)

    @signal()
    def SessionNew(self, session_id: str, path: str) -> "so":  # noqa: N802,F821
        return [session_id, path]

    @signal()
    def SessionRemoved(self, session_id: str, path: str) -> "so":  # noqa: N802,F821
        return [session_id, path]


class FakeBus:
    """A private dbus-daemon plus the stand-ins, served from a background thread."""

    def __init__(self, workdir: Path, systemd_version: Optional[int] = None):
        self.workdir = workdir
        self.systemd_version = systemd_version
        self.address = ""
        self.systemd: Optional[FakeSystemd] = None
        self.logind: Optional[FakeLogind] = None
        self._daemon: Optional[subprocess.Popen] = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> "FakeBus":
        config = self.workdir / "bus.conf"
        config.write_text(CONFIG.format(socket=self.workdir / "bus.socket"))
        self._daemon = subprocess.Popen(
            ["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self._daemon.stdout is not None
        self.address = self._daemon.stdout.readline().decode().strip()
        if not self.address:
            raise RuntimeError("the private dbus-daemon did not start")
        self._thread.start()
        self.call(self._serve())
        return self

    async def _serve(self) -> None:
        self._bus = await MessageBus(bus_address=self.address).connect()
        version = self.systemd_version
        self.systemd = as_of(FakeSystemd, f"{SYSTEMD}.Manager", version)(self._bus, version)
        self.logind = as_of(FakeLogind, f"{LOGIND}.Manager", version)(self._bus, version)
        self._bus.export("/org/freedesktop/systemd1", self.systemd)
        self._bus.export("/org/freedesktop/login1", self.logind)
        await self._bus.request_name("org.freedesktop.systemd1")
        await self._bus.request_name("org.freedesktop.login1")

    def call(self, coroutine: Any, timeout: float = 30) -> Any:
        """Run a coroutine in the services' loop (to change the model while they serve)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def do(self, function: Any, *args: Any) -> Any:
        """Call a function in the services' loop (signals are emitted from there), and return
        once the bus daemon has routed what it emitted: a client subscribing afterwards must
        not receive those signals."""

        async def wrapper() -> Any:
            result = function(*args)
            await self._bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                         interface="org.freedesktop.DBus.Peer", member="Ping"))
            return result

        return self.call(wrapper())

    def stop(self) -> None:
        if self._thread.is_alive():
            self.call(self._disconnect())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if self._daemon is not None:
            self._daemon.terminate()
            self._daemon.wait(10)
            assert self._daemon.stdout is not None
            self._daemon.stdout.close()

    async def _disconnect(self) -> None:
        self._bus.disconnect()


def debian12_units(fake: FakeSystemd) -> None:
    """The units of a fresh Debian 12 server, as far as the lockdown is concerned."""
    fake.add("ssh.service", enabled=True, active_state="active")
    fake.add("ssh.socket")
    fake.add("sshd.service", file_state="alias")
    fake.add("ssh@.service", file_state="static")
    fake.add("getty@.service", enabled=True)
    fake.add("getty@tty1.service", active_state="active")
    # a template without DefaultInstance, with an [Install] section: "indirect"
    fake.add("serial-getty@.service", file_state="indirect")
    fake.add("serial-getty@ttyS0.service", active_state="active")
    fake.add("autovt@.service", file_state="alias")
    fake.add("console-getty.service")
    fake.add("container-getty@.service", file_state="static")
    fake.add("debug-shell.service")
    fake.add("rescue.service", file_state="static")
    fake.add("emergency.service", file_state="static")
    fake.add("rescue.target", file_state="static")
    fake.add("emergency.target", file_state="static")
    fake.add("kbrequest.target", file_state="static", exists=False)
    package_units(fake)


def package_units(fake: FakeSystemd) -> None:
    """The package's own units, as dpkg unpacked them before the postinst's preflight."""
    for name in ("storage", "harden", "firewall", "watchdog", "vtpm", "state", "atls"):
        fake.add(f"statemesh-{name}.service")
    fake.add("statemesh-state.socket")
    fake.add("statemesh-node.target")


@contextlib.contextmanager
def serving(monkeypatch: pytest.MonkeyPatch, systemd_version: Optional[int]) -> Iterator[FakeBus]:
    """A started FakeBus that the product's D-Bus clients use (STATEMESH_DBUS_ADDRESS)."""
    workdir = Path(tempfile.mkdtemp(prefix="smbus"))  # short: unix socket paths are limited
    bus = FakeBus(workdir, systemd_version).start()
    monkeypatch.setenv("STATEMESH_DBUS_ADDRESS", bus.address)
    try:
        yield bus
    finally:
        bus.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def fakebus(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[FakeBus]:
    """The stand-ins, as the systemd of --systemd-version (the newest without it)."""
    with serving(monkeypatch, request.config.getoption("systemd_version")) as bus:
        yield bus
