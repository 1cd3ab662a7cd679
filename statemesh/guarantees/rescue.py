"""No single-user shell: rescue and emergency are masked, GRUB offers no recovery entry.

Masking rather than redirecting to a reboot, because masking is the safer of the two:
- a masked unit cannot be started by anything, and there is no override whose correctness
  we would have to trust: a drop-in that replaces ExecStart= of rescue.service with a
  reboot gives a shell again the day the drop-in is wrong or another one sorts after it;
- booting with systemd.unit=rescue.target (or emergency.target, "single", "1", "s") makes
  PID 1 fail to queue its default job ("Rescue target masked") and freeze: no unit starts
  at all, so no shell, and no sulogin whose password check we would depend on (sulogin
  honours SYSTEMD_SULOGIN_FORCE=1 from the kernel command line even with root locked);
- when a boot-time failure pulls in emergency.target (OnFailure= of local-fs.target, a bad
  fstab line), the masked target is refused and the boot goes on degraded, with the
  watchdog and the StateMesh services running, instead of a reboot loop that would never
  end while the failure persists.
The cost is that a node booted into rescue by someone at its console hangs until it is
power-cycled; at the console that person could have pulled the plug anyway, and the
ephemeral storage key is gone after any reboot.

GRUB, where it is installed: a drop-in under /etc/default/grub.d turns recovery entries
off, hides the menu and boots at once (no other operating systems offered), then
update-grub writes grub.cfg. Honest limit: someone at the console during boot can still
interrupt GRUB and edit the kernel command line (init=/bin/sh); nothing installed on the
disk can prevent that (it is physical access), which is why the storage key never persists.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from statemesh import bootargs, safefile
from statemesh.guarantees.base import HARDEN_UNIT, Finding, Way
from statemesh.run import CommandError, have, run
from statemesh.systemd import Systemd
from statemesh.guarantees.unitmask import (BusGuarantee, UnitSet, give_back, lock, snapshot, unlocked,
                                unlocked_problems)

UNITS = UnitSet(("rescue.service", "emergency.service", "rescue.target", "emergency.target",
                 "kbrequest.target"))
GRUB_DEFAULTS = Path("etc/default/grub")
GRUB_DROPIN = Path("etc/default/grub.d/50-statemesh-node.cfg")
GRUB_SETTINGS = """\
# Written by statemesh-node (removed at purge): no recovery entries, no menu to interrupt.
GRUB_DISABLE_RECOVERY=true
GRUB_TIMEOUT=0
GRUB_TIMEOUT_STYLE=hidden
GRUB_RECORDFAIL_TIMEOUT=0
GRUB_DISABLE_OS_PROBER=true
"""


def settings_read_after_the_dropin(root: Path = Path("/")) -> List[str]:
    """Preflight's line for GRUB settings files update-grub reads after the package's
    drop-in that set one of its variables: they would undo the lock (recovery entries on
    again), and the tamper listener would rewrite the drop-in and run update-grub again,
    every few seconds."""
    dropin = root / GRUB_DROPIN
    locked = set(bootargs.settings_of(GRUB_SETTINGS))
    files = bootargs.grub_files(root / GRUB_DEFAULTS, dropin.parent)[1:]
    found = [str(path) for path in files if path.name > dropin.name
             and locked & set(bootargs.grub_settings([path]))]
    if not found:
        return []
    return [f"GRUB settings read after {dropin} set what it sets ({', '.join(sorted(locked))}):"
            f" {', '.join(found)} (remove those lines, or rename the files to sort before it)"]


def update_grub() -> None:
    """Regenerate grub.cfg when GRUB is really installed (a grub.cfg exists to regenerate)."""
    if have("update-grub") and Path("/boot/grub/grub.cfg").exists():
        run(["update-grub"], timeout=600)


class Rescue(BusGuarantee):
    """rescue/emergency cannot give a shell; GRUB has no recovery entry."""

    name = "rescue"
    boot_unit = HARDEN_UNIT
    tamper_watched = True
    holds_workload_data = False
    kept_by_upgrades_while_holding = False

    def __init__(self, root: Path = Path("/"),
                 regenerate_grub: Callable[[], None] = update_grub):
        self.grub_defaults = root / GRUB_DEFAULTS
        self.dropin = root / GRUB_DROPIN
        self.regenerate_grub = regenerate_grub

    def ways_in(self) -> Sequence[Way]:
        return ()

    def _grub_installed(self) -> bool:
        return self.grub_defaults.exists()

    def _grub_locked(self) -> bool:
        """The drop-in is as written, and what update-grub reads from every settings file
        keeps its values: a drop-in sorted after it (zz.cfg: GRUB_DISABLE_RECOVERY=false)
        would undo them."""
        if not self._grub_installed():
            return True
        try:
            if safefile.read_text(self.dropin) != GRUB_SETTINGS:
                return False
        except OSError:  # a FIFO or a device too, never waited on
            return False
        effective = bootargs.grub_settings(bootargs.grub_files(self.grub_defaults,
                                                               self.dropin.parent))
        return all(effective.get(name) == value
                   for name, value in bootargs.settings_of(GRUB_SETTINGS).items())

    async def inspect(self, manager: Systemd) -> Finding:
        left = await unlocked(manager, UNITS)
        facts: Dict[str, Any] = {**left, "grub": self._grub_installed(),
                                 "grub_locked": self._grub_locked()}
        problems = unlocked_problems(left)
        if not facts["grub_locked"]:
            problems.append(f"GRUB recovery entries not disabled ({self.dropin} missing, "
                            "or a settings file read after it changes its values)")
        detail = "; ".join(problems) or "rescue and emergency masked" + (
            ", GRUB recovery entries off" if facts["grub"] else ", no GRUB")
        return Finding(self.name, not problems, detail, facts)

    async def enforce(self, manager: Systemd, journal: Any) -> None:
        journal.remember(self.name, {**await snapshot(manager, UNITS),
                                     "grub_dropin_dir": self.dropin.parent.is_dir()})
        journal.record("rescue-locked", **await lock(manager, UNITS))
        if self._grub_installed():
            if not self._grub_locked():
                self.dropin.parent.mkdir(parents=True, exist_ok=True)
                self.dropin.write_text(GRUB_SETTINGS, encoding="utf-8")
            # Always: a grub.cfg edited by hand before installing (init= given to its
            # entries, the drop-in planted word for word so that nothing would run
            # update-grub) is written again from the settings preflight checked. The boot
            # and the tamper listener enforce only what no longer holds: this runs at the
            # installation (and an upgrade's), not at every boot.
            self.regenerate_grub()
            journal.record("grub-locked", dropin=str(self.dropin))
        await self.verify(manager)

    async def restore(self, manager: Systemd, record: Dict[str, Any]) -> List[str]:
        errors = await give_back(manager, record, self.name)
        if self.dropin.exists():
            self.dropin.unlink()
            if not record.get("grub_dropin_dir", True):
                with contextlib.suppress(OSError):
                    self.dropin.parent.rmdir()
            try:
                self.regenerate_grub()
            except CommandError as error:
                errors.append(f"update-grub: {error}")
        return errors
