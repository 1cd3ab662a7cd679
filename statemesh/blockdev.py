"""Read-only probing of a block device before the storage module may format it.

Formatting destroys whatever is on a device, so the storage module asks this module first:
which on-disk signatures the device carries (wipefs, which lists every filesystem,
partition table, RAID, LVM and LUKS signature libblkid knows, including backup copies), and
whether the kernel uses it (mounted, swap, held by device-mapper/md, partitioned, or one of
the disks the root filesystem lives on). Nothing here writes to a device.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
from pathlib import Path
from typing import Callable, List, Optional, Set, Tuple

# Signature types by what they are, for error messages an operator understands.
_PARTITION_TABLES = {"dos", "gpt", "PMBR", "atari", "bsd", "sun", "sgi", "mac", "solaris"}
_RAID_LVM = {"linux_raid_member", "LVM2_member", "LVM1_member", "isw_raid_member",
             "ddf_raid_member", "zfs_member", "bcache", "drbd", "ceph"}


@dataclasses.dataclass(frozen=True)
class Signature:
    """One signature wipefs found: its type (ext4, dos, crypto_LUKS...), offset and label."""

    type: str
    offset: str
    label: Optional[str]

    def describe(self) -> str:
        if self.type in _PARTITION_TABLES:
            kind = "partition table"
        elif self.type in _RAID_LVM:
            kind = "RAID/LVM member"
        elif self.type.startswith("crypto_"):
            kind = "encrypted volume"
        else:
            kind = "filesystem or other signature"
        label = f" labelled {self.label!r}" if self.label else ""
        return f"{kind} {self.type}{label} at offset {self.offset}"


Runner = Callable[[List[str]], bytes]


def parse_wipefs(output: bytes) -> Tuple[Signature, ...]:
    """Signatures from `wipefs --no-act --json` (empty output means none)."""
    if not output.strip():
        return ()
    try:
        found = json.loads(output)["signatures"]
        return tuple(Signature(str(s["type"]), str(s["offset"]), s.get("label")) for s in found)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"unexpected wipefs output: {error}") from None


def signatures(path: Path, runner: Runner) -> Tuple[Signature, ...]:
    """Every signature on a device or image file, read without writing (wipefs -n)."""
    return parse_wipefs(runner(["wipefs", "--no-act", "--json", str(path)]))


def device_number(path: Path) -> Tuple[int, int]:
    """major:minor of a block device node; ValueError for anything else."""
    mode = os.stat(path).st_mode
    if not stat.S_ISBLK(mode):
        raise ValueError(f"{path} is not a block device")
    rdev = os.stat(path).st_rdev
    return os.major(rdev), os.minor(rdev)


def mounted_numbers(mountinfo: str) -> Set[Tuple[int, int]]:
    """major:minor of every mounted source, from /proc/self/mountinfo's third field."""
    numbers = set()
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 2 and ":" in fields[2]:
            major, _, minor = fields[2].partition(":")
            numbers.add((int(major), int(minor)))
    return numbers


def swap_paths(swaps: str) -> Set[str]:
    """Devices and files in use as swap, from /proc/swaps."""
    return {line.split()[0] for line in swaps.splitlines()[1:] if line.split()}


class Sysfs:
    """The block layer's view of devices (/sys/dev/block), rooted elsewhere in tests."""

    def __init__(self, root: Path = Path("/sys")):
        self.root = root

    def _node(self, number: Tuple[int, int]) -> Path:
        return self.root / "dev" / "block" / f"{number[0]}:{number[1]}"

    def _number(self, node: Path) -> Tuple[int, int]:
        major, _, minor = (node / "dev").read_text().strip().partition(":")
        return int(major), int(minor)

    def mapped(self, name: str) -> Optional[Tuple[int, int]]:
        """major:minor of the device-mapper device called `name`, None if there is none.

        The kernel's own record (/sys/block/dm-N/dm/name), not a /dev/mapper node that
        root can replace with one of another device.
        """
        for node in sorted((self.root / "block").glob("dm-*")):
            try:
                if (node / "dm" / "name").read_text().strip() == name:
                    return self._number(node)
            except OSError:
                continue  # removed while we looked
        return None

    def disk_of(self, number: Tuple[int, int]) -> Tuple[int, int]:
        """The whole disk a partition belongs to (a disk is its own)."""
        node = self._node(number).resolve()
        if (node / "partition").exists():
            return self._number(node.parent)
        return number

    def partitions(self, number: Tuple[int, int]) -> List[Tuple[int, int]]:
        node = self._node(number).resolve()
        return [self._number(child) for child in sorted(node.iterdir())
                if (child / "partition").exists()]

    def holders(self, number: Tuple[int, int]) -> List[str]:
        """Devices built on top of this one (dm-crypt, LVM, md): it is in use."""
        directory = self._node(number).resolve() / "holders"
        return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []

    def underlying_disks(self, number: Tuple[int, int]) -> Set[Tuple[int, int]]:
        """The whole disks a device is built from, through dm/md/LVM slaves."""
        slaves = self._node(number).resolve() / "slaves"
        below = [self._number(p) for p in slaves.iterdir()] if slaves.is_dir() else []
        if not below:
            return {self.disk_of(number)}
        disks: Set[Tuple[int, int]] = set()
        for slave in below:
            disks |= self.underlying_disks(slave)
        return disks


def root_disks(sysfs: Sysfs, root: Path = Path("/")) -> Set[Tuple[int, int]]:
    """The disks holding the root filesystem (none for a root without a block device)."""
    dev = os.stat(root).st_dev
    number = (os.major(dev), os.minor(dev))
    try:
        return sysfs.underlying_disks(number)
    except FileNotFoundError:
        return set()


def usage_problems(
    path: Path,
    number: Tuple[int, int],
    sysfs: Sysfs,
    mountinfo: str,
    swaps: str,
    root: Set[Tuple[int, int]],
) -> List[str]:
    """Why the kernel or the system uses this device; empty when it is free to format."""
    problems = []
    parts = sysfs.partitions(number)
    mounted = mounted_numbers(mountinfo)
    if number in mounted:
        problems.append("it is mounted")
    problems += [f"its partition {p[0]}:{p[1]} is mounted" for p in parts if p in mounted]
    if parts:
        problems.append(f"it has {len(parts)} partition(s)")
    holders = sysfs.holders(number) + [h for p in parts for h in sysfs.holders(p)]
    if holders:
        problems.append(f"it is held by {', '.join(holders)}")
    if str(path) in swap_paths(swaps) or os.path.realpath(path) in swap_paths(swaps):
        problems.append("it is in use as swap")
    if sysfs.disk_of(number) in root:
        problems.append("it is on the disk of the root filesystem")
    return problems


def opened_exclusively_elsewhere(path: Path) -> bool:
    """Whether the kernel refuses an exclusive open (mounted, mapped or claimed by anyone)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.EBUSY:
            return True
        raise
    os.close(descriptor)
    return False

