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

A login's loginuid is made immutable (statemesh.audit) until the next boot, and set again at
every boot: a process born of a login stays one wherever root moves it, which is what the
watchdog's exemptions rely on. So this guarantee is applied again at every boot of an
installed node, where only that is missing: the masks, which hold already, are not made
again (that would cost a daemon-reload, seconds at boot, every generator run again). That one cannot be given back before a reboot: the kernel
locks it, and an immutable loginuid takes nothing from anyone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional, Sequence

from statemesh import audit, grace, safefile
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
    """The password field of a user in a shadow file (a FIFO or a device there is an
    error, never waited on)."""
    try:
        lines = safefile.read_text(shadow).splitlines()
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
    kept_by_upgrades_while_holding = False

    def __init__(self, root: Path = Path("/"),
                 grace_path: Path = grace.GRACE_PATH,
                 kernel_audit: Any = audit):
        self.root = root
        self.grace_path = grace_path
        self.kernel_audit = kernel_audit  # the kernel's, or a test's stand-in with its calls

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
        loginuid = self._loginuid_problem()
        facts["loginuid_immutable"] = loginuid is None
        if loginuid:
            problems.append(loginuid)
        detail = "; ".join(problems) or ("gettys and debug shell masked, root's password "
                                         "locked, loginuids immutable")
        return Finding(self.name, not problems, detail, facts)

    def _loginuid_problem(self) -> Optional[str]:
        try:
            state = self.kernel_audit.loginuid_immutable()
        except audit.AuditError as error:
            return f"cannot ask the kernel whether loginuids are immutable: {error}"
        if state.holds:
            return None
        return ("loginuids can be changed (audit loginuid_immutable "
                f"{'set, not locked' if state.enabled else 'not set'})")

    async def enforce(self, manager: Systemd, journal: Any) -> None:
        journal.remember(self.name, {**await snapshot(manager, UNITS),
                                     "root_locked": self._root_locked()})
        spare = self._spare()
        if unlocked_problems(await unlocked(manager, UNITS, spare=spare)):
            journal.record("logins-locked", spared=sorted(spare),
                           **await lock(manager, UNITS, spare=spare))
        if not self._root_locked():
            self._usermod("--lock")
            journal.record("root-password-locked")
        if self._loginuid_problem():
            try:
                self.kernel_audit.make_loginuid_immutable()
            except audit.AuditError as error:
                raise LockdownError(f"making loginuids immutable: {error}") from None
            journal.record("loginuid-immutable")
        await self.verify(manager)

    async def restore(self, manager: Systemd, record: Dict[str, Any]) -> List[str]:
        errors = await give_back(manager, record, self.name)
        if not record.get("root_locked", True) and self._root_locked():
            try:
                self._usermod("--unlock")
            except LockdownError as error:
                errors.append(str(error))
        return errors
