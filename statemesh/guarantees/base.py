"""The one shape every guarantee of the node shares.

Each guarantee (ssh, agents, logins, rescue, memory, storage, watchdog, firewall, security
class) is a module exposing an object with this interface, so that the installer, `status`,
`selftest` and purge can treat them uniformly and adding one is one line in a list.
What happens to a guarantee at boot, on tampering and in selftest is declared by the
guarantee itself (boot_unit, tamper_watched, ways_in), so that the boot re-assert, the
tamper listener and selftest are loops over the same ordered list too.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, Dict, Optional, Protocol, Sequence

# The units that apply guarantees again at every boot of an installed node (boot_unit).
HARDEN_UNIT = "statemesh-harden.service"
FIREWALL_UNIT = "statemesh-firewall.service"


@dataclasses.dataclass(frozen=True)
class Finding:
    """What `check()` saw of one guarantee: whether it holds, and why not if it does not."""

    name: str
    holds: bool
    detail: str
    facts: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Probe:
    """One way in that selftest tried, and whether the node blocked it."""

    name: str
    blocked: bool
    detail: str

    def as_dict(self) -> Dict[str, object]:
        return dataclasses.asdict(self)


class Step(enum.IntEnum):
    """Where a way in stands in an intruder's order, which selftest keeps whatever order the
    guarantees are applied in: a terminal on the node first, then the services that would
    give a shell, then the data at rest."""

    TERMINAL = 1
    SHELL = 2
    DATA_AT_REST = 3


@dataclasses.dataclass(frozen=True)
class Way:
    """A way in that selftest tries against a guarantee: the name its Probe reports, its
    step in an intruder's order, and the attempt, which acts on the live node."""

    name: str
    step: Step
    attempt: Callable[[], Probe]


class Guarantee(Protocol):
    """A property of the node: read it live, enforce it idempotently, undo it from a record."""

    name: str
    # The unit that applies it again at every boot of an installed node; None when it
    # holds across boots by itself or a unit of its own makes it hold (storage, watchdog).
    boot_unit: Optional[str]
    # Whether the tamper listener re-enforces it as soon as it no longer holds (only
    # guarantees enforced over D-Bus: BusGuarantee's inspect/enforce run in its loop).
    tamper_watched: bool
    # Whether it holds the workload data: purge gives nothing back unless its revert
    # destroyed that data.
    holds_workload_data: bool
    # Whether an upgrade of a node installed in an earlier boot applies it again only when
    # its check fails, as every boot does (install.reapply_at_boot): for a guarantee whose
    # apply costs much or opens something while it runs, and whose holding check() is all
    # status trusts. Not in the installation's own boot: the installing session had root,
    # and could have changed what the check does not read (the kernel's own ufw chains).
    kept_by_upgrades_while_holding: bool

    def check(self) -> Finding:
        """Read the live state; no side effects."""

    def apply(self, journal: Any) -> None:
        """Enforce the guarantee; safe to repeat."""

    def revert(self, record: Dict[str, Any]) -> None:
        """Give the operator back what the restore record says was there before."""

    def ways_in(self) -> Sequence[Way]:
        """The ways in that selftest tries against it, declared, not tried (() for none):
        selftest orders them before it tries any, and a test reads their names."""
