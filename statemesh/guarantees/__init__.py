"""The ordered list of the node's guarantees.

The installer applies them in this order inside the journaled transaction, `status`
checks all of them, `selftest` tries the ways in each declares (ways_in, put in an
intruder's order by their step), and purge reverts them in reverse order. At boot each unit
applies again those whose boot_unit it is, and the tamper listener watches those that
declare tamper_watched (statemesh.guarantees.base). Adding a guarantee is adding its module
and one line here.
"""

from __future__ import annotations

from typing import List

from statemesh.config import NodeConfig
from statemesh.guarantees.base import Guarantee


def ordered(config: NodeConfig) -> List[Guarantee]:
    """Every guarantee of the node, in the order the installer applies them.

    The modules are imported here, not when the package is: importing one guarantee's
    module (or base) must not load every other's libraries (D-Bus, the TPM stack), so that
    a boot unit that needs one of them starts in a fraction of the time on a slow machine."""
    from statemesh.guarantees import (agents, firewall, logins, memory, rescue, securityclass,
                                      ssh, storage, watchdog)
    return [
        ssh.Ssh(),
        agents.RemoteAgents(),
        logins.Logins(),
        rescue.Rescue(),
        memory.Memory(),
        firewall.Firewall(config),
        securityclass.SecurityClass(config),
        watchdog.WatchdogGuarantee(config),
        storage.Storage(config),
    ]
