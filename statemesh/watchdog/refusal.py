"""The watchdog's keeping of the terminal filter (statemesh.watchdog.devicefilter).

In force whenever no installation grace runs: during one, the installing session's
package manager opens ptys of its own (apt runs dpkg on one), so the filter waits for the
grace to end, and the kill-on-sight line alone guards meanwhile, as before. The filter
lets exactly two kinds of cgroup open terminals: the watchdog's own (inotify asks for read
permission on each terminal it watches) and the exempt units', found again whenever one
is made in a slice and at every round. Detached by anyone, it is attached again at the
next round, and the journal says so.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

from statemesh import bpf, proc
from statemesh.events import log
from statemesh.watchdog import devicefilter
from statemesh.watchdog.inotify import IN_CREATE, IN_IGNORED, Event, Inotify

IN_ONLYDIR = 0x01000000


class Refusal:
    """Attaches, keeps and lifts the filter for one watchdog process."""

    def __init__(self, cgroup_root: Path, pins: Path, exempt_units: Tuple[str, ...],
                 inotify: Inotify, hierarchy: Path = devicefilter.CGROUP_ROOT):
        self.cgroup_root = cgroup_root  # where it is attached, and below which units are found
        self.hierarchy = hierarchy  # where the cgroup v2 tree's root is mounted
        self.pins = pins
        self.exempt_units = exempt_units
        self.inotify = inotify
        self.filter: Optional[devicefilter.DeviceFilter] = None
        self.failure: Optional[str] = None  # the last refusal, logged once
        self.slice_wds: Dict[int, Path] = {}

    def own_cgroup(self) -> int:
        return devicefilter.cgroup_id(self.hierarchy / proc.cgroup_path(os.getpid()).lstrip("/"))

    def admit_self(self) -> None:
        """Before arming any watch: a filter a predecessor left attached (a restart after
        SIGKILL puts this process in a new cgroup) would refuse them otherwise."""
        with contextlib.suppress(OSError):
            map_fd = bpf.pinned(str(self.pins / devicefilter.MAP_PIN))
            try:
                bpf.map_update(map_fd, self.own_cgroup().to_bytes(8, "little"), b"\1")
            finally:
                os.close(map_fd)

    def allowed(self) -> Dict[int, str]:
        """id -> path of every cgroup the filter lets open terminals now."""
        found = devicefilter.cgroups_of_units(self.exempt_units, self.cgroup_root)
        found[self.own_cgroup()] = proc.cgroup_path(os.getpid())
        return found

    def keep(self, grace_running: bool) -> None:
        """Attached (or attached again) while no grace runs; lifted while one does."""
        if grace_running:
            self._lift()
            return
        if self.filter is not None and self._attached(self.filter.prog_id):
            self.refresh()
            return
        again = self.filter is not None
        try:
            allowed = self.allowed()
            self.filter = devicefilter.enforce(allowed, self.cgroup_root, self.pins)
        except (devicefilter.FilterError, OSError) as error:
            self._failed(str(error))
            return
        self.failure = None
        state = "attached again" if again else ("attached" if self.filter.replaced else "kept")
        log("terminal-filter", state=state, program=self.filter.prog_id,
            allowed=sorted(allowed.values()))
        self.watch_slices()

    def refresh(self) -> None:
        """The allowed cgroups read again (an exempt unit started or stopped)."""
        if self.filter is None:
            return
        try:
            self.filter.allow(self.allowed())
        except (bpf.BpfError, OSError) as error:
            self._failed(f"updating the allowed cgroups: {error}")

    def watch_slices(self) -> None:
        """A creation watch on every slice, where an exempt unit's cgroup would be made."""
        if not self.exempt_units:
            return
        for directory in devicefilter.slices(self.cgroup_root):
            with contextlib.suppress(OSError):
                self.slice_wds[self.inotify.add_watch(str(directory), IN_CREATE | IN_ONLYDIR)] = directory

    def on_event(self, event: Event) -> bool:
        """Whether the event was a slice's; a new exempt unit's cgroup is allowed at once."""
        directory = self.slice_wds.get(event.wd)
        if directory is None:
            return False
        if event.mask & IN_IGNORED:
            del self.slice_wds[event.wd]
        elif event.name.endswith(".slice"):
            self.watch_slices()
        elif event.name in self.exempt_units:
            self.refresh()
        return True

    def _attached(self, prog_id: int) -> bool:
        try:
            cgroup_fd = os.open(self.cgroup_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            return prog_id in bpf.attached_ids(cgroup_fd)
        except bpf.BpfError:
            return False
        finally:
            os.close(cgroup_fd)

    def _lift(self) -> None:
        if self.filter is None and not (self.pins / devicefilter.PROGRAM_PIN).exists():
            return
        try:
            detached = devicefilter.remove(self.cgroup_root, self.pins)
        except (bpf.BpfError, OSError) as error:
            self._failed(f"lifting it for the installation grace: {error}")
            return
        if self.filter is not None:
            self.filter.close()
            self.filter = None
        if detached:
            log("terminal-filter", state="lifted", why="installation grace")

    def _failed(self, why: str) -> None:
        if why != self.failure:
            log("error", what="terminal filter", error=why)
        self.failure = why
