"""`statemesh-node selftest`: try, on the live node, the ways in that are safe to try.

`status` reads configuration back; selftest acts like an intruder would, within what a
live node can afford: it opens a terminal and waits to see it killed, asks systemd over
D-Bus to start sshd and a getty (both must be refused), and looks for the storage volume
key anywhere it must never be. A probe that cannot run reports "open": failing closed
is the only honest answer for a proof.

Each guarantee declares the ways in that are tried against it (ways_in), so selftest is a
loop over the same ordered list as the installer, status and purge.
"""

from __future__ import annotations

from typing import List

from statemesh import guarantees
from statemesh.config import NodeConfig
from statemesh.guarantees.base import Probe, Way


def ways(config: NodeConfig) -> List[Way]:
    """Every guarantee's ways in, in an intruder's order: by step (a terminal, then the
    services that would give a shell, then the data at rest) and within a step in the
    guarantees' order. Nothing is tried yet."""
    declared = [way for guarantee in guarantees.ordered(config) for way in guarantee.ways_in()]
    return sorted(declared, key=lambda way: way.step)  # stable: ties keep the list's order


def run_all(config: NodeConfig) -> List[Probe]:
    """Try every way in, in the order an intruder would try them."""
    return [way.attempt() for way in ways(config)]
