"""No remote-execution agent: what lets a hypervisor's, a cloud's or a web console's
operator run commands as root without SSH or a terminal is masked and stopped like sshd.

- qemu-guest-agent: guest-exec and guest-file-write for whoever drives the VM's virtio port
  (the hypervisor's operator: libvirt, Proxmox, a cloud's control plane); lxd-agent and
  incus-agent (`lxc exec`); open-vm-tools and VGAuth (vSphere's guest operations);
  Hyper-V's file copy daemon (writes any file);
- amazon-ssm-agent (the .deb's unit and the snap's): Run Command and Session Manager;
  walinuxagent (waagent) and Azure Arc's agents: Run Command and extensions;
  google-guest-agent (old and new), OS Config and Google's startup and shutdown scripts;
  Oracle's cloud agent; Landscape's client: each runs what its cloud's operator sends;
- cloud-init: a new instance id or user-data from the datasource runs anything as root at
  the next boot (bootcmd, runcmd, per-boot scripts), and its hotplug daemon on a new NIC;
- cockpit and webmin: web consoles that run commands without a terminal;
- salt-minion, puppet, chef-client: configuration management, whose server runs anything as
  root; teleport and MeshCentral's meshagent: remote terminals of their own; tailscaled,
  whose Tailscale SSH serves root shells without sshd (the VPN goes with it).
Every name is masked whether the agent is installed or not, so that one installed later finds
its units masked already; purge gives back what was enabled and what ran.

An installation may itself run in one of these units: cloud-init's runcmd in
cloud-final.service, guest-exec's command in qemu-guest-agent's, a cloud's run-command in
its agent's. That unit is left as it is while the grace runs (statemesh.grace: until apt
returns); the tamper listener's first check after it locks the unit. What a locked agent's
unit still holds once stopped (KillMode=process leaves what it started) is killed, a
lingering apt or dpkg in it too once the grace is over.

Honest limits: an agent is known here by its units' names; one of another name (a packaged
one: ansible-pull's timer, zabbix-agent's remote commands, a vendor's agent) passes, and one
no package installed is refused by preflight. Hyper-V's KVP daemon is left running (the host
sets network configuration through it). What the masked agents also did stops: on a cloud
image cloud-init's per-boot work (growing the root partition, network configuration after a
change of instance type);
on GCE the guest agent's routes for forwarded and alias IPs and secondary NICs; on Azure
waagent's WireServer firewall rules; on VMware time sync and quiesced snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Sequence, Set, Tuple

from statemesh import grace
from statemesh.guarantees.base import HARDEN_UNIT, Finding, Way
from statemesh.systemd import Systemd, UnknownUnitError
from statemesh.guarantees.unitmask import (RUNNING_STATES, BusGuarantee, UnitSet, give_back,
                                           lock, snapshot, start_refused, unlocked,
                                           unlocked_problems)

UNITS = UnitSet((
    # Hypervisors' channels into the guest.
    "qemu-guest-agent.service", "lxd-agent.service", "incus-agent.service",
    "open-vm-tools.service", "vmtoolsd.service", "vgauth.service", "hv-fcopy-daemon.service",
    # Clouds' agents, which dial out (the firewall lets them).
    "amazon-ssm-agent.service", "snap.amazon-ssm-agent.amazon-ssm-agent.service",
    "walinuxagent.service", "waagent.service",
    "google-guest-agent.service", "google-guest-agent-manager.service",
    "google-guest-compat-manager.service", "google-osconfig-agent.service",
    "google-startup-scripts.service", "google-shutdown-scripts.service",
    "oracle-cloud-agent.service", "snap.oracle-cloud-agent.oracle-cloud-agent.service",
    "snap.oracle-cloud-agent.oracle-cloud-agent-updater.service",
    "himdsd.service", "extd.service", "gcad.service", "landscape-client.service",
    # cloud-init: the datasource's user-data and scripts run as root at boot and on hotplug.
    "cloud-init-local.service", "cloud-init-main.service", "cloud-init-network.service",
    "cloud-init.service", "cloud-config.service", "cloud-final.service",
    "cloud-init-hotplugd.socket", "cloud-init-hotplugd.service",
    # Web consoles: cockpit's bridge and webmin's shell run commands as root.
    "cockpit.socket", "cockpit.service", "cockpit-wsinstance-http.socket",
    "cockpit-wsinstance-https@.socket", "webmin.service",
    # Configuration management and remote access of their own: each runs, as root, what its
    # server or its operator's account sends (Salt's cmd.run, Puppet's and Chef's exec
    # resources, Teleport's and MeshCentral's terminals, Tailscale SSH without sshd).
    "salt-minion.service", "puppet.service", "chef-client.service", "teleport.service",
    "meshagent.service", "tailscaled.service",
))


# Rounds of SIGKILL for what forks as it is killed, and the pause in which the kernel ends
# them (SIGKILL is delivered asynchronously; the cgroup empties once they are reaped).
KILL_ROUNDS = 10
KILL_WAIT = 0.2


async def processes_of(manager: Systemd, spare: FrozenSet[str],
                       running_too: bool = False) -> Dict[str, List[Tuple[int, str]]]:
    """The processes in the cgroups of the agents' loaded units but the spared ones; of
    the units not running only, unless `running_too`. A unit stopped with KillMode=process
    (cloud-final.service, amazon-ssm-agent's) leaves what it started, a shell runcmd put in
    the background say, running as root in no running unit."""
    found = {}
    for unit in await manager.list_units(UNITS.patterns()):
        if unit.name in spare or (unit.active_state in RUNNING_STATES and not running_too):
            continue
        try:
            processes = await manager.unit_processes(unit.name)
        except UnknownUnitError:
            continue  # its last process exited and systemd let the unit go meanwhile
        if processes:
            found[unit.name] = processes
    return found


async def kill_all(manager: Systemd, spare: FrozenSet[str]) -> Dict[str, List[int]]:
    """SIGKILL every process of every agent's unit but the spared ones, and wait (a few
    seconds at most) until their cgroups are empty; returns what was killed."""
    killed: Dict[str, Set[int]] = {}
    for _ in range(KILL_ROUNDS):
        found = await processes_of(manager, spare, running_too=True)
        if not found:
            break
        for name, processes in found.items():
            with contextlib.suppress(UnknownUnitError):
                await manager.kill_unit(name, signal.SIGKILL)
            killed.setdefault(name, set()).update(pid for pid, _ in processes)
        await asyncio.sleep(KILL_WAIT)
    return {name: sorted(pids) for name, pids in killed.items()}


def _described(processes: List[Tuple[int, str]]) -> str:
    """pid and command line, printable and short: root chose the command line."""
    return ", ".join(f"pid {pid} ({''.join(c if c.isprintable() else '?' for c in command)[:60]})"
                     for pid, command in processes)


class RemoteAgents(BusGuarantee):
    """No remote-execution agent's unit can run, and none runs."""

    name = "agents"
    boot_unit = HARDEN_UNIT
    tamper_watched = True
    holds_workload_data = False
    kept_by_upgrades_while_holding = False

    def __init__(self, grace_path: Path = grace.GRACE_PATH):
        self.grace_path = grace_path

    def ways_in(self) -> Sequence[Way]:
        return (start_refused("qemu-guest-agent.service"),)

    def _spare(self) -> FrozenSet[str]:
        """The agent's unit that runs the installation, while its grace runs: stopping it
        would kill apt half-way (guest-exec's command, cloud-init's runcmd, a cloud's
        run-command). It is left as it is, and locked by the tamper listener once the grace
        is over."""
        current = grace.current(self.grace_path)
        return current.units() & frozenset(UNITS.names) if current else frozenset()

    async def inspect(self, manager: Systemd) -> Finding:
        spare = self._spare()
        left = await unlocked(manager, UNITS, spare=spare)
        left["left_behind"] = await processes_of(manager, spare)
        problems = unlocked_problems(left) + [
            f"processes left by {name} after its stop: {_described(processes)}"
            for name, processes in sorted(left["left_behind"].items())]
        detail = "; ".join(problems) or "remote-execution agents' units masked and stopped"
        if spare and not problems:
            detail += (f"; the installation's own {', '.join(sorted(spare))} is left as it is "
                       "until apt returns")
        return Finding(self.name, not problems, detail, left)

    async def enforce(self, manager: Systemd, journal: Any) -> None:
        journal.remember(self.name, await snapshot(manager, UNITS))
        spare = self._spare()
        locked = await lock(manager, UNITS, spare=spare)
        killed = await kill_all(manager, spare)  # what the stopped units left behind
        journal.record("agents-locked", spared=sorted(spare), killed=killed, **locked)
        await self.verify(manager)

    async def restore(self, manager: Systemd, record: Dict[str, Any]) -> List[str]:
        return await give_back(manager, record, self.name)
