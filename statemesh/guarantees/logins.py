"""No interactive login: every getty is masked and stopped, root's password is locked,
the debug shell is masked.

getty@ (the VTs, started by logind on demand through its autovt@ alias), serial-getty@
(serial consoles, pulled in by the kernel command line), console-getty and container-getty@
(containers) are masked as templates, so that no instance can start; the instances that run
are stopped. debug-shell.service (a root shell on tty9 with systemd.debug_shell on the kernel
command line) is masked too. Root's password is locked with `usermod --lock`, which keeps the
hash behind a "!" so that purge can unlock the very same password.

The getty the installation runs on (an operator installing from the console) is left
running until the package manager exits; the watchdog then ends that session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional, Sequence

from statemesh import grace
from statemesh.guarantees.base import HARDEN_UNIT, Finding, Way
from statemesh.run import CommandError, run
from statemesh.systemd import Systemd
from statemesh.guarantees.unitmask import (BusGuarantee, LockdownError, UnitSet, give_back, lock,
                                snapshot, start_refused, unlocked, unlocked_problems)

UNITS = UnitSet(("getty@.service", "serial-getty@.service", "autovt@.service",
                 "console-getty.service", "container-getty@.service", "debug-shell.service"),
                restart_instances=True)


def getty_units_of(tty: Optional[str]) -> FrozenSet[str]:
    """The units that may run a getty on a terminal (/dev/tty1 -> getty@tty1.service, ...)."""
    if not tty or not tty.startswith("/dev/") or tty.startswith("/dev/pts/"):
        return frozenset()
    name = tty[len("/dev/"):]
    if name == "console":
        return frozenset({"console-getty.service"})
    return frozenset({f"getty@{name}.service", f"autovt@{name}.service",
                      f"serial-getty@{name}.service"})


def password_field(shadow: Path, user: str = "root") -> str:
    """The password field of a user in a shadow file."""
    try:
        lines = shadow.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise LockdownError(f"cannot read {shadow}: {error.strerror}") from None
    for line in lines:
        fields = line.split(":")
        if fields[0] == user and len(fields) > 1:
            return fields[1]
    raise LockdownError(f"{shadow} has no entry for {user}")


class Logins(BusGuarantee):
    """No getty can run, root cannot log in with a password, no debug shell."""

    name = "logins"
    boot_unit = HARDEN_UNIT
    tamper_watched = True
    holds_workload_data = False

    def __init__(self, root: Path = Path("/"),
                 grace_path: Path = grace.GRACE_PATH):
        self.root = root
        self.grace_path = grace_path

    def ways_in(self) -> Sequence[Way]:
        return (start_refused("getty@tty2.service"), start_refused("serial-getty@ttyS1.service"))

    def _spare(self) -> FrozenSet[str]:
        current = grace.current(self.grace_path)
        return getty_units_of(current.tty) if current else frozenset()

    def _root_locked(self) -> bool:
        return password_field(self.root / "etc/shadow").startswith("!")

    def _usermod(self, flag: str) -> None:
        try:
            run(["usermod", "--root", str(self.root), flag, "root"])
        except CommandError as error:
            raise LockdownError(f"usermod {flag} root: {error}") from None

    async def inspect(self, manager: Systemd) -> Finding:
        left = await unlocked(manager, UNITS, spare=self._spare())
        facts: Dict[str, Any] = {**left, "root_locked": self._root_locked()}
        problems = unlocked_problems(left)
        if not facts["root_locked"]:
            problems.append("root's password is not locked")
        detail = "; ".join(problems) or "gettys and debug shell masked, root's password locked"
        return Finding(self.name, not problems, detail, facts)

    async def enforce(self, manager: Systemd, journal: Any) -> None:
        journal.remember(self.name, {**await snapshot(manager, UNITS),
                                     "root_locked": self._root_locked()})
        spare = self._spare()
        journal.record("logins-locked", spared=sorted(spare),
                       **await lock(manager, UNITS, spare=spare))
        if not self._root_locked():
            self._usermod("--lock")
            journal.record("root-password-locked")
        await self.verify(manager)

    async def restore(self, manager: Systemd, record: Dict[str, Any]) -> List[str]:
        errors = await give_back(manager, record)
        if not record.get("root_locked", True) and self._root_locked():
            try:
                self._usermod("--unlock")
            except LockdownError as error:
                errors.append(str(error))
        return errors
