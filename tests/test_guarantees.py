"""What every guarantee declares, as one table: what runs it again at boot, whether the
tamper listener watches it, whether it holds the workload data, and what selftest tries
against it. A change to any of these is a change to this table, in plain sight."""

from __future__ import annotations

from statemesh import guarantees, selftest
from statemesh.config import NodeConfig

HARDEN = "statemesh-harden.service"
FIREWALL = "statemesh-firewall.service"

# name, boot_unit, tamper_watched, holds_workload_data, the ways in selftest tries (in order)
DECLARED = [
    ("ssh", HARDEN, True, False, ("start ssh.service",)),
    ("agents", HARDEN, True, False, ("start qemu-guest-agent.service",)),
    ("logins", HARDEN, True, False, ("start getty@tty2.service", "start serial-getty@ttyS1.service")),
    ("rescue", HARDEN, True, False, ()),
    ("memory", HARDEN, True, False, ()),
    ("firewall", FIREWALL, False, False, ()),
    ("security_class", None, False, False, ()),
    ("watchdog", None, False, False, ("spared installing session", "pty",
                                      "pty of a devpts of its own",
                                      "login moved into an exempt unit")),
    ("storage", None, False, True, ("storage keyslots", "volume key on disk")),
]


def test_every_guarantee_declares_what_runs_at_boot_on_tamper_and_in_selftest() -> None:
    declared = [(g.name, g.boot_unit, g.tamper_watched, g.holds_workload_data,
                 tuple(way.name for way in g.ways_in()))
                for g in guarantees.ordered(NodeConfig())]
    assert declared == DECLARED


def test_selftest_tries_the_ways_in_in_an_intruders_order() -> None:
    # Not the guarantees' order (ssh first): a terminal, then the services that would give
    # a shell, then the data at rest. The CLI prints and reports the probes in this order.
    assert [way.name for way in selftest.ways(NodeConfig())] == [
        "spared installing session", "pty", "pty of a devpts of its own",
        "login moved into an exempt unit", "start ssh.service", "start qemu-guest-agent.service",
        "start getty@tty2.service", "start serial-getty@ttyS1.service", "storage keyslots",
        "volume key on disk"]
