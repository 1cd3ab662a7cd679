"""Whether a running unit is there because the machine brings it up, or on request.

A unit file can be a package's own and still be a way in: `systemctl start
systemd-nspawn@box` runs a container, `wg-quick@wg0` runs its configuration's `PostUp=`
commands, as root, and neither runs again after a reboot unless something pulls it in.
systemd keeps no record of who asked for a start, but it does know what pulls each unit
in: the reverse dependencies (WantedBy, RequiredBy, BoundBy, UpheldBy) and the units that
trigger it (TriggeredBy: a socket, timer or path). The machine brings a unit up when a
chain of them leads from it to where a boot starts (the default target, the common boot
targets, or the one named on the kernel's command line): the boot starts it, whatever
pulled it in this time. So does udev for a unit an active device wants, and for
`ifup@IFACE` bound to its active interface (ifupdown's hotplug starts it); so does
logind for the service manager of a user it knows (a session, or lingering), and D-Bus
for a service with a bus name. A few packaged units are started by their own packages'
code, on request, and run nothing an operator configures: those are named below.
Anything else was started by a request: `systemctl start`, a script, a program of root's.

The chain is not required to be active: what the boot started and what has ended since
(systemd-fsck-root.service, skipped by its condition, still pulled systemd-fsckd.socket in)
is the boot's all the same. A transient unit is never a link: it is gone at the next
boot, and one made to want a unit (`systemd-run -p Wants=...`) would otherwise vouch for
it. The walk keeps what it proved: most units are wanted by multi-user.target directly.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any, Dict, FrozenSet, Set

from statemesh import bootargs, systemd

PULLED_IN_BY = ("WantedBy", "RequiredBy", "BoundBy", "UpheldBy", "TriggeredBy")
BOOT_TARGETS = frozenset({"multi-user.target", "graphical.target"})
ACTIVE_STATES = ("active", "activating", "reloading")
# What status and preflight say of a unit the machine did not bring up.
ON_REQUEST = "started on request: nothing the boot starts pulls it in or triggers it"
# A user's service manager and runtime directory: logind starts them for a user with a
# session (and stops them a moment after the last one ends) or a lingering user (which
# preflight and status name apart); with neither, one was started by hand.
USERS_UNIT = re.compile(r"^(?:user|user-runtime-dir)@([0-9]+)\.service$")
# Packaged units their own package's code starts with `systemctl start`, which run only
# packaged code: ubuntu-pro-client's APT hook (at every apt update), mdadm for external
# metadata arrays (Intel IMSM, DDF).
STARTED_BY_THEIR_PACKAGE = re.compile(r"^(?:apt-news|esm-cache|mdmon@md[0-9a-z_]+)\.service$")
# ifupdown's hotplug helper starts ifup@IFACE on request, bound to the interface's device.
IFUP = re.compile(r"^ifup@([^/]+)\.service$")


def command_line_target(cmdline: str) -> Set[str]:
    """The unit a `systemd.unit=` argument boots into (the last one counts), if any."""
    named = [word.split("=", 1)[1] for word in cmdline.split()
             if word.startswith("systemd.unit=")]
    return {named[-1]} if named else set()


class BootChain:
    """Answers "did the machine bring this unit up?" over one systemd connection."""

    def __init__(self, manager: systemd.Systemd, roots: FrozenSet[str],
                 logind_users: FrozenSet[int]):
        self._manager = manager
        self._roots = roots
        self._logind_users = logind_users
        self._proven: Set[str] = set()  # by a chain: a link for the units it pulls in
        self._vouched: Set[str] = set()  # by itself only (bus name, device binding): no link
        # Asked once, by the first walk that needs it (the others await the same answer):
        # most units share their pullers.
        self._transients: Dict[str, "asyncio.Future[bool]"] = {}

    @classmethod
    async def of(cls, manager: systemd.Systemd,
                 cmdline: Path = bootargs.KERNEL_COMMAND_LINE) -> "BootChain":
        roots = set(BOOT_TARGETS) | {await manager.default_target()}
        roots |= command_line_target(cmdline.read_text(encoding="utf-8", errors="replace"))
        users = await systemd.Logind(manager.bus).list_users()
        return cls(manager, frozenset(roots), frozenset(users))

    async def brought_up(self, unit: str) -> bool:
        """Whether the machine brings `unit` up itself (see the module's docstring). Its own
        bus name counts, or its binding to a device, not those of a unit on its chain."""
        if unit in self._proven or unit in self._vouched:
            return True
        logind_unit = USERS_UNIT.match(unit)
        if logind_unit:
            return int(logind_unit.group(1)) in self._logind_users
        if STARTED_BY_THEIR_PACKAGE.match(unit) or await self._walk(unit, set()):
            return True
        if await self._bound_to_a_device(unit) or (unit.endswith(".service")
                                                   and await self._bus_name(unit)):
            self._vouched.add(unit)  # not a link: a unit it wants is not the boot's for that
            return True
        return False

    async def _walk(self, unit: str, seen: Set[str]) -> bool:
        """Whether a chain of reverse dependencies, no link transient, leads from `unit` to
        a boot root or an active device."""
        if unit in self._proven or unit in self._roots:
            return True
        if unit.endswith(".device"):
            return await self._active(unit)
        seen.add(unit)
        if await self._pulled_in(unit, seen):
            self._proven.add(unit)
            return True
        return False

    async def _pulled_in(self, unit: str, seen: Set[str]) -> bool:
        """Property by property, WantedBy first (most units are wanted by a boot target):
        each one read costs a round trip."""
        for prop in PULLED_IN_BY:
            for puller in await self._optional(unit, systemd.UNIT, prop, []):
                if puller in seen or await self._transient(puller):
                    continue
                if await self._walk(puller, seen):
                    return True
        return False

    async def _bound_to_a_device(self, unit: str) -> bool:
        """ifup@IFACE bound to its interface's device: what ifupdown's hotplug starts."""
        interface = IFUP.match(unit)
        if not interface:
            return False
        device = f"sys-subsystem-net-devices-{interface.group(1)}.device"
        return (device in await self._optional(unit, systemd.UNIT, "BindsTo", [])
                and await self._active(device))

    async def _transient(self, unit: str) -> bool:
        """Gone at the next boot: never a link (the unit judged is not transient: leftrunning
        names transient ones itself)."""
        if unit not in self._transients:
            self._transients[unit] = asyncio.ensure_future(
                self._optional(unit, systemd.UNIT, "Transient", False))
        return bool(await self._transients[unit])

    async def _bus_name(self, unit: str) -> str:
        return await self._optional(unit, f"{systemd.SYSTEMD}.Service", "BusName", "")

    async def _active(self, unit: str) -> bool:
        return await self._optional(unit, systemd.UNIT, "ActiveState", "") in ACTIVE_STATES

    async def _optional(self, unit: str, interface: str, prop: str, absent: Any) -> Any:
        """A property, or `absent` where this systemd has no such property (UpheldBy is
        new in 249) or no such unit any more; a lost bus is not an absent property."""
        try:
            return await self._manager.get_unit_property(unit, interface, prop)
        except (systemd.AccessDeniedError, systemd.NoBusError):
            raise
        except systemd.SystemdError:
            return absent
