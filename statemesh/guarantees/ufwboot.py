"""ufw.service, which loads ufw's rules at every boot before the network is up.

Masked or disabled before installing, it leaves every boot of the node open from the moment
the network is up until statemesh-firewall.service applies the firewall again, after the
lockdown's boot-time re-assert (half a minute of an emulated boot): every listening port
answers anyone meanwhile. The firewall guarantee holds only while it is enabled, enables
it (unmasked first), and gives back at purge the state it found, asked of and set through
systemd's D-Bus API (its unit file state, as `systemctl is-enabled` says it).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Awaitable, Callable, Dict, List, Protocol, Tuple

from statemesh import systemd
from statemesh.guarantees import unitmask

UNIT = "ufw.service"
ENABLED = "enabled"


class BootUnit(Protocol):
    """Whether the next boot loads ufw's rules early, and the switch for it."""

    def state(self) -> str:
        """The unit file state: enabled, disabled, masked, masked-runtime, ..."""

    def set(self, state: str) -> None:
        """Make the unit file state `state` (one restorable() accepts)."""


# How each state found is made again at purge, from enabled: (disable first, then mask or
# enable; each for good or for this boot only).
_RESTORE: Dict[str, Tuple[str, ...]] = {
    ENABLED: (),
    "disabled": ("disable",),
    "masked": ("disable", "mask"),
    "masked-runtime": ("disable", "mask-runtime"),
    "enabled-runtime": ("disable", "enable-runtime"),
}


def restorable(state: str) -> bool:
    """A state purge can make again; any other (static, generated, linked: not ufw's unit
    as its package installed it) is left enabled."""
    return state in _RESTORE


# Where enabling ufw.service links it ([Install] WantedBy=multi-user.target), and the unit
# file its package installs (/lib and /usr/lib are one after the /usr merge).
BOOT_LINK = Path("/etc/systemd/system/multi-user.target.wants") / UNIT
PACKAGED = ("/usr/lib/systemd/system/ufw.service", "/lib/systemd/system/ufw.service")
NOT_BY_THE_BOOT = "enabled, but not wanted by multi-user.target"


def wanted_by_the_boot(link: Path = BOOT_LINK) -> bool:
    """Whether the boot's target wants the packaged unit: systemd says "enabled" for a link
    in any .wants directory, one of a target nothing starts among them."""
    return os.path.realpath(link) in PACKAGED


class SystemdBootUnit:
    """ufw.service as systemd has it on disk, through its D-Bus API."""

    def __init__(self, boot_link: Path = BOOT_LINK):
        self.boot_link = boot_link

    def state(self) -> str:
        state = asyncio.run(unitmask.with_manager(
            lambda manager: manager.get_unit_file_state(UNIT)))
        if state == ENABLED and not wanted_by_the_boot(self.boot_link):
            return NOT_BY_THE_BOOT
        return state

    def set(self, state: str) -> None:
        asyncio.run(unitmask.with_manager(lambda manager: _set(manager, state)))


async def _set(manager: systemd.Systemd, state: str) -> None:
    if state == ENABLED:
        await manager.unmask_unit_files([UNIT])
        await manager.unmask_unit_files([UNIT], runtime=True)
        await manager.enable_unit_files([UNIT])
        return
    steps: Dict[str, Callable[[], Awaitable[List[systemd.UnitFileChange]]]] = {
        "disable": lambda: manager.disable_unit_files([UNIT]),
        "mask": lambda: manager.mask_unit_files([UNIT]),
        "mask-runtime": lambda: manager.mask_unit_files([UNIT], runtime=True),
        "enable-runtime": lambda: manager.enable_unit_files([UNIT], runtime=True),
    }
    for step in _RESTORE.get(state, ()):
        await steps[step]()
