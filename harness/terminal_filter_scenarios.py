"""The terminal filter on this host's kernel, confined to a cgroup made for the scenario.

Run by harness.private_devpts (a private mount and PID namespace, its own devpts instance
over /dev/pts and /dev/ptmx). A private bpffs takes the pins and a cgroup v2 mount gives a
cgroup made for the scenario, where the filter is attached instead of the root: only the
scenario's own children, written into its sub-cgroups, are ever refused anything, and the
cgroup is removed at the end. The program the kernel runs is the one the node attaches.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import select
import stat
import subprocess
import tempfile
import time
import types
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

from statemesh import bpf
from statemesh.watchdog import devicefilter
from statemesh.watchdog import refusal as keeping_module
from statemesh.watchdog.inotify import Inotify

# (device, open flags) a child tries; the console may be written, never read
OPENS = (("/dev/ptmx", os.O_RDWR), ("/dev/tty", os.O_RDWR), ("/dev/console", os.O_WRONLY),
         ("/dev/console", os.O_RDWR), ("/dev/null", os.O_RDWR), ("/dev/ttyprintk", os.O_WRONLY))


@contextlib.contextmanager
def _mounted(kind: str, where: Path) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", kind, kind, str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@contextlib.contextmanager
def _scenario_cgroup(cgroup2: Path) -> Iterator[Path]:
    top = cgroup2 / f"statemesh-filter-test-{uuid.uuid4().hex[:12]}"
    top.mkdir()
    try:
        yield top
    finally:
        for directory, _dirs, _files in os.walk(top, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(directory)


def _in_cgroup(cgroup: Path, action: Callable[[], str]) -> str:
    """What `action` says when run by a child written into `cgroup`."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_end)
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
            said = action()
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            said = f"error {error!r}"
        os.write(write_end, said.encode())
        os._exit(0)
    os.close(write_end)
    said = b""
    while True:
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        said += chunk
    os.close(read_end)
    os.waitpid(child, 0)
    return said.decode()


def _opens() -> str:
    """JSON: "path mode" -> "ok" or "errno N"."""
    results: Dict[str, str] = {}
    for path, flags in OPENS:
        if not os.path.exists(path):
            continue
        mode = "w" if flags == os.O_WRONLY else "rw"
        try:
            os.close(os.open(path, flags | os.O_NOCTTY))
            results[f"{path} {mode}"] = "ok"
        except OSError as error:
            results[f"{path} {mode}"] = f"errno {error.errno}"
    return json.dumps(results)


# Device numbers made with mknod by a refused process (allowed: only the open is judged),
# then opened: errno 1 is the filter's refusal, anything else the driver's own answer.
NODES = {"tty5": (4, 5), "ttyS0": (4, 64), "vcs1": (7, 1), "pts-slave": (136, 0),
         "pts-slave-300": (136, 300), "hvc0": (229, 0), "ttyUSB0": (188, 0),
         "ttyprintk": (5, 3), "null": (1, 3), "after-pty-majors": (144, 0)}


def _made_nodes(directory: str) -> Callable[[], str]:
    def make_and_open() -> str:
        results: List[str] = []
        for name, (major, minor) in NODES.items():
            path = os.path.join(directory, name)
            try:
                os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(major, minor))
            except OSError as error:
                results.append(f"{name} mknod errno {error.errno}")
                continue
            try:
                os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY))
                results.append(f"{name} ok")
            except OSError as error:
                results.append(f"{name} errno {error.errno}")
        return "; ".join(results)
    return make_and_open


def _openpty() -> str:
    try:
        master, slave = os.openpty()
    except OSError as error:
        return f"errno {error.errno}"
    os.close(master)
    os.close(slave)
    return "ok"


def _told(made: devicefilter.DeviceFilter, refused: Path) -> List[Any]:
    """The refusals the ring buffer told, as the watchdog reads them: the cgroup named
    "refused" when it is the refused one."""
    ring = bpf.RingBuffer(made.events_fd, devicefilter.EVENTS_SIZE, devicefilter.EVENT.size)
    try:
        told = [devicefilter.Refused.decode(record) for record in ring.read().records]
    finally:
        ring.close()
    return [[one.device, one.mode, one.uid,
             "refused" if one.cgroup_id == devicefilter.cgroup_id(refused) else one.cgroup_id]
            for one in told]


def _attached(top: Path) -> List[int]:
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return bpf.attached_ids(fd)
    finally:
        os.close(fd)


def _tag_swap(top: Path, pins: Path, refused: Path) -> Dict[str, Any]:
    """Root's program of the same code over a map of its own (the same tag), put in place
    of the pinned one and pinned under its name: status must not take it for the filter,
    and the next round replaces it."""
    majors = devicefilter.terminal_majors()
    own_map = bpf.create_hash_map(8, 1, 16, "root_map")
    own_events = bpf.create_ring_buffer(devicefilter.EVENTS_SIZE, "root_events")
    bpf.map_update(own_map, devicefilter.cgroup_id(refused).to_bytes(8, "little"), b"\1")
    own_prog = bpf.load_program(bpf.PROG_TYPE_CGROUP_DEVICE,
                                devicefilter.program(own_map, own_events, majors),
                                devicefilter.PROGRAM_NAME)
    pinned_prog = bpf.pinned(str(pins / devicefilter.PROGRAM_PIN))
    cgroup_fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bpf.attach(cgroup_fd, own_prog, pinned_prog)
        os.unlink(pins / devicefilter.PROGRAM_PIN)
        bpf.pin(own_prog, str(pins / devicefilter.PROGRAM_PIN))
        said: Dict[str, Any] = {"opens_with_roots_program": _in_cgroup(refused, _openpty),
                                "state": devicefilter.state(top, pins).detail}
        next_round = devicefilter.enforce([], top, pins)
        said["next_round_replaced"] = next_round.replaced
        said["opens_after_next_round"] = _in_cgroup(refused, _openpty)
        next_round.close()
        return said
    finally:
        for fd in (own_map, own_events, own_prog, pinned_prog, cgroup_fd):
            os.close(fd)


def _interrupted_attach(top: Path, pins: Path) -> Dict[str, Any]:
    """A watchdog killed between attaching a replacement and moving its pins in place: the
    next start finishes the move and keeps that program, never a second one."""
    new = devicefilter._load((*devicefilter.terminal_majors(), 251))
    old_prog = bpf.pinned(str(pins / devicefilter.PROGRAM_PIN))
    cgroup_fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        devicefilter._pin(pins, devicefilter.NEW, new)
        bpf.attach(cgroup_fd, new.prog, old_prog)  # ... and killed here
        new_id = bpf.program_info(new.prog).prog_id
        started = devicefilter.enforce([], top, pins, majors=(*devicefilter.terminal_majors(), 251))
        said = {"kept_the_attached_one": not started.replaced and started.prog_id == new_id,
                "attached": len(_attached(top)),
                "new_pins_left": sorted(name for name in os.listdir(pins) if name.endswith("-new"))}
        started.close()
        return said
    finally:
        for fd in (*new, old_prog, cgroup_fd):
            os.close(fd)


def _unpinned_extra(top: Path, pins: Path) -> str:
    """A second program of the package's name attached and pinned nowhere (what a watchdog
    killed at the wrong moment could once leave): status says so; purge finds it by name."""
    extra_map = bpf.create_hash_map(8, 1, 16, "extra")
    extra_events = bpf.create_ring_buffer(devicefilter.EVENTS_SIZE, "extra_events")
    extra = bpf.load_program(bpf.PROG_TYPE_CGROUP_DEVICE,
                             devicefilter.program(extra_map, extra_events,
                                                  devicefilter.terminal_majors()),
                             devicefilter.PROGRAM_NAME)
    cgroup_fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bpf.attach(cgroup_fd, extra)
    finally:
        for fd in (extra_map, extra_events, extra, cgroup_fd):
            os.close(fd)  # the attachment holds it
    return devicefilter.state(top, pins).detail


def refusal(devpts: str) -> Dict[str, Any]:
    """Attach, open from a refused and an allowed cgroup, attach again (kept), attach a
    changed program (replaced), read the state back, remove."""
    del devpts  # /dev/ptmx is the private instance's already
    result: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sm-filter-") as scratch, \
            _mounted("bpf", Path(scratch) / "pins") as pins, \
            _mounted("cgroup2", Path(scratch) / "cgroup") as cgroup2, \
            _scenario_cgroup(cgroup2) as top:
        refused, allowed = top / "refused", top / "allowed"
        refused.mkdir()
        allowed.mkdir()
        first = devicefilter.enforce([devicefilter.cgroup_id(allowed)], top, pins)
        result["first"] = {"replaced": first.replaced, "attached": _attached(top)}
        result["refused_opens"] = json.loads(_in_cgroup(refused, _opens))
        result["refusals_told"] = _told(first, refused)
        result["refused_openpty"] = _in_cgroup(refused, _openpty)
        nodes = tempfile.mkdtemp(prefix="sm-nodes-")
        result["refused_made_nodes"] = _in_cgroup(refused, _made_nodes(nodes))
        result["allowed_openpty"] = _in_cgroup(allowed, _openpty)
        again = devicefilter.enforce([devicefilter.cgroup_id(allowed)], top, pins)
        result["again"] = {"replaced": again.replaced, "same": again.prog_id == first.prog_id,
                           "attached": _attached(top)}
        state = devicefilter.state(top, pins)
        result["state"] = {"attached": state.attached, "detail": state.detail,
                           "allowed_is_the_allowed_cgroup":
                               list(state.allowed) == [devicefilter.cgroup_id(allowed)]}
        again.allow([])
        result["allowed_openpty_after_allow_nobody"] = _in_cgroup(allowed, _openpty)
        changed = devicefilter.enforce([], top, pins,
                                       majors=(*devicefilter.terminal_majors(), 250))
        result["changed"] = {"replaced": changed.replaced, "attached": _attached(top),
                             "new": changed.prog_id != first.prog_id}
        result["state_of_another_program"] = devicefilter.state(top, pins).detail
        result["tag_swap"] = _tag_swap(top, pins, refused)
        result["interrupted"] = _interrupted_attach(top, pins)
        result["unpinned_extra"] = _unpinned_extra(top, pins)
        result["removed"] = devicefilter.remove(top, pins)
        result["after_remove"] = {"attached": _attached(top),
                                  "refused_openpty": _in_cgroup(refused, _openpty),
                                  "pins": sorted(os.listdir(pins))}
        for made in (first, again, changed):
            made.close()
    return result


ROUNDS = 20  # the three cgroups take turns, so that a slower moment weighs on each alike


def _timed_opens(count: int, cgroups: Dict[str, Path]) -> Callable[[str], str]:
    """JSON: name -> [nanoseconds, opened] of `count` opens of /dev/ptmx made from each
    cgroup, the process moving from one to the next every count / ROUNDS opens."""
    def run() -> str:
        samples: Dict[str, List[List[Any]]] = {name: [] for name in cgroups}
        per_turn = max(1, count // ROUNDS)
        while any(len(taken) < count for taken in samples.values()):
            for name, cgroup in cgroups.items():
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))
                for _ in range(min(per_turn, count - len(samples[name]))):
                    samples[name].append(_timed_open())
        return json.dumps(samples)
    return run


def _timed_open() -> List[Any]:
    started = time.perf_counter_ns()
    try:
        fd = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)
    except PermissionError:
        return [time.perf_counter_ns() - started, False]
    os.close(fd)
    return [time.perf_counter_ns() - started, True]


def open_timings(count: int) -> Dict[str, Any]:
    """Opens of /dev/ptmx timed from a refused cgroup, from an allowed one, and from one
    with no filter at all (the baseline), in turns, in one run."""
    with tempfile.TemporaryDirectory(prefix="sm-filter-") as scratch, \
            _mounted("bpf", Path(scratch) / "pins") as pins, \
            _mounted("cgroup2", Path(scratch) / "cgroup") as cgroup2, \
            _scenario_cgroup(cgroup2) as top:
        filtered = top / "filtered"
        cgroups = {"baseline": top / "plain", "refused": filtered / "refused",
                   "allowed": filtered / "allowed"}
        filtered.mkdir()
        for directory in cgroups.values():
            directory.mkdir()
        made = devicefilter.enforce([devicefilter.cgroup_id(cgroups["allowed"])], filtered, pins)
        try:
            return json.loads(_in_cgroup(cgroups["baseline"], _timed_opens(count, cgroups)))
        finally:
            made.close()
            devicefilter.remove(filtered, pins)


def _keep_as_a_watchdog(top: Path, pins: Path, hierarchy: Path, installer: int) -> str:
    """JSON: what the watchdog's keeping of the filter did, run from a cgroup of its own;
    `installer` stands for a grace's package manager."""
    logged: List[Dict[str, Any]] = []
    keeping_module.log = lambda event, **fields: logged.append({"event": event, **fields})
    inotify = Inotify()
    keeper = keeping_module.Refusal(top, pins, ("sm-late.service", "work.slice"), inotify,
                                    hierarchy=hierarchy, lock=pins.parent / "filter.lock")
    other, late = top / "other", top / "sm-late.service"
    said: Dict[str, Any] = {}
    keeper.keep(types.SimpleNamespace(pid=installer, start_ticks=0))  # an installation's grace
    said["grace_installer"] = _in_cgroup(top / "installer", _openpty)
    said["grace_other"] = _in_cgroup(other, _openpty)
    for _ in range(2):
        _in_cgroup(other, _openpty)  # the same opener again: counted in one line
    keeper.tell_refusals()
    keeper.tell_refusals()  # nothing more told
    said["flood"] = _flood(keeper, top, logged)
    said["moved"] = _moved_position(keeper, pins, other, logged)
    keeper.keep(None)  # the grace ended
    said["after_grace_installer"] = _in_cgroup(top / "installer", _openpty)
    for made in (late, top / "work.slice" / "job.service"):
        made.mkdir()  # an exempt unit starts; a unit starts in an exempt slice
        select.select([inotify.fileno()], [], [], 5)
        for event in inotify.read():
            keeper.on_event(event)
    said["exempt_unit_started"] = _in_cgroup(late, _openpty)
    said["unit_in_exempt_slice_started"] = _in_cgroup(top / "work.slice" / "job.service", _openpty)
    devicefilter.remove(top, pins)  # root detaches it
    said["detached"] = _in_cgroup(other, _openpty)
    keeper.keep(None)  # the next round
    said["next_round"] = _in_cgroup(other, _openpty)
    for name in devicefilter.PIN_NAMES:
        os.unlink(pins / name)  # the pins lost (unlinked; a bpffs mounted over them)
    keeper.keep(None)
    said["after_lost_pins"] = devicefilter.state(top, pins).attached
    said["log"] = logged
    return json.dumps(said)


def _flood(keeper: keeping_module.Refusal, top: Path, logged: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Refused opens from more cgroups than a read names: the lines one read journals."""
    before = len(logged)
    for index in range(keeping_module.LINES_PER_READ + 4):
        cgroup = top / f"flood-{index}"
        cgroup.mkdir()
        for _ in range(1 + index % 3):
            _in_cgroup(cgroup, _openpty)
    keeper.tell_refusals()
    lines = logged[before:]
    return {"refused_lines": sum(line["event"] == "terminal-refused" for line in lines),
            "more": [{key: line[key] for key in ("count", "cgroups", "buffer_was_full",
                                                 "position_moved")}
                     for line in lines if line["event"] == "terminal-refused-more"]}


def _moved_position(keeper: keeping_module.Refusal, pins: Path, other: Path,
                    logged: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Root writes the ring buffer's consumer position (any holder of the map may): the
    read says so and goes on, and the next refusal is told."""
    events = bpf.pinned(str(pins / devicefilter.EVENTS_PIN))
    try:
        with mmap.mmap(events, mmap.PAGESIZE, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE) as page:
            page[:8] = (1 << 40).to_bytes(8, "little")
    finally:
        os.close(events)
    _in_cgroup(other, _openpty)
    before = len(logged)
    keeper.tell_refusals()
    moved = [line.get("position_moved") for line in logged[before:]
             if line["event"] == "terminal-refused-more"]
    _in_cgroup(other, _openpty)
    before = len(logged)
    keeper.tell_refusals()
    return {"moved_said": moved,
            "next_told": [line["count"] for line in logged[before:]
                          if line["event"] == "terminal-refused"]}


def keeping(devpts: str) -> Dict[str, Any]:
    """statemesh.watchdog.refusal as the watchdog runs it: lifted during a grace, attached
    after, an exempt unit allowed the moment its cgroup is made, attached again after root
    detached it, lifted again."""
    del devpts
    with tempfile.TemporaryDirectory(prefix="sm-filter-") as scratch, \
            _mounted("bpf", Path(scratch) / "pins") as pins, \
            _mounted("cgroup2", Path(scratch) / "cgroup") as cgroup2, \
            _scenario_cgroup(cgroup2) as top:
        for name in ("watchdog", "other", "work.slice", "installer"):
            (top / name).mkdir()
        installer = subprocess.Popen(["sleep", "60"])
        (top / "installer" / "cgroup.procs").write_text(str(installer.pid))
        try:
            said = _in_cgroup(top / "watchdog",
                              lambda: _keep_as_a_watchdog(top, pins, cgroup2, installer.pid))
            if not said.startswith("{"):
                raise RuntimeError(said)
            return json.loads(said)
        finally:
            installer.kill()
            installer.wait()
            devicefilter.remove(top, pins)
