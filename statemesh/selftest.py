"""`statemesh-node selftest`: try, on the live node, the ways in that are safe to try.

`status` reads configuration back; selftest acts like an intruder would, within what a
live node can afford: it opens a terminal and waits to see it killed, asks systemd over
D-Bus to start sshd and a getty (both must be refused), and looks for the storage volume
key anywhere it must never be. A probe that cannot run reports "open": failing closed
is the only honest answer for a proof.
"""

from __future__ import annotations

from typing import List

from statemesh.config import NodeConfig
from statemesh.guarantees import storage, unitmask, watchdog
from statemesh.guarantees.base import Probe

UNITS_THAT_MUST_NOT_START = ("ssh.service", "getty@tty2.service", "serial-getty@ttyS1.service")


def run_all(config: NodeConfig) -> List[Probe]:
    """Every probe, in the order an intruder would try them."""
    volume = storage.Storage(config)
    return [watchdog.probe_pty(), *map(unitmask.refused_start, UNITS_THAT_MUST_NOT_START),
            volume.probe_keyslots(), volume.probe_key_on_disk()]
