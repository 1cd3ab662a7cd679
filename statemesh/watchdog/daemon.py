"""The terminal watchdog: every pty/tty session on the node is ended the moment it appears.

Anything that gives root a terminal (a getty, `script`, `systemd-run --pty`,
`machinectl shell`, any program calling openpty) is a way into the workloads. The seed
polled `ls /dev/pts` every second; here the kernel tells us instead:
- inotify IN_CREATE on the devpts mount: a new /dev/pts/N, reported before its slave side
  is even opened (the opener holds the master, which fdinfo's tty-index names), and looked
  at again a few times shortly after, for holders the first scan could not see yet;
- inotify IN_OPEN on each /dev/pts/N while it exists: whoever opens the slave of a pty that
  is spared (an exempt workload's, the installing session's) or not yet ended;
- inotify IN_OPEN on each terminal device (/dev/ttyN, serial ports, /dev/console);
- logind's SessionNew over D-Bus, which also ends sessions without a terminal (remote);
- a periodic full reconcile, the safety net for anything the events could miss.
Holders are SIGKILLed at once (a shell ignores SIGTERM); the logind session they belong to
is then terminated so that logind and systemd clean up the rest of the login. On SIGHUP the
role passes to a successor without a gap (statemesh.watchdog.handover).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, Protocol, Set, Tuple

from statemesh import bpf, grace, proc
from statemesh.events import log
from statemesh.watchdog import devicefilter, handover, terminals
from statemesh.watchdog.refusal import REFUSED_PAUSE, Refusal
from statemesh.watchdog.inotify import (IN_CLOSE_WRITE, IN_CREATE, IN_IGNORED, IN_MOVED_TO,
                                        IN_OPEN, IN_Q_OVERFLOW, Inotify)

RECONCILE_SECONDS = 10.0
FULL_SCAN_EVERY = 6  # reconcile rounds: a full scan of every fd once a minute
# Terminal devices a login can be given on. tty0 and /dev/tty only alias one of these.
TTY_NAMES = re.compile(r"^(tty[1-9][0-9]*|ttyS[0-9]+|ttyAMA[0-9]+|ttyUSB[0-9]+|ttyACM[0-9]+|hvc[0-9]+|console)$")
# A kill loop ends when a pass finds no new holder; this bounds a fork bomb's hold on it.
MAX_ROUNDS = 20
INTERACTIVE_SESSION_TYPES = frozenset({"tty", "x11", "wayland", "mir"})
# System units that hold terminal devices without giving anyone a terminal: logind keeps
# fds on VTs (ReserveVT, VT switching). Killing it would only break session tracking.
SYSTEM_UNITS = ("systemd-logind.service",)
# D-Bus calls to logind get this long: logind restarting must never stall the watchdog.
LOGIND_TIMEOUT = 10.0
# A pty created or opened is looked at again after these delays (seconds): see _recheck_later.
RECHECK_DELAYS = (0.005, 0.02, 0.1, 0.5, 2.0)
# How often every mount namespace is looked at for a devpts instance not watched yet.
DISCOVER_SECONDS = 1.0
# How often a running grace is looked at for a stopped package manager or a passed deadline.
GRACE_POLL_SECONDS = 0.5
# A successor gets this long to arm its watches; the running watchdog guards meanwhile.
HANDOVER_TIMEOUT = 60.0


@dataclasses.dataclass(frozen=True)
class Settings:
    """Where the watchdog looks; tests point it at a private devpts and empty directories."""

    devpts: str = "/dev/pts"
    dev: str = "/dev"
    grace_path: Path = grace.GRACE_PATH
    exempt_units: Tuple[str, ...] = ()
    logind: bool = True
    reconcile_seconds: float = RECONCILE_SECONDS
    # The cgroup v2 tree whose root the terminal filter is attached to; None: no filter
    # (tests, which must never refuse this machine's terminals).
    filter_cgroup: Optional[Path] = None
    filter_pins: Path = devicefilter.PIN_DIRECTORY


class WatchdogError(RuntimeError):
    """The watchdog cannot watch what it was told to (a wrong path, most likely)."""


class SessionManager(Protocol):
    """The part of statemesh.systemd.Logind the watchdog uses."""

    async def list_sessions(self) -> List[Any]: ...

    async def terminate_session(self, session_id: str) -> None: ...

    async def kill_session(self, session_id: str, signal: int) -> None: ...

    def on_session_new(self, callback: Callable[[str], Any]) -> None: ...

    async def subscribed(self) -> None: ...


def exempt_unit(cgroup: str, exempt: Tuple[str, ...]) -> Optional[str]:
    """The exempt unit (service, scope or slice) whose cgroup contains this path, if any."""
    for part in cgroup.split("/"):
        if part in exempt:
            return part
    return None


def spare_reason(process: terminals.Process, cgroup: str, exempt: Tuple[str, ...],
                 current_grace: Optional[grace.Grace],
                 from_a_login: Callable[[int], bool] = proc.born_of_a_login) -> Optional[str]:
    """Why a holder must not be killed, or None: the watchdog's whole no-false-kill policy.

    An exempt unit's cgroup is not enough: root can write any pid into cgroup.procs. Its
    processes are systemd's children, which no login started; a login's processes carry
    their loginuid wherever they are moved (from_a_login), so they are never exempt."""
    if process.pid == os.getpid():
        return "self"
    if process.pid == 1:
        return "init"
    if process.kernel_thread or process.pid == 2 or process.ppid == 2:
        return "kernel thread"
    unit = exempt_unit(cgroup, SYSTEM_UNITS + exempt)
    if unit and not from_a_login(process.pid):
        return f"exempt unit {unit}"
    if current_grace is not None and current_grace.spares(process.pid, process.sid, cgroup):
        return "installation grace"
    return None


def session_spared(session: Any, exempt: Tuple[str, ...],
                   current_grace: Optional[grace.Grace]) -> bool:
    """Whether a logind session may stay: not a way in (no terminal, seat or remote login),
    an exempt unit's, or the installing one while the package manager runs."""
    interactive = bool(session.tty) or bool(session.remote) or session.type in INTERACTIVE_SESSION_TYPES
    if not interactive:
        return True
    if current_grace is not None and current_grace.session == session.id:
        return True
    return exempt_unit(session.scope or "", exempt) is not None


class Watchdog:
    """Watches for terminals and ends every one that is not spared."""

    def __init__(self, settings: Settings,
                 connect: Optional[Callable[[], Awaitable[SessionManager]]] = None):
        self.settings = settings
        self.connect = connect
        self.sessions: Optional[SessionManager] = None
        self.logind_warned = False
        if not terminals.is_devpts_mount(settings.devpts):
            raise WatchdogError(f"{settings.devpts} is not a devpts mount")
        if not os.path.isdir(settings.dev):
            raise WatchdogError(f"{settings.dev} is not a directory of terminal devices")
        self.inotify = Inotify()
        self.refusal: Optional[Refusal] = None
        self.keeps_filter = True  # until it hands over
        self.refused: Optional[bpf.RingBuffer] = None  # where the filter's refusals are read
        if settings.filter_cgroup is not None:
            self.refusal = Refusal(settings.filter_cgroup, settings.filter_pins,
                                   settings.exempt_units, self.inotify)
            self.refusal.admit_self()
        # IN_CREATE watches on every devpts instance -> (its path from here, its st_dev)
        self.devpts_wds: Dict[int, Tuple[str, int]] = {}
        self.instances: Dict[int, str] = {}  # st_dev -> path, of every instance watched
        self._watch_devpts(settings.devpts)
        self.dev_wd = self.inotify.add_watch(settings.dev, IN_CREATE)
        self.tty_wds: Dict[int, str] = {}
        # IN_OPEN watch on each pty node -> the pty, kept: an open may be reported after the
        # node went (its master closed), and the opener still holds the pty's slave
        self.pty_wds: Dict[int, terminals.Terminal] = {}
        self.grace_wd = self._watch_grace_directory()
        self.grace: Optional[grace.Grace] = None
        self.grace_fd: Optional[int] = None
        self.grace_poll: Optional[asyncio.TimerHandle] = None
        self.grace_deadline: Optional[float] = None  # the earliest read in this run
        self.graces_ended: Set[Tuple[int, int]] = set()  # installers (pid, start) seen end
        self.tty_rdevs: Set[int] = set()
        self.tty_paths: Set[str] = set()  # every terminal device, watched or not
        self.killed: Set[Tuple[int, int]] = set()  # SIGKILLed, perhaps not dead yet
        self._watch_existing_terminals()
        self.watch_devpts_instances()

    # -- event sources -------------------------------------------------------

    def _watch_existing_terminals(self) -> None:
        """An open watch on every terminal there is now: at start, and after the kernel's
        queue overflowed, which loses the creation events of ptys we then never watched.
        Watching a node twice is harmless: the kernel returns the watch it has."""
        for name in sorted(os.listdir(self.settings.dev)):
            self._watch_tty(name)
        for devpts in list(self.instances.values()):
            self._watch_ptys_of(devpts)

    def _watch_devpts(self, devpts: str) -> bool:
        """An IN_CREATE watch on a devpts instance; whether it is one not watched before. The
        kernel gives an inode it watches already the same watch, and a new instance a new
        one even where it reuses a gone instance's device number."""
        try:
            dev = os.stat(devpts).st_dev
            wd = self.inotify.add_watch(devpts, IN_CREATE)
        except OSError:
            return False  # its namespace went, or its mount
        known = self.devpts_wds.get(wd)
        if known is None or not os.path.exists(known[0]):
            self.devpts_wds[wd] = (devpts, dev)  # new, or reached through a process now gone
            self.instances[dev] = devpts
        return known is None

    def _watch_ptys_of(self, devpts: str) -> None:
        try:
            names = os.listdir(devpts)
        except OSError:
            return
        for name in names:
            self._watch_pty(devpts, name)

    def watch_devpts_instances(self) -> bool:
        """Watch every devpts instance of every mount namespace (`unshare -m` and a
        newinstance mount make one that /dev/pts never shows), and the ptys already in it;
        whether a new one was found. No event tells of a new namespace or mount, and the
        kernel sends none for opens of ptmx (FMODE_NONOTIFY): they are looked for every
        DISCOVER_SECONDS."""
        found = False
        for dev, devpts in terminals.devpts_instances().items():
            if self._watch_devpts(devpts):
                log("devpts", path=devpts, instance=f"{os.major(dev)}:{os.minor(dev)}")
                self._watch_ptys_of(devpts)
                found = True
        return found

    def discover(self) -> None:
        """A new devpts instance: end every pty in it now, and look again shortly after."""
        if self.watch_devpts_instances():
            self.reconcile("devpts-found")
            self._recheck_later(None, 0)

    def _watch_grace_directory(self) -> Optional[int]:
        try:
            return self.inotify.add_watch(str(self.settings.grace_path.parent), IN_CLOSE_WRITE | IN_MOVED_TO)
        except FileNotFoundError:
            return None  # no installation in progress can record a grace without this directory

    def _watch_tty(self, name: str) -> Optional[terminals.Terminal]:
        if not TTY_NAMES.match(name):
            return None
        terminal = terminals.tty_device(os.path.join(self.settings.dev, name))
        if terminal is None:
            return None
        self.tty_paths.add(terminal.path)
        self.tty_rdevs.add(terminal.rdev)
        try:
            wd = self.inotify.add_watch(terminal.path, IN_OPEN)
        except OSError as error:  # the reconcile still covers it; say so and go on
            log("error", what=f"watching {terminal.path}", error=str(error))
            return terminal
        self.tty_wds[wd] = terminal.path
        return terminal

    def _watch_pty(self, devpts: str, name: str) -> Optional[terminals.Terminal]:
        """The pty `name`, watched for opens of its slave until the node goes away."""
        terminal = terminals.pty(devpts, name)
        if terminal is None:
            return None
        try:
            self.pty_wds[self.inotify.add_watch(terminal.path, IN_OPEN)] = terminal
        except OSError:
            pass  # gone already: its master was closed, nobody can open it any more
        return terminal

    def on_inotify(self) -> None:
        """Turn the queued inotify events into terminals to end, then end them."""
        found: Dict[terminals.Key, terminals.Terminal] = {}
        reconcile = False
        for event in self.inotify.read():
            terminal: Optional[terminals.Terminal] = None
            if event.mask & IN_Q_OVERFLOW:
                reconcile = True
            elif event.wd in self.devpts_wds:
                terminal = self._on_devpts_event(event)
            elif event.wd in self.pty_wds:
                if event.mask & IN_IGNORED:
                    del self.pty_wds[event.wd]
                else:
                    terminal = self.pty_wds[event.wd]
            elif event.wd == self.dev_wd:
                terminal = self._watch_tty(event.name)
            elif event.wd in self.tty_wds:
                terminal = terminals.tty_device(self.tty_wds[event.wd])
            elif event.wd == self.grace_wd and event.name == self.settings.grace_path.name:
                self.load_grace()
            elif self.refusal is not None:
                self.refusal.on_event(event)
            if terminal is not None:
                found[terminal.key] = terminal
        if reconcile:
            self._watch_existing_terminals()
            self.reconcile("overflow")
        elif found:
            self.end_terminals(list(found.values()), "inotify")
            ptys = [terminal for terminal in found.values() if terminal.is_pty]
            if ptys:
                self._recheck_later(ptys, 0)

    def _on_devpts_event(self, event: Any) -> Optional[terminals.Terminal]:
        devpts, dev = self.devpts_wds[event.wd]
        if event.mask & IN_IGNORED:  # the instance was unmounted: its namespace is gone
            del self.devpts_wds[event.wd]
            if self.instances.get(dev) == devpts:
                del self.instances[dev]
            return None
        return self._watch_pty(devpts, event.name)

    def _recheck_later(self, ptys: Optional[List[terminals.Terminal]], attempt: int) -> None:
        """Look again, a few times shortly after, for holders of ptys just created or opened.

        The kernel reports both from inside the open, before the opener's fd exists, and no
        event follows when it does: a scan can come in between when the opener is preempted
        (often, in a busy guest), and so can a second opener of the same pty (the service of
        `systemd-run --pty`, while its client is being killed). Terminal devices are not
        looked at again: systemd opens /dev/console write-only for every service it starts,
        and the periodic check finds a getty within seconds. None: every pty, of every
        instance (one just found)."""
        if attempt < len(RECHECK_DELAYS):
            asyncio.get_running_loop().call_later(RECHECK_DELAYS[attempt], self._recheck, ptys, attempt)

    def _recheck(self, ptys: Optional[List[terminals.Terminal]], attempt: int) -> None:
        if ptys is None:
            self.reconcile("devpts-recheck")
        else:
            self.end_terminals(ptys, "inotify-recheck")
        self._recheck_later(ptys, attempt + 1)

    def load_grace(self) -> None:
        """(Re)read the installation grace record, believing it only so far: never for
        pid 1 (whose descendants are every process), never again for an installer this
        watchdog has seen end, and never past the earliest deadline it has read, whatever
        the file says later (the spared root can rewrite it, or remove it and install
        again). Wakes up when the package manager exits; looks every GRACE_POLL_SECONDS
        for what gives no event: a stop, the deadline. It never writes the record."""
        before = self.grace
        self._forget_grace_watch()
        record = grace.recorded(self.settings.grace_path)
        if record is not None and record.ends_at is not None:
            self.grace_deadline = min(self.grace_deadline or record.ends_at, record.ends_at)
        running = (record is not None and grace.is_running(record) and self._believable(record)
                   and not self._past_deadline())
        self.grace = record if running else None
        if self.grace is not None and not self._watch_installer(self.grace):
            self.grace = None
        if self.grace is None and before is not None:
            self._after_grace(before, "grace record")
        elif self.grace is not None:
            self.keep_filter()

    def _past_deadline(self) -> bool:
        """The earliest deadline read has passed: no record believed again in this run."""
        return self.grace_deadline is not None and grace.boottime() >= self.grace_deadline

    def _believable(self, found: grace.Grace) -> bool:
        return found.pid > 1 and (found.pid, found.start_ticks) not in self.graces_ended

    def _watch_installer(self, installer: grace.Grace) -> bool:
        try:
            self.grace_fd = os.pidfd_open(installer.pid)
        except ProcessLookupError:
            return False
        if proc.start_ticks(installer.pid) != installer.start_ticks:
            return False  # the pid was reused between reading and opening it
        log("grace", pid=installer.pid, session=installer.session, sid=installer.sid,
            tty=installer.tty, command=installer.command, ends_at=self.grace_deadline)
        loop = asyncio.get_running_loop()
        loop.add_reader(self.grace_fd, self._end_grace, "exited")
        if self.grace_poll is None:  # never put off by a rewritten record: one look each period
            self.grace_poll = loop.call_later(GRACE_POLL_SECONDS, self._poll_grace)
        return True

    def _forget_grace_watch(self) -> None:
        """The installer's pidfd closed; the period's look stays scheduled (it ends itself
        once no grace runs), so that rewriting the record cannot put it off."""
        if self.grace_fd is not None:
            asyncio.get_running_loop().remove_reader(self.grace_fd)
            os.close(self.grace_fd)
            self.grace_fd = None

    def _poll_grace(self) -> None:
        self.grace_poll = None
        installer = self.grace
        if installer is None:
            return
        if proc.is_stopped(installer.pid):
            self._end_grace("stopped")
        elif self.grace_deadline is not None and grace.boottime() >= self.grace_deadline:
            self._end_grace("deadline")
        else:
            self.grace_poll = asyncio.get_running_loop().call_later(GRACE_POLL_SECONDS,
                                                                    self._poll_grace)

    def _end_grace(self, why: str) -> None:
        """The grace is over for good: continuing a stopped installer gives nothing back."""
        installer = self.grace
        self._forget_grace_watch()
        self.grace = None
        if installer is not None:
            self.graces_ended.add((installer.pid, installer.start_ticks))
            self._after_grace(installer, why)

    def _after_grace(self, installer: grace.Grace, why: str) -> None:
        log("grace-ended", pid=installer.pid, why=why)
        self.keep_filter()
        self.reconcile("grace-ended")
        asyncio.get_running_loop().create_task(self.end_sessions())

    def keep_filter(self) -> None:
        """The kernel refuses terminal opens (statemesh.watchdog.refusal); a grace's
        package manager may open them while it runs. The refusals it tells are read."""
        if self.refusal is not None and self.keeps_filter:
            self.refusal.keep(self.grace)
            self._read_refusals(self.refusal.told)

    def _read_refusals(self, ring: Optional[bpf.RingBuffer]) -> None:
        """Journal the refusals told through `ring` whenever some wait (the filter in
        force's); the reader before is no longer polled, then closed."""
        if ring is self.refused:
            return
        loop = asyncio.get_running_loop()
        if self.refused is not None:
            loop.remove_reader(self.refused.fd)
        self.refused = ring
        if ring is not None:
            loop.add_reader(ring.fd, self._on_refusals)
        if self.refusal is not None:
            self.refusal.retire_readers()

    def _on_refusals(self) -> None:
        """Told, then deaf for a moment ten times what telling cost: a loop of refused
        opens costs the watchdog a tenth of its time at most."""
        assert self.refusal is not None and self.refused is not None
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.refused.fd)
        took = 0.0
        try:
            took = self.refusal.tell_refusals()
        except Exception as error:  # noqa: BLE001 - the next read tries again
            log("error", what="telling refused terminal opens", error=repr(error))
        finally:
            loop.call_later(max(REFUSED_PAUSE, 10 * took), self._listen_again, self.refused)

    def stop_reading_refusals(self) -> None:
        self._read_refusals(None)

    def _listen_again(self, ring: bpf.RingBuffer) -> None:
        if ring is self.refused:
            asyncio.get_running_loop().add_reader(ring.fd, self._on_refusals)

    # -- ending terminals ----------------------------------------------------

    def _all_terminals(self) -> List[terminals.Terminal]:
        found = [terminal for devpts in list(self.instances.values())
                 for terminal in self._ptys_of(devpts)]
        for path in sorted(self.tty_paths):
            terminal = terminals.tty_device(path)
            if terminal is not None:
                found.append(terminal)
        return found

    @staticmethod
    def _ptys_of(devpts: str) -> List[terminals.Terminal]:
        try:
            return terminals.ptys(devpts)
        except OSError:
            return []  # the namespace it was reached through is gone; the next round looks again

    def reconcile(self, source: str = "reconcile") -> None:
        """The safety net: end every terminal in use now, and every pty of any devpts
        instance, watched or not, whatever the events said."""
        self.end_terminals(self._all_terminals(), source, every_pty=True)

    def periodic(self, rounds: int) -> Optional[str]:
        """A cheap check every round (a pty exists, a process has a controlling tty), the
        full scan of every process's fds on every FULL_SCAN_EVERY-th round or when the cheap
        check finds something: that keeps the idle watchdog near zero CPU. Returns the kind
        of reconcile done, if any."""
        full = rounds % FULL_SCAN_EVERY == 0
        ptys_exist = any(self._ptys_of(devpts) for devpts in list(self.instances.values()))
        if not full and not ptys_exist and not terminals.controlling_ttys():
            return None
        source = "reconcile" if full else "reconcile-check"
        self.reconcile(source)
        return source

    def end_terminals(self, wanted: List[terminals.Terminal], source: str,
                      every_pty: bool = False) -> None:
        """SIGKILL every holder (of `wanted`; with every_pty, of any pty too) that is not
        spared, pass after pass until none is left."""
        self.killed = {identity for identity in self.killed
                       if proc.start_ticks(identity[0]) == identity[1]}
        decided = set(self.killed)  # (pid, start) of holders killed or spared
        sessions: Set[str] = set()
        for _ in range(MAX_ROUNDS):
            killed = 0
            for terminal, process in terminals.holders(wanted, frozenset(self.tty_rdevs),
                                                       every_pty, self.instances):
                identity = (process.pid, process.start_ticks)
                if identity in decided:
                    continue
                decided.add(identity)
                cgroup = proc.cgroup_path(process.pid)
                if spare_reason(process, cgroup, self.settings.exempt_units, self.grace):
                    continue
                if self._kill(terminal, process, cgroup, source):
                    self.killed.add(identity)
                    killed += 1
                    session = grace.logind_session(cgroup)
                    if session:
                        sessions.add(session)
            if not killed:
                break
        for session in sorted(sessions):
            self._end_session(session, f"held a terminal ({source})")

    def _kill(self, terminal: terminals.Terminal, process: terminals.Process, cgroup: str,
              source: str) -> bool:
        """SIGKILL one holder and log it; False if it was already gone."""
        uid, command = terminals.describe(process.pid)  # read first: gone once it is dead
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        user = terminals.user_name(uid)
        ages = [process.age()]
        if terminal.appeared is not None:
            ages.append(time.time() - terminal.appeared)
        log("kill", pid=process.pid, user=user, terminal=terminal.path, command=command,
            latency_ms=round(max(0.0, min(ages)) * 1000, 3), source=source,
            session=grace.logind_session(cgroup))
        return True

    def _end_session(self, session_id: str, why: str) -> None:
        if self.sessions is None:
            return
        asyncio.get_running_loop().create_task(self._terminate(session_id, why))

    async def _terminate(self, session_id: str, why: str) -> None:
        sessions = self.sessions
        if sessions is None:
            return
        try:
            await asyncio.wait_for(sessions.kill_session(session_id, signal.SIGKILL), LOGIND_TIMEOUT)
            await asyncio.wait_for(sessions.terminate_session(session_id), LOGIND_TIMEOUT)
        except (KeyError, IndexError) as error:  # a bug, never an answer of logind's
            log("error", what=f"terminating logind session {session_id}", error=repr(error))
            return
        except LookupError:  # logind knows it no more: it ended with its last process
            log("session-gone", session=session_id, why=why)
            return
        except Exception as error:  # noqa: BLE001 - a failing bus must not stop us
            log("error", what=f"terminating logind session {session_id}", error=str(error))
            return
        log("terminate-session", session=session_id, why=why)

    # -- logind --------------------------------------------------------------

    async def _connect_sessions(self) -> None:
        """Connect to logind if not connected; without it the terminal sources still work."""
        if self.sessions is not None or self.connect is None:
            return
        try:
            self.sessions = await self.connect()
        except Exception as error:  # noqa: BLE001 - no bus yet: retried at the next reconcile
            if not self.logind_warned:
                log("error", what="connecting to logind", error=str(error))
                self.logind_warned = True
            return
        self.sessions.on_session_new(self.on_session_new)
        await self.sessions.subscribed()
        log("logind", connected=True)

    async def end_sessions(self, only: Optional[str] = None) -> None:
        """Terminate every interactive logind session (or just `only`) that is not spared."""
        if self.sessions is None:
            return
        try:
            listed = await self.sessions.list_sessions()
        except Exception as error:  # noqa: BLE001 - logind restarted or the bus went away
            log("error", what="listing logind sessions", error=str(error))
            self.sessions = None
            return
        for session in listed:
            if only is not None and session.id != only:
                continue
            if not session_spared(session, self.settings.exempt_units, self.grace):
                log("session", id=session.id, user=session.user, tty=session.tty,
                    type=session.type, remote=session.remote, leader=session.leader)
                await self._terminate(session.id, "interactive logind session")

    def on_session_new(self, session_id: str) -> None:
        asyncio.get_running_loop().create_task(self.end_sessions(session_id))

    # -- main loop -----------------------------------------------------------

    async def run(self) -> None:
        """Arm every source, end what exists already, report ready, then reconcile forever."""
        asyncio.get_running_loop().add_reader(self.inotify.fileno(), self.on_inotify)
        self.load_grace()
        self.keep_filter()
        self.reconcile("start")
        # logged before it is reported: a predecessor's "handed-over" line always comes after
        log("ready", devpts=self.settings.devpts, ttys=sorted(self.tty_wds.values()),
            exempt_units=list(self.settings.exempt_units), pid=os.getpid())
        handover.report_ready()
        if self.connect is not None:
            asyncio.get_running_loop().create_task(self._logind_loop())
        asyncio.get_running_loop().create_task(self._discover_loop())
        for rounds in itertools.count(1):
            await asyncio.sleep(self.settings.reconcile_seconds)
            self.keep_filter()
            self.periodic(rounds)

    async def _discover_loop(self) -> None:
        """New devpts instances, looked for every DISCOVER_SECONDS (about a millisecond for
        two hundred processes: a readlink each, one mountinfo a namespace)."""
        while True:
            await asyncio.sleep(DISCOVER_SECONDS)
            try:
                self.discover()
            except Exception as error:  # noqa: BLE001 - the next second looks again
                log("error", what="looking for devpts instances", error=repr(error))

    async def _logind_loop(self) -> None:
        """logind apart from the terminal sources: a slow or restarting logind delays nothing."""
        while True:
            try:
                await asyncio.wait_for(self._connect_sessions(), LOGIND_TIMEOUT)
                await asyncio.wait_for(self.end_sessions(), LOGIND_TIMEOUT)
            except asyncio.TimeoutError:
                log("error", what="logind", error=f"no answer within {LOGIND_TIMEOUT:.0f} s")
                self.sessions = None
            await asyncio.sleep(self.settings.reconcile_seconds)


class HandOverOnHangup:
    """SIGHUP (ExecReload, the package's postinst): pass the role to a process running the
    code now installed, watching all along (statemesh.watchdog.handover); one hand-over at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, watchdog: "Watchdog"):
        self.loop = loop
        self.watchdog = watchdog
        self.task: Optional["asyncio.Task[None]"] = None

    def __call__(self) -> None:
        if self.task is not None and not self.task.done():
            log("handover", pid=os.getpid(), state="in progress already")
            return
        self.task = self.loop.create_task(self._hand_over())

    async def _hand_over(self) -> None:
        log("handover", pid=os.getpid(), state="starting the successor")
        # The successor keeps the terminal filter from now on, and tells its refusals: this
        # process putting its own program back in between would undo an upgrade's, and two
        # readers of one ring buffer would each tell part of it.
        self.watchdog.keeps_filter = False
        self.watchdog.stop_reading_refusals()
        argv = [sys.executable, *sys.orig_argv[1:]]  # also `python3 -m statemesh.cli` in tests
        try:
            successor = await handover.hand_over(argv, HANDOVER_TIMEOUT)
        except handover.HandOverError as error:
            log("error", what="handover", error=str(error), pid=os.getpid())
            self.watchdog.keeps_filter = True  # still the one watching
            return
        log("handed-over", pid=os.getpid(), successor=successor)
        self.loop.stop()


async def connect_logind() -> SessionManager:
    """logind on the system bus (or STATEMESH_DBUS_ADDRESS)."""
    # Imported here: the terminal sources must keep running even if the D-Bus stack cannot load.
    from statemesh import systemd

    bus = await systemd.connect()
    return systemd.Logind(bus)


def main(settings: Settings) -> int:
    """Run until stopped; a stop is possible only at shutdown (RefuseManualStop)."""
    loop = asyncio.new_event_loop()
    watchdog = Watchdog(settings, connect_logind if settings.logind else None)
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.add_signal_handler(signal.SIGHUP, HandOverOnHangup(loop, watchdog))
    task = loop.create_task(watchdog.run())
    task.add_done_callback(_stop_its_loop)
    loop.run_forever()
    task.remove_done_callback(_stop_its_loop)
    failure = task.exception() if task.done() and not task.cancelled() else None
    _end_every_task(loop)
    if failure is not None:
        raise failure
    return 0


def _stop_its_loop(task: "asyncio.Task[None]") -> None:
    task.get_loop().stop()


def _end_every_task(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel and await what still runs (the main loop, logind's, discovery's, a hand-over),
    then close the loop: a task left pending at exit is reported into the journal. No signal
    stops this loop or starts a hand-over any more."""
    for signal_number in (signal.SIGTERM, signal.SIGHUP):
        loop.remove_signal_handler(signal_number)
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()
