"""The one shape every guarantee of the node shares.

Each guarantee (ssh, logins, rescue, storage, watchdog, firewall, security class)
is a module exposing an object with this interface, so that the installer, `status`,
`selftest` and purge can treat them uniformly and adding one is one line in a list.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Protocol


@dataclasses.dataclass(frozen=True)
class Finding:
    """What `check()` saw of one guarantee: whether it holds, and why not if it does not."""

    name: str
    holds: bool
    detail: str
    facts: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


class Guarantee(Protocol):
    """A property of the node: read it live, enforce it idempotently, undo it from a record."""

    name: str

    def check(self) -> Finding:
        """Read the live state; no side effects."""

    def apply(self, journal: Any) -> None:
        """Enforce the guarantee; safe to repeat."""

    def revert(self, record: Dict[str, Any]) -> None:
        """Give the operator back what the restore record says was there before."""
