"""Ephemeral encrypted /var/lib/statemesh: a new LUKS2 volume with a forgotten key at every boot.

Workload data must be worthless to whoever takes the disk, boots other media or reaches
single-user mode. So statemesh-storage.service, early at every boot and without initramfs or
crypttab, runs `setup()`:

1. backing: Storage-Device (node.conf) after safety checks, or a sparse file of Storage-Size
   (default 8G, or half the free space if less) on a loop device; the previous boot's
   header is wiped first (its key is gone anyway);
2. a fresh 512-bit key from the kernel's CSPRNG in a bytearray (mlocked where allowed), fed
   to cryptsetup through a pipe written from a memoryview: never argv, never a file, never
   an immutable bytes copy; luksFormat (LUKS2, aes-xts-plain64, 512-bit), open as
   /dev/mapper/statemesh, then luksErase: with no keyslot left, the volume key exists only in
   the kernel, and the bytearray is zeroed;
3. mkfs.ext4 tuned for an empty volume that never survives a reboot, mounted nodev,nosuid
   at /var/lib/statemesh, root-owned, mode 0700.

PBKDF: pbkdf2 with the minimum 1000 iterations. Key stretching exists to slow down guessing
of low-entropy passphrases; the key here is 512 random bits, beyond any guessing with or
without stretching, and its keyslot is erased a second later. Argon2 (cryptsetup's default)
would cost seconds and up to a gigabyte of memory at every boot for nothing.

Failure: any error fails the unit loudly and leaves /var/lib/statemesh unmounted as an empty
root-owned mode-000 immutable directory, so nothing writes plaintext to the root filesystem
in its place. Refusals (a device carrying a filesystem, partition table, RAID/LVM or foreign
LUKS signature, mounted, in use, or on the root disk) happen before anything is written.
Storage-Dedicated: yes overrides signatures only, never a device the system uses.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import logging
import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from statemesh import blockdev
from statemesh.config import NodeConfig
from statemesh.run import SAFE_PATH, CommandError, run

log = logging.getLogger(__name__)

UNIT = "statemesh-storage.service"
LUKS_LABEL = "statemesh-ephemeral"
CIPHER = "aes-xts-plain64"
KEY_BYTES = 64
# LUKS2's default metadata and keyslot area: both header copies and every keyslot.
HEADER_BYTES = 16 * 1024 * 1024
# Without Storage-Size: 8G, or half the free space when that is less, so that a small
# cloud disk still gets a volume; an explicit Storage-Size that does not fit is an error.
DEFAULT_SIZE = 8 * 1024**3
MINIMUM_SIZE = 64 * 1024**2
MOUNT_OPTIONS = "nodev,nosuid,noatime"
VOLUME_MODE = 0o700
# ext4 for a volume that is new at every boot and never checked or recovered: no journal
# (a crash destroys the volume anyway, so replay never happens), inode tables initialised
# lazily, no discard pass over a volume that was never written, no root-reserved blocks.
MKFS_ARGS = ("-F", "-q", "-L", "statemesh", "-m", "0", "-O", "^has_journal",
             "-E", "lazy_itable_init=1,nodiscard")


class StorageError(RuntimeError):
    """Setup, teardown or a safety check failed; the message says what and where."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the storage lives and which programs it runs; tests point these elsewhere."""

    mount_point: Path = Path("/var/lib/statemesh")
    backing_file: Path = Path("/var/lib/statemesh-node/storage.img")
    mapper: str = "statemesh"
    search_path: str = SAFE_PATH
    sysfs: Path = Path("/sys")
    proc: Path = Path("/proc")
    device_timeout: float = 90.0

    @property
    def mapper_path(self) -> Path:
        return Path("/dev/mapper") / self.mapper


# -- the key ------------------------------------------------------------------------------


class Key:
    """A fresh random key in a bytearray, locked in RAM where allowed, zeroed on exit."""

    def __init__(self, size: int = KEY_BYTES):
        self.buffer = bytearray(size)
        self.locked = False

    def __enter__(self) -> bytearray:
        self.locked = _memory_lock(self.buffer, lock=True)
        with open("/dev/urandom", "rb", buffering=0) as source:
            filled = 0
            view = memoryview(self.buffer)
            while filled < len(view):
                filled += source.readinto(view[filled:]) or 0
            view.release()
        return self.buffer

    def __exit__(self, *exc_info: object) -> None:
        zero(self.buffer)
        if self.locked:
            _memory_lock(self.buffer, lock=False)


def zero(buffer: bytearray) -> None:
    """Overwrite a key in place (slice assignment writes into the same memory)."""
    buffer[:] = bytes(len(buffer))


def _memory_lock(buffer: bytearray, lock: bool) -> bool:
    """mlock/munlock the buffer's pages so the key is never swapped out; False if refused."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    call = libc.mlock if lock else libc.munlock
    if call(ctypes.c_void_p(address), ctypes.c_size_t(len(buffer))) != 0:
        log.warning("mlock refused (%s): the key may be swapped", os.strerror(ctypes.get_errno()))
        return False
    return True


def feed_key(argv: List[str], key: bytearray, search_path: str, timeout: float = 300) -> None:
    """Run argv with the key on its stdin through a pipe written from a memoryview.

    This is the one subprocess that does not go through run(): run() takes `input` as bytes,
    which would be an immutable copy of the key that cannot be overwritten.
    """
    environment = {"PATH": search_path, "LC_ALL": "C.UTF-8"}
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen(argv, stdin=read_end, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=environment)
    except FileNotFoundError:
        os.close(write_end)
        raise CommandError(argv, 127, f"{argv[0]}: command not found") from None
    finally:
        os.close(read_end)
    view = memoryview(key)
    try:
        written = 0
        while written < len(view):
            written += os.write(write_end, view[written:])
    except BrokenPipeError:
        pass  # the program exited early: its status and message say why
    finally:
        view.release()
        os.close(write_end)
    _out, err = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise CommandError(argv, process.returncode, err.decode(errors="replace"))


# -- reading the live state ---------------------------------------------------------------


def parse_crypt_status(text: str) -> Dict[str, str]:
    """`cryptsetup status NAME` as key -> value (type, cipher, keysize, device, loop, size)."""
    fields: Dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key and " is " not in key:
            fields[key.strip()] = value.strip()
    return fields


def table_key_bits(table: str) -> int:
    """Key size of a dm-crypt table line (`dmsetup table`, keys hidden or in the keyring).

    `cryptsetup status` derives the key size from the LUKS2 keyslots, which we erased, so
    it says 0; the kernel's table is the truth: `:64:logon:...` for a key in the kernel
    keyring, otherwise the key as hex digits (zeros unless --showkeys).
    """
    fields = table.split()
    if len(fields) < 5 or fields[2] != "crypt":
        raise ValueError(f"not a dm-crypt table: {table!r}")
    key = fields[4]
    if key.startswith(":"):
        return int(key.split(":")[1]) * 8
    return len(key) * 4


def count_keyslots(luks_dump: str) -> int:
    """Number of keyslots in `cryptsetup luksDump` output (LUKS2: the Keyslots: section)."""
    count = 0
    inside = False
    for line in luks_dump.splitlines():
        if not line.startswith((" ", "\t")):
            inside = line.strip() == "Keyslots:"
            continue
        if inside and line.startswith("  ") and line.strip()[:1].isdigit() and ":" in line:
            count += 1
    return count


@dataclasses.dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo: which file system (device number) is mounted where."""

    number: Tuple[int, int]
    point: str
    options: Tuple[str, ...]  # the mount's and the superblock's
    fstype: str
    source: str

    def describe(self) -> str:
        return f"{self.fstype} {self.source} ({self.number[0]}:{self.number[1]})"


def parse_mountinfo(mountinfo: str) -> List[Mount]:
    """Every mount of a mountinfo text, in the kernel's order (oldest first)."""
    mounts = []
    for line in mountinfo.splitlines():
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 6 or len(tail) < 3 or ":" not in fields[2]:
            continue
        major, _, minor = fields[2].partition(":")
        mounts.append(Mount((int(major), int(minor)), fields[4],
                            tuple(fields[5].split(",") + tail[2].split(",")), tail[0], tail[1]))
    return mounts


def mounts_at_or_under(mountinfo: str, mount_point: Path) -> List[Mount]:
    """The mounts at mount_point or anywhere below it, oldest first."""
    point = str(mount_point)
    return [mount for mount in parse_mountinfo(mountinfo)
            if mount.point == point or mount.point.startswith(point + "/")]


def find_mount(mountinfo: str, mount_point: Path) -> Optional[Tuple[str, List[str]]]:
    """(source, mount and superblock options) of the top mount at mount_point, or None."""
    found = [mount for mount in parse_mountinfo(mountinfo) if mount.point == str(mount_point)]
    return (found[-1].source, list(found[-1].options)) if found else None


# -- setup and teardown -------------------------------------------------------------------


class Volume:
    """The setup/teardown statemesh-storage.service and purge run, and what they read back."""

    def __init__(self, config: NodeConfig, layout: Layout = Layout()):
        self.config = config
        self.layout = layout

    # programs ---------------------------------------------------------------------------

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(list(argv), env={"PATH": self.layout.search_path}, check=check)

    def output(self, *argv: str) -> str:
        return self._run(*argv).stdout.decode(errors="replace")

    def _mountinfo(self) -> str:
        return (self.layout.proc / "self" / "mountinfo").read_text()

    def mounted(self) -> Optional[Tuple[str, List[str]]]:
        return find_mount(self._mountinfo(), self.layout.mount_point)

    def mounts(self) -> List[Mount]:
        """Everything mounted at the mount point or inside it."""
        return mounts_at_or_under(self._mountinfo(), self.layout.mount_point)

    def mapper_number(self) -> Optional[Tuple[int, int]]:
        return blockdev.Sysfs(self.layout.sysfs).mapped(self.layout.mapper)

    def crypt_status(self) -> Optional[Dict[str, str]]:
        result = self._run("cryptsetup", "status", self.layout.mapper, check=False)
        return parse_crypt_status(result.stdout.decode(errors="replace")) if result.returncode == 0 else None

    # the mount point --------------------------------------------------------------------

    def _immutable(self, on: bool) -> None:
        self._run("chattr", "+i" if on else "-i", str(self.layout.mount_point))

    def protect_mount_point(self) -> None:
        """Unmounted, /var/lib/statemesh is an empty root-owned 000 immutable directory.

        Root bypasses mode 000, not the immutable flag: nothing can create a file there by
        mistake while the volume is missing, so no plaintext lands on the root filesystem.
        """
        point = self.layout.mount_point
        if self.mounted():
            return
        if point.is_symlink() or (point.exists() and not point.is_dir()):
            raise StorageError(f"{point} exists and is not a directory: move it away")
        if not point.exists():
            point.mkdir(mode=0o000)
        info = point.stat()
        if any(point.iterdir()):
            raise StorageError(f"{point} is not mounted but holds files (plaintext on the root "
                               "filesystem): move them away; the volume must not hide them")
        if info.st_uid != 0 or info.st_gid != 0 or stat.S_IMODE(info.st_mode) != 0:
            self._immutable(False)
            os.chown(point, 0, 0)
            os.chmod(point, 0o000)
        self._immutable(True)

    def release_mount_point(self) -> None:
        """Give /var/lib/statemesh back at purge: the immutable empty directory goes away."""
        point = self.layout.mount_point
        if point.is_dir() and not self.mounted():
            self._immutable(False)
            if not any(point.iterdir()):
                point.rmdir()

    # the backing store ------------------------------------------------------------------

    def _wipe_header(self, path: Path, flags: int = 0) -> None:
        """Zero LUKS2's header area (both copies, every keyslot) of a file or device."""
        descriptor = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flags)
        try:
            size = os.lseek(descriptor, 0, os.SEEK_END)
            os.lseek(descriptor, 0, os.SEEK_SET)
            block = bytes(1024 * 1024)
            remaining = min(HEADER_BYTES, size)
            while remaining > 0:
                remaining -= os.write(descriptor, block[: min(len(block), remaining)])
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def _prepare_file(self) -> Path:
        """A fresh sparse backing file on a new loop device; returns the loop device."""
        path = self.layout.backing_file
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fs = os.statvfs(path.parent)  # the previous file is gone: teardown() removed it
        available = fs.f_bavail * fs.f_frsize
        size = backing_size(self.config.storage_size, available)
        if available < size:
            raise StorageError(
                f"not enough free space for the {human_size(size)} backing file {path}: "
                f"{human_size(available)} available on its filesystem; lower Storage-Size or set "
                "Storage-Device in /etc/statemesh/node.conf")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        descriptor = os.open(path, flags, 0o600)
        try:
            os.ftruncate(descriptor, size)
        finally:
            os.close(descriptor)
        return Path(self.output("losetup", "--find", "--show", str(path)).strip())

    def _wait_for(self, device: Path) -> None:
        deadline = time.monotonic() + self.layout.device_timeout
        while not device.exists():
            if time.monotonic() > deadline:
                raise StorageError(f"Storage-Device {device} did not appear within "
                                   f"{self.layout.device_timeout:.0f} s")
            time.sleep(0.5)

    def _is_ours(self, device: Path, found: Tuple[blockdev.Signature, ...]) -> bool:
        """A LUKS header of ours from an earlier boot: our label and no keyslot left."""
        if not found or any(s.type != "crypto_LUKS" or s.label != LUKS_LABEL for s in found):
            return False
        return count_keyslots(self.output("cryptsetup", "luksDump", str(device))) == 0

    def check_device(self, device: Path) -> Tuple[blockdev.Signature, ...]:
        """Refuse a device the system uses or that carries data; return signatures to wipe."""
        try:
            number = blockdev.device_number(device)
        except (ValueError, OSError) as error:
            raise StorageError(f"Storage-Device {device}: {error}") from None
        sysfs = blockdev.Sysfs(self.layout.sysfs)
        problems = blockdev.usage_problems(
            device, number, sysfs, self._mountinfo(),
            (self.layout.proc / "swaps").read_text(), blockdev.root_disks(sysfs))
        if not problems and blockdev.opened_exclusively_elsewhere(device):
            problems.append("another program holds it open exclusively")
        if problems:
            raise StorageError(f"refusing to format Storage-Device {device}: {'; '.join(problems)}")
        return self.check_signatures(device)

    def check_signatures(self, device: Path) -> Tuple[blockdev.Signature, ...]:
        """Refuse a device carrying anything but our old header, unless it is dedicated."""
        found = blockdev.signatures(device, lambda argv: self._run(*argv).stdout)
        if not found or self._is_ours(device, found) or self.config.storage_dedicated:
            return found
        listed = "; ".join(s.describe() for s in found)
        raise StorageError(f"refusing to format Storage-Device {device}: it carries {listed}. "
                           "Nothing was written. If everything on it may be destroyed, set "
                           "Storage-Dedicated: yes in /etc/statemesh/node.conf")

    def _prepare_device(self, device: Path) -> Path:
        self._wait_for(device)
        real = Path(os.path.realpath(device))
        found = self.check_device(real)
        if found:
            self._wipe_header(real, os.O_EXCL)
            self._run("wipefs", "--all", "--quiet", str(real))
        return real

    # the volume -------------------------------------------------------------------------

    def _format_and_open(self, device: Path) -> None:
        with Key() as key:
            feed_key(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2",
                      "--cipher", CIPHER, "--key-size", str(KEY_BYTES * 8), "--hash", "sha256",
                      "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
                      "--label", LUKS_LABEL, "--key-file=-", str(device)],
                     key, self.layout.search_path)
            feed_key(["cryptsetup", "open", "--type", "luks2", "--key-file=-",
                      str(device), self.layout.mapper], key, self.layout.search_path)
        self._run("cryptsetup", "luksErase", "--batch-mode", str(device))
        slots = count_keyslots(self.output("cryptsetup", "luksDump", str(device)))
        if slots:
            raise StorageError(f"{device}: {slots} keyslot(s) left after luksErase")

    def setup(self) -> str:
        """Create and mount this boot's volume; idempotent. Returns what it did, for the log."""
        point = self.layout.mount_point
        mounted = self.mounted()
        if mounted and self.crypt_status() is not None:
            return f"{point} is already mounted from {mounted[0]}"
        self.teardown()
        self.protect_mount_point()
        try:
            if self.config.storage_device:
                backing = self._prepare_device(self.config.storage_device)
            else:
                backing = self._prepare_file()
            self._format_and_open(backing)
            self._run("mkfs.ext4", *MKFS_ARGS, str(self.layout.mapper_path))
            self._run("mount", "-t", "ext4", "-o", MOUNT_OPTIONS, str(self.layout.mapper_path), str(point))
            os.chown(point, 0, 0)
            os.chmod(point, VOLUME_MODE)
        except BaseException:
            self._dismantle_after_failure()
            raise
        return f"{point} mounted from {self.layout.mapper_path} on {backing}"

    def _dismantle_after_failure(self) -> None:
        try:
            self.teardown()
        except (CommandError, StorageError, OSError) as error:
            log.error("cleanup after the failed setup failed too: %s", error)

    def teardown(self) -> List[str]:
        """Unmount, close, wipe the header and detach: this boot's data is destroyed."""
        done = []
        mounted = self.mounted()
        if mounted and mounted[0] != str(self.layout.mapper_path):
            raise StorageError(f"{self.layout.mount_point} is mounted from {mounted[0]}, not "
                               f"from {self.layout.mapper_path}: unmount it first")
        if mounted:
            self._run("umount", str(self.layout.mount_point))
            done.append(f"unmounted {self.layout.mount_point}")
        status = self.crypt_status()
        if status is not None:
            self._run("cryptsetup", "close", self.layout.mapper)
            done.append(f"closed {self.layout.mapper_path}")
            device = Path(status.get("device", ""))
            if status.get("loop") != str(self.layout.backing_file) and device.is_absolute():
                self._wipe_header(device, os.O_EXCL)
                done.append(f"wiped the header of {device}")
        for loop in self.output("losetup", "--list", "--noheadings", "--output", "NAME",
                                 "--associated", str(self.layout.backing_file)).split():
            self._run("losetup", "--detach", loop)
            done.append(f"detached {loop}")
        if self.layout.backing_file.exists():
            self._wipe_header(self.layout.backing_file)
            self.layout.backing_file.unlink()
            done.append(f"removed {self.layout.backing_file}")
        self.protect_mount_point()
        return done


def backing_size(configured: Optional[int], available: int) -> int:
    """Storage-Size if set; else 8G, or half the available space (whole MiB) if less."""
    if configured is not None:
        return configured
    half = available // 2 // 1024**2 * 1024**2
    return max(MINIMUM_SIZE, min(DEFAULT_SIZE, half))


def human_size(size: int) -> str:
    """A size as people read it: 8.0G, 512.0M."""
    for unit in ("T", "G", "M", "K"):
        scale = 1024 ** "KMGT".index(unit) * 1024
        if size >= scale:
            return f"{size / scale:.1f}{unit}"
    return f"{size}B"
