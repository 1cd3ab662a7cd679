"""The storage guarantee: /var/lib/statemesh is the ephemeral encrypted volume, live now.

The volume itself (layout, key, setup and teardown) is statemesh.volume, which the storage
unit runs at every boot; this guarantee starts and stops that unit and reads the live
volume back: LUKS2, 512-bit key, no keyslot left, mounted nodev,nosuid, and the one file
system at /var/lib/statemesh: anything mounted over it or inside it would take the writes
meant for the volume (a plaintext disk or a tmpfs over it), so it makes the check fail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from statemesh import systemd
from statemesh.config import NodeConfig
from statemesh.guarantees.base import Finding, Probe, Step, Way
from statemesh.run import CommandError, run
from statemesh.volume import (CIPHER, HEADER_BYTES, KEY_BYTES, UNIT, Layout, Mount, StorageError,
                              Volume, count_keyslots, human_size, table_key_bits)

log = logging.getLogger(__name__)
# Where selftest looks for the volume key, which must never be written there: the LUKS
# header area and the package's state.
KEY_FREE_DIRECTORIES = (Path("/var/lib/statemesh-node"), Path("/etc/statemesh"),
                        Path("/run/statemesh-node"))
KEYSLOTS_PROBE = "storage keyslots"
KEY_ON_DISK_PROBE = "volume key on disk"


class Storage:
    """The storage guarantee: start the unit that sets the volume up, read it back, destroy it."""

    name = "storage"
    boot_unit = None  # statemesh-storage.service sets a new volume up at every boot
    tamper_watched = False
    holds_workload_data = True
    kept_by_upgrades_while_holding = False

    def __init__(self, config: NodeConfig, layout: Layout = Layout()):
        self.config = config
        self.layout = layout
        self.volume = Volume(config, layout)

    def backing_name(self) -> str:
        if self.config.storage_device:
            return str(self.config.storage_device)
        return f"file {self.layout.backing_file}"

    def check(self) -> Finding:
        """Backing, cipher, keyslots (must be 0) and size of the live volume, and that
        /var/lib/statemesh is that volume and nothing else (see placement_problems)."""
        facts: Dict[str, Any] = {"backing": self.backing_name(), "mount_point": str(self.layout.mount_point)}
        try:
            status = self.volume.crypt_status()
            mounts = self.volume.mounts()
        except (CommandError, OSError) as error:
            return Finding(self.name, False, f"cannot read the volume: {error}", facts)
        facts["mounted"] = any(mount.point == str(self.layout.mount_point) for mount in mounts)
        if status is None:
            return Finding(self.name, False, f"{self.layout.mapper_path} is not set up", facts)
        device = status.get("device", "")
        try:
            slots = count_keyslots(self.volume.output("cryptsetup", "luksDump", device))
        except CommandError as error:
            return Finding(self.name, False, f"cannot read the LUKS header of {device}: {error}", facts)
        try:
            key_bits = table_key_bits(self.volume.output("dmsetup", "table", self.layout.mapper))
        except (CommandError, ValueError) as error:
            return Finding(self.name, False, f"cannot read the dm-crypt table: {error}", facts)
        sectors = status.get("size", "0").split()[0]
        facts.update(device=device, loop_file=status.get("loop"), type=status.get("type"),
                     cipher=status.get("cipher"), key_bits=key_bits, active_keyslots=slots,
                     size=int(sectors) * 512 if sectors.isdigit() else None)
        problems = []
        if (status.get("type"), status.get("cipher"), key_bits) != ("LUKS2", CIPHER, KEY_BYTES * 8):
            problems.append(f"volume is {status.get('type')} {status.get('cipher')} {key_bits}-bit")
        if slots:
            problems.append(f"{slots} active keyslot(s): the key could be recovered from the disk")
        problems += self.placement_problems(mounts, facts)
        if problems:
            return Finding(self.name, False, "; ".join(problems), facts)
        size = human_size(facts["size"]) if facts["size"] else "unknown size"
        return Finding(self.name, True,
                       f"{self.layout.mount_point}: LUKS2 {CIPHER} 512-bit, 0 keyslots, "
                       f"{size} on {device}", facts)

    def placement_problems(self, mounts: List[Mount], facts: Dict[str, Any]) -> List[str]:
        """Why /var/lib/statemesh is not the volume alone, mounted nodev,nosuid.

        By device numbers, never by names a mount can be given: the mapper device's number
        is the kernel's (sysfs), the mounts' are mountinfo's, and the path's is what a
        program writing there gets (st_dev), which also catches a mount over a parent
        directory that hides the volume without appearing at its path. Anything else
        mounted at the path or inside it (a tmpfs, a plaintext disk) is named.
        """
        point = self.layout.mount_point
        number = self.volume.mapper_number()
        if number is None:
            return [f"the kernel has no device-mapper device named {self.layout.mapper}"]
        ours = next((m for m in mounts if m.point == str(point) and m.number == number), None)
        others = [m for m in mounts if m is not ours]
        facts["other_mounts"] = [f"{m.describe()} at {m.point}" for m in others]
        problems = [f"{m.describe()} is mounted {'at' if m.point == str(point) else 'inside it at'} "
                    f"{m.point}" for m in others]
        if ours is None:
            problems.insert(0, f"{point} is not mounted from {self.layout.mapper_path} "
                               f"({number[0]}:{number[1]})")
        elif not {"nodev", "nosuid"} <= set(ours.options):
            problems.append(f"{point} is mounted without nodev,nosuid")
        try:
            seen = os.stat(point).st_dev
        except OSError as error:
            return problems + [f"cannot read {point}: {error}"]
        if ours is not None and (os.major(seen), os.minor(seen)) != number:
            problems.append(f"{point} leads to device {os.major(seen)}:{os.minor(seen)}, "
                            "not to the volume")
        return problems

    def apply(self, journal: Any) -> None:
        """Start statemesh-storage.service (what every boot does) and confirm the volume.

        The unit, not this process, sets the volume up: systemd then knows it is active,
        and services that require it see it so. A failed start names the unit's journal.
        """
        try:
            asyncio.run(_unit_job("start"))
        except systemd.SystemdError as error:
            raise StorageError(f"{UNIT} did not start ({error}); see journalctl -u {UNIT}") from None
        finding = self.check()
        if not finding.holds:
            raise StorageError(f"{UNIT} started but the volume is not right: {finding.detail}")
        journal.record("storage-ready", detail=finding.detail)

    def revert(self, record: Dict[str, Any]) -> None:
        """Destroy the volume (stopping the unit tears it down), then free the mount point."""
        del record  # the volume is the package's own: nothing of the operator's to restore
        asyncio.run(_unit_job("stop"))
        for step in self.volume.teardown():
            log.info("storage: %s", step)
        self.volume.release_mount_point()

    def ways_in(self) -> Sequence[Way]:
        return (Way(KEYSLOTS_PROBE, Step.DATA_AT_REST, self.probe_keyslots),
                Way(KEY_ON_DISK_PROBE, Step.DATA_AT_REST, self.probe_key_on_disk))

    def probe_keyslots(self) -> Probe:
        """selftest: the LUKS header of the volume must hold no keyslot: nothing on disk
        opens it."""
        finding = self.check()
        slots = finding.facts.get("active_keyslots")
        if slots == 0:
            return Probe(KEYSLOTS_PROBE, True, f"0 keyslots on {finding.facts.get('device')}")
        return Probe(KEYSLOTS_PROBE, False, finding.detail)

    def probe_key_on_disk(self) -> Probe:
        """selftest: search the LUKS header area and the package's state for the live
        volume key."""
        name = KEY_ON_DISK_PROBE
        finding = self.check()
        device = finding.facts.get("device")
        if not device:
            return Probe(name, False, f"no volume to check: {finding.detail}")
        try:
            key = _volume_key(self.layout.mapper)
        except (CommandError, ValueError) as error:
            return Probe(name, False, f"cannot read the volume key: {error}")
        if key is None:
            return Probe(name, True, "the volume key is a logon key in the kernel keyring, "
                         "which no process can read back")
        places = [(Path(device), HEADER_BYTES)]
        places += [(path, path.stat().st_size) for path in _files(KEY_FREE_DIRECTORIES)
                   if path != self.layout.backing_file]
        found = [str(path) for path, limit in places if _contains(path, key, limit)]
        if found:
            return Probe(name, False, "volume key found in " + ", ".join(found))
        return Probe(name, True, f"not in the header of {device} nor in {len(places) - 1} state files")


async def _unit_job(verb: str) -> None:
    """Start or stop the storage unit over D-Bus and wait for the job's result."""
    async with systemd.manager() as manager:
        if verb == "start":
            await manager.start_unit(UNIT)
        else:
            await manager.stop_unit(UNIT)


def _volume_key(mapper: str) -> Optional[bytes]:
    """The volume key as the kernel holds it, None when user space cannot read it back.

    Root can read a hex key from the live table (an honest limit the README states); the
    selftest holds this copy only for the search and exits right after.
    """
    return table_key(run(["dmsetup", "table", "--showkeys", mapper]).stdout)


def table_key(table: bytes) -> Optional[bytes]:
    """The key field of a dm-crypt table line: the key itself when given in hex, None when
    it is a reference to a logon key in the kernel keyring (LUKS2's default since cryptsetup
    2.0, so on Ubuntu 22.04's 2.4 as on Debian's), which by design no process can read back."""
    match = re.search(rb" crypt \S+ (\S+) ", table)
    if not match:
        raise ValueError("no dm-crypt target in the device-mapper table")
    field = match.group(1)
    if re.fullmatch(rb":\d+:logon:\S+", field):
        return None
    if re.fullmatch(rb"(?:[0-9a-f]{2}){16,}", field):
        return bytes.fromhex(field.decode())
    raise ValueError("the dm-crypt key field is neither a hex key nor a logon key reference")


def _files(directories: Iterable[Path]) -> Iterable[Path]:
    for directory in directories:
        if directory.is_dir():
            yield from (p for p in directory.rglob("*") if p.is_file() and not p.is_symlink())


def _contains(path: Path, needle: bytes, limit: int) -> bool:
    overlap = b""
    with open(path, "rb") as handle:
        remaining = limit
        while remaining > 0:
            chunk = handle.read(min(8 << 20, remaining))
            if not chunk:
                return False
            if needle in overlap + chunk:
                return True
            overlap = chunk[-len(needle):]
            remaining -= len(chunk)
    return False
