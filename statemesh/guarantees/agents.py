"""No remote-execution agent: what lets a hypervisor's, a cloud's or a web console's
operator run commands as root without SSH or a terminal is masked and stopped like sshd.

- qemu-guest-agent: guest-exec and guest-file-write for whoever drives the VM's virtio port
  (the hypervisor's operator: libvirt, Proxmox, a cloud's control plane);
- amazon-ssm-agent (the .deb's unit and the snap's): Run Command and Session Manager;
- walinuxagent (waagent): Azure's Run Command and VM extensions;
- google-guest-agent and Google's startup and shutdown scripts: metadata scripts run as root;
- cloud-init: a new instance id or user-data from the datasource runs anything as root at
  the next boot (bootcmd, runcmd, per-boot scripts);
- cockpit: a web console whose bridge runs commands without a terminal.
Every name is masked whether the agent is installed or not, so that one installed later finds
its units masked already; purge gives back what was enabled and what ran.

Honest limits: an agent is known here by its units' names; one of another name is refused by
preflight only when no package installed it. On a cloud image, masking cloud-init also ends
its per-boot work (growing the root partition, regenerating network configuration after a
change of instance type); the configuration it wrote at the first boot stays.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from statemesh.guarantees.base import HARDEN_UNIT, Finding, Way
from statemesh.systemd import Systemd
from statemesh.guarantees.unitmask import (BusGuarantee, UnitSet, give_back, lock, snapshot,
                                           start_refused, unlocked, unlocked_problems)

UNITS = UnitSet((
    "qemu-guest-agent.service",
    "amazon-ssm-agent.service", "snap.amazon-ssm-agent.amazon-ssm-agent.service",
    "walinuxagent.service", "waagent.service",
    "google-guest-agent.service", "google-startup-scripts.service",
    "google-shutdown-scripts.service",
    "cloud-init-local.service", "cloud-init-main.service", "cloud-init-network.service",
    "cloud-init.service", "cloud-config.service", "cloud-final.service",
    "cockpit.socket", "cockpit.service", "cockpit-wsinstance-http.socket",
    "cockpit-wsinstance-https@.socket",
))


class RemoteAgents(BusGuarantee):
    """No remote-execution agent's unit can run, and none runs."""

    name = "agents"
    boot_unit = HARDEN_UNIT
    tamper_watched = True
    holds_workload_data = False

    def ways_in(self) -> Sequence[Way]:
        return (start_refused("qemu-guest-agent.service"),)

    async def inspect(self, manager: Systemd) -> Finding:
        left = await unlocked(manager, UNITS)
        problems = unlocked_problems(left)
        detail = "; ".join(problems) or "remote-execution agents' units masked and stopped"
        return Finding(self.name, not problems, detail, left)

    async def enforce(self, manager: Systemd, journal: Any) -> None:
        journal.remember(self.name, await snapshot(manager, UNITS))
        journal.record("agents-locked", **await lock(manager, UNITS))
        await self.verify(manager)

    async def restore(self, manager: Systemd, record: Dict[str, Any]) -> List[str]:
        return await give_back(manager, record)
