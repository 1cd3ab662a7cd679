"""SSH is off: every unit that can serve sshd is disabled, masked and stopped.

Which units serve sshd depends on the release: Debian 12 has ssh.service (Alias=sshd.service,
enabled) and ssh.socket (Accept=yes, spawning ssh@.service instances); Ubuntu 24.04 enables
ssh.socket, which starts ssh.service on demand, so stopping the service alone would leave
port 22 open; Debian 13 adds sshd@.service and systemd's ssh generator, which binds AF_UNIX
and (in VMs) vsock sockets from /run/systemd/generator.early, where a mask in /etc does not
reach: the generator itself is masked with a /dev/null link in /etc/systemd/system-generators.
Every name is masked whether it exists or not, so that an openssh-server installed later
finds its units masked already (and a dpkg file trigger on /usr/sbin/sshd re-asserts this).

Stopping ssh.service ends only the listener (KillMode=process): existing connections are
separate sshd processes. Those are terminated too, except the connection the installation
runs in, which the watchdog ends once the package manager has exited.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, List, Sequence

import psutil

from statemesh import grace
from statemesh.guarantees.base import HARDEN_UNIT, Finding, Way
from statemesh.systemd import Systemd
from statemesh.guarantees.unitmask import (BusGuarantee, UnitSet, give_back, lock, snapshot,
                                start_refused, unlocked, unlocked_problems)

# With systemd 256 and later (Debian 13), systemd-ssh-generator also binds sshd to an
# AF_VSOCK port (the hypervisor's way in), a local AF_UNIX socket and a container's export
# socket, for its own sshd template where the package ships none. Masking the generator
# keeps them from the next boot; these names stop and mask the ones already listening.
UNITS = UnitSet(("ssh.service", "ssh.socket", "sshd.service", "ssh@.service",
                 "sshd.socket", "sshd@.service", "sshd-vsock.socket", "sshd-unix-local.socket",
                 "sshd-unix-export.socket", "sshd-generated@.service"))
GENERATOR = Path("etc/systemd/system-generators/systemd-ssh-generator")
SSHD = "/usr/sbin/sshd"


def sshd_processes() -> List[int]:
    """Pids of running sshd processes (listeners and per-connection ones)."""
    found = []
    for process in psutil.process_iter(["exe"]):
        if process.info.get("exe") == SSHD:
            found.append(process.pid)
    return found


def terminate(pids: List[int]) -> None:
    """SIGTERM, and SIGKILL what is still there after a few seconds."""
    processes = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(pid)
            process.terminate()
            processes.append(process)
    _gone, alive = psutil.wait_procs(processes, timeout=5)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=5)


def installer_ancestors(grace_path: Path = grace.GRACE_PATH) -> FrozenSet[int]:
    """The processes the running installation descends from (its ssh connection among them)."""
    current = grace.current(grace_path)
    return frozenset() if current is None else current.lineage()


class Ssh(BusGuarantee):
    """No sshd unit can run, and no sshd process runs (but the installing connection)."""

    name = "ssh"
    boot_unit = HARDEN_UNIT
    tamper_watched = True
    holds_workload_data = False
    kept_by_upgrades_while_holding = False

    def __init__(self, root: Path = Path("/"),
                 find_sshd: Callable[[], List[int]] = sshd_processes,
                 grace_path: Path = grace.GRACE_PATH):
        self.generator = root / GENERATOR
        self.find_sshd = find_sshd
        self.grace_path = grace_path

    def ways_in(self) -> Sequence[Way]:
        return (start_refused("ssh.service"),)

    def _generator_masked(self) -> bool:
        return self.generator.is_symlink() and os.readlink(self.generator) == "/dev/null"

    def _stray_sshd(self) -> List[int]:
        spared = installer_ancestors(self.grace_path)
        return [pid for pid in self.find_sshd() if pid not in spared]

    async def inspect(self, manager: Systemd) -> Finding:
        left = await unlocked(manager, UNITS)
        stray = self._stray_sshd()
        facts: Dict[str, Any] = {**left, "generator_masked": self._generator_masked(),
                                 "sshd_processes": stray}
        problems = unlocked_problems(left)
        if not facts["generator_masked"]:
            problems.append("systemd-ssh-generator not masked")
        if stray:
            problems.append("sshd processes: " + " ".join(map(str, stray)))
        detail = "; ".join(problems) or "sshd units masked and stopped, no sshd running"
        return Finding(self.name, not problems, detail, facts)

    async def enforce(self, manager: Systemd, journal: Any) -> None:
        journal.remember(self.name, {**await snapshot(manager, UNITS),
                                     "generator_masked": self._generator_masked(),
                                     "generator_dir": self.generator.parent.is_dir()})
        if not self._generator_masked():
            self.generator.parent.mkdir(parents=True, exist_ok=True)
            self.generator.unlink(missing_ok=True)
            self.generator.symlink_to("/dev/null")
            journal.record("ssh-generator-masked", path=str(self.generator))
        journal.record("ssh-locked", **await lock(manager, UNITS))
        stray = self._stray_sshd()
        if stray:
            terminate(stray)
            journal.record("sshd-terminated", pids=stray)
        await self.verify(manager)

    async def restore(self, manager: Systemd, record: Dict[str, Any]) -> List[str]:
        if not record.get("generator_masked", False) and self._generator_masked():
            self.generator.unlink()
            if not record.get("generator_dir", True):
                with contextlib.suppress(OSError):
                    self.generator.parent.rmdir()
        return await give_back(manager, record, self.name)
