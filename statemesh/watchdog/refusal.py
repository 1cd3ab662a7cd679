"""The watchdog's keeping of the terminal filter (statemesh.watchdog.devicefilter).

In force from the watchdog's start. It lets these cgroups open terminals: the watchdog's
own (inotify asks for read permission on each terminal it watches), the exempt units'
(found again whenever a cgroup is made in a slice or below an exempt unit, and at every
round), and while an installation grace runs, its package manager's (apt runs dpkg on a
pty of its own when it has a terminal). Detached by anyone, it is attached again at the
next round, and the journal says so; where that fails, status fails.

Each refusal the kernel tells (the filter's ring buffer) is journaled as a
`terminal-refused` line: the devices and accesses, the uids, the opener's cgroup and unit
and what runs in that cgroup now (a device program cannot read the opener's pid on every
kernel supported: the opener itself has often exited by then). A cgroup's refusals are
counted in one line per read, at most LINES_PER_READ lines a read, and the watchdog reads
again only after a pause ten times what the read cost (REFUSED_PAUSE at least): a loop of
opens, from as many cgroups as the opener makes, costs it lines and a tenth of its time at
most. What is named can be chosen by root: the uid is the real one, which root sets at
will, and a process can be moved into another unit's cgroup before it opens.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from statemesh import bpf, grace, proc
from statemesh.events import log
from statemesh.watchdog import devicefilter
from statemesh.watchdog.inotify import IN_CREATE, IN_IGNORED, Event, Inotify

IN_ONLYDIR = 0x01000000
LOCK = Path("/run/statemesh-node/terminal-filter.lock")
REFUSED_PAUSE = 0.2  # seconds between two reads of the refusals
PROCESSES_NAMED = 3  # of the opener's cgroup, in each terminal-refused line
LINES_PER_READ = 8  # terminal-refused lines; the other cgroups' refusals in one line more
CGROUPS_REMEMBERED = 1024  # names of refused cgroups kept between reads


class Refusal:
    """Attaches and keeps the filter for one watchdog process."""

    def __init__(self, cgroup_root: Path, pins: Path, exempt_units: Tuple[str, ...],
                 inotify: Inotify, hierarchy: Path = devicefilter.CGROUP_ROOT,
                 lock: Path = LOCK):
        self.cgroup_root = cgroup_root  # where it is attached, and below which units are found
        self.hierarchy = hierarchy  # where the cgroup v2 tree's root is mounted
        self.pins = pins
        self.exempt_units = exempt_units
        self.inotify = inotify
        self.filter: Optional[devicefilter.DeviceFilter] = None
        self.installer: Optional[grace.Grace] = None
        self.failure: Optional[str] = None  # the last refusal, logged once
        self.slice_wds: Dict[int, Path] = {}
        self.lock = lock
        # (pid, start) of a grace's package manager -> its cgroup when first seen there
        self.installer_cgroups: Dict[Tuple[int, int], Tuple[int, str]] = {}
        self.told: Optional[bpf.RingBuffer] = None  # the refusals of the filter in force
        self.retired: List[bpf.RingBuffer] = []  # readers of filters replaced, to close
        # id -> path (None: gone), of the cgroups refused lately
        self.cgroup_names: Dict[int, Optional[str]] = {}

    def own_cgroup(self) -> Tuple[int, str]:
        own = devicefilter.process_cgroup(os.getpid(), self.hierarchy)
        if own is None:
            raise OSError(f"this process's cgroup cannot be read below {self.hierarchy}")
        return own

    def admit_self(self) -> None:
        """Before arming any watch: a filter a predecessor left attached (a restart after
        SIGKILL puts this process in a new cgroup) would refuse them otherwise."""
        with contextlib.suppress(OSError):
            devicefilter.admit(self.own_cgroup()[0], self.pins)

    def allowed(self) -> Dict[int, str]:
        """id -> path of every cgroup the filter lets open terminals now."""
        found = devicefilter.cgroups_of_units(self.exempt_units, self.cgroup_root)
        cgroup, path = self.own_cgroup()
        found[cgroup] = path
        if self.installer is not None:
            found.update(self._installers())
        return found

    def _installers(self) -> Dict[int, str]:
        """The cgroup the grace's package manager was in when first seen (its login's scope,
        its unit): where it moves later, or is moved by root, gains nothing; never the root
        cgroup or PID 1's."""
        installer = self.installer
        assert installer is not None
        identity = (installer.pid, installer.start_ticks)
        if identity not in self.installer_cgroups:
            seen = devicefilter.process_cgroup(installer.pid, self.hierarchy)
            if seen is None or seen[1] in ("/", "/init.scope"):
                return {}
            self.installer_cgroups[identity] = seen
        cgroup, path = self.installer_cgroups[identity]
        return {cgroup: path}

    def keep(self, installer: Optional[grace.Grace]) -> None:
        """Attached (or attached again), allowing the grace's package manager while it runs."""
        self.installer = installer
        with self._locked():  # a hand-over's two processes never replace it at once
            kept = self.filter
            if kept is not None and devicefilter.is_attached(kept.prog_id, self.cgroup_root) \
                    and kept.majors == devicefilter.terminal_majors():
                self._pin_again_if_lost()
                self.refresh()
                if self.told is None:  # its reader could not be made: try again
                    self._read_refusals_of(kept)
                return
            previous = self.filter
            try:
                allowed = self.allowed()
                self.filter = devicefilter.enforce(allowed, self.cgroup_root, self.pins)
            except (devicefilter.FilterError, OSError) as error:
                self._failed(str(error))
                return
        if previous is not None:
            previous.close()
        self.failure = None
        if not self.filter.replaced:
            state = "kept"
        elif previous is None:
            state = "attached"
        elif previous.majors != self.filter.majors:
            state = "replaced for new terminal drivers"
        else:
            state = "attached again"
        log("terminal-filter", state=state, program=self.filter.prog_id,
            allowed=sorted(allowed.values()), majors=list(self.filter.majors))
        self._read_refusals_of(self.filter)
        self.watch_slices()

    def _read_refusals_of(self, kept: devicefilter.DeviceFilter) -> None:
        """Read what this filter's ring buffer tells from now on (a kept filter's: what
        was told while no watchdog ran too). The reader before is retired, not closed:
        its fd may still be polled (retire_readers)."""
        try:
            ring = bpf.RingBuffer(kept.events_fd, devicefilter.EVENTS_SIZE, devicefilter.EVENT.size)
        except OSError as error:
            self._failed(f"reading its refusals: {error}")
            return
        if self.told is not None:
            self.retired.append(self.told)
        self.told = ring

    def retire_readers(self) -> None:
        """Tell what the readers of filters replaced still hold, then close them, once
        nothing polls their fds."""
        for ring in self.retired:
            self._tell(ring)
            ring.close()
        self.retired.clear()

    def tell_refusals(self) -> float:
        """Journal the refusals told since the last read; returns the seconds it took."""
        started = time.monotonic()
        if self.told is not None:
            self._tell(self.told)
        return time.monotonic() - started

    def _tell(self, ring: bpf.RingBuffer) -> None:
        """One terminal-refused line per opener's cgroup (the most refused first, at most
        LINES_PER_READ; the rest in one line), its cgroup found by one walk of the tree for
        every cgroup not named before. Whatever the opener chooses (its uid, the device, a
        new cgroup for each open), a read costs at most that."""
        read = ring.read()
        by_cgroup: Dict[int, List[devicefilter.Refused]] = {}
        for record in read.records:
            refused = devicefilter.Refused.decode(record)
            by_cgroup.setdefault(refused.cgroup_id, []).append(refused)
        ranked = sorted(by_cgroup.items(), key=lambda item: -len(item[1]))
        shown, rest = ranked[:LINES_PER_READ], ranked[LINES_PER_READ:]
        self._name_cgroups([cgroup_id for cgroup_id, _ in shown])
        for cgroup_id, refusals in shown:
            cgroup = self.cgroup_names.get(cgroup_id)
            log("terminal-refused", count=len(refusals),
                devices=sorted({f"{one.device} {one.mode}" for one in refusals}),
                uids=sorted({one.uid for one in refusals}), cgroup=cgroup,
                unit=proc.system_unit(cgroup) if cgroup else "",
                processes=self._processes_in(cgroup))
        if rest or read.was_full or read.moved:
            log("terminal-refused-more", count=sum(len(refusals) for _, refusals in rest),
                cgroups=len(rest), buffer_was_full=read.was_full, position_moved=read.moved)

    def _name_cgroups(self, cgroup_ids: List[int]) -> None:
        """The paths of these cgroups (None: gone), the tree walked once for those not named
        before."""
        unknown = [cgroup_id for cgroup_id in cgroup_ids if cgroup_id not in self.cgroup_names]
        if not unknown:
            return
        if len(self.cgroup_names) + len(unknown) > CGROUPS_REMEMBERED:
            self.cgroup_names.clear()
        found = devicefilter.names(unknown, self.hierarchy)
        self.cgroup_names.update({cgroup_id: found.get(cgroup_id) for cgroup_id in unknown})

    def _processes_in(self, cgroup: Optional[str]) -> List[str]:
        """"PID COMMAND" of the first processes in the cgroup now."""
        if cgroup is None:
            return []
        try:
            text = (self.hierarchy / cgroup.lstrip("/") / "cgroup.procs").read_text()
        except OSError:
            return []
        return [f"{pid} {' '.join(proc.cmdline(int(pid)))[:120]}"
                for pid in text.split()[:PROCESSES_NAMED]]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:  # no runtime directory (a test): one process only
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _pin_again_if_lost(self) -> None:
        assert self.filter is not None
        try:
            if self.filter.pin_again_if_lost(self.pins):
                log("terminal-filter", state="pinned again", program=self.filter.prog_id)
        except (bpf.BpfError, OSError) as error:
            self._failed(f"pinning it again: {error}")

    def refresh(self) -> None:
        """The allowed cgroups read again (an exempt unit started or stopped)."""
        if self.filter is None:
            return
        try:
            self.filter.allow(self.allowed())
        except (bpf.BpfError, OSError) as error:
            self._failed(f"updating the allowed cgroups: {error}")

    def watch_slices(self) -> None:
        """A creation watch on every slice and on every cgroup of an exempt unit: where an
        exempt unit's cgroup, or one below it (a container runtime's), is made."""
        if not self.exempt_units:
            return
        below = [self.cgroup_root / path.lstrip("/") for path in
                 devicefilter.cgroups_of_units(self.exempt_units, self.cgroup_root).values()]
        for directory in [*devicefilter.slices(self.cgroup_root), *below]:
            with contextlib.suppress(OSError):
                self.slice_wds[self.inotify.add_watch(str(directory), IN_CREATE | IN_ONLYDIR)] = directory

    def on_event(self, event: Event) -> bool:
        """Whether the event was one of those watches; a cgroup made for an exempt unit or
        below one is allowed at once."""
        directory = self.slice_wds.get(event.wd)
        if directory is None:
            return False
        if event.mask & IN_IGNORED:
            del self.slice_wds[event.wd]
        elif event.name.endswith(".slice") or self._exempt(directory / event.name):
            self.refresh()
            self.watch_slices()
        return True

    def _exempt(self, cgroup: Path) -> bool:
        with contextlib.suppress(ValueError):
            return any(part in self.exempt_units for part in cgroup.relative_to(self.cgroup_root).parts)
        return False

    def _failed(self, why: str) -> None:
        if why != self.failure:
            log("error", what="terminal filter", error=why)
        self.failure = why
