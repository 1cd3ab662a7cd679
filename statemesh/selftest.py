"""`statemesh-node selftest`: try, on the live node, the ways in that are safe to try.

`status` reads configuration back; selftest acts like an intruder would, within what a
live node can afford: it opens a terminal and waits to see it killed, asks systemd over
D-Bus to start sshd and a getty (both must be refused), and looks for the storage volume
key anywhere it must never be. A probe that cannot run reports "open": failing closed
is the only honest answer for a proof.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from statemesh import systemd, volume
from statemesh.guarantees import storage
from statemesh.config import NodeConfig
from statemesh.run import CommandError, run

PTY_DEADLINE_SECONDS = 5.0
UNITS_THAT_MUST_NOT_START = ("ssh.service", "getty@tty2.service", "serial-getty@ttyS1.service")
# Where the volume key must never be written: the LUKS header area and the package's state.
KEY_FREE_DIRECTORIES = (Path("/var/lib/statemesh-node"), Path("/etc/statemesh"),
                        Path("/run/statemesh-node"))


@dataclasses.dataclass(frozen=True)
class Probe:
    """One way in that was tried, and whether the node blocked it."""

    name: str
    blocked: bool
    detail: str

    def as_dict(self) -> Dict[str, object]:
        return dataclasses.asdict(self)


def probe_pty(deadline: float = PTY_DEADLINE_SECONDS) -> Probe:
    """Open a pty in a child process and wait for the watchdog to kill the holder."""
    name = "pty"
    ready_read, ready_write = os.pipe()
    child = os.fork()
    if child == 0:  # the holder: open a terminal, say so, and wait to be killed
        os.close(ready_read)
        _master, slave = os.openpty()
        os.write(ready_write, os.ttyname(slave).encode())
        time.sleep(deadline * 4)
        os._exit(0)
    os.close(ready_write)
    started = time.monotonic()
    # The watchdog may kill the holder before it has written the pty's name.
    terminal = os.read(ready_read, 64).decode() or "a new pty"
    os.close(ready_read)
    try:
        _pid, status = _wait_child(child, deadline)
    except TimeoutError:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        return Probe(name, False, f"{terminal} stayed open {deadline:.1f} s")
    elapsed_ms = (time.monotonic() - started) * 1000
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return Probe(name, True, f"holder of {terminal} killed after {elapsed_ms:.0f} ms")
    return Probe(name, False, f"holder of {terminal} ended on its own (status {status})")


def _wait_child(pid: int, timeout: float) -> tuple:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            return finished, status
        time.sleep(0.005)
    raise TimeoutError


async def _try_start(manager: systemd.Systemd, unit: str) -> Probe:
    name = f"start {unit}"
    try:
        await manager.start_unit(unit, timeout=30)
    except systemd.SystemdError as error:
        if await manager.get_active_state(unit) in ("active", "activating"):
            return Probe(name, False, f"refused ({error}) but the unit is running")
        return Probe(name, True, f"refused: {error}")
    await manager.stop_unit(unit)
    return Probe(name, False, "systemd started it (stopped again by selftest)")


async def _probe_units() -> List[Probe]:
    async with systemd.manager() as manager:
        return [await _try_start(manager, unit) for unit in UNITS_THAT_MUST_NOT_START]


def probe_units() -> List[Probe]:
    """Ask systemd to start sshd and gettys: every request must be refused."""
    try:
        return asyncio.run(_probe_units())
    except systemd.SystemdError as error:
        return [Probe(f"start {unit}", False, f"could not ask systemd: {error}")
                for unit in UNITS_THAT_MUST_NOT_START]


def probe_keyslots(config: NodeConfig) -> Probe:
    """The LUKS header of the volume must hold no keyslot: nothing on disk opens it."""
    finding = storage.Storage(config).check()
    slots = finding.facts.get("active_keyslots")
    if slots == 0:
        return Probe("storage keyslots", True, f"0 keyslots on {finding.facts.get('device')}")
    return Probe("storage keyslots", False, finding.detail)


def _volume_key(mapper: str) -> Optional[bytes]:
    """The volume key as the kernel holds it, None when user space cannot read it back.

    Root can read a hex key from the live table (an honest limit the README states); the
    selftest holds this copy only for the search and exits right after.
    """
    return table_key(run(["dmsetup", "table", "--showkeys", mapper]).stdout)


def table_key(table: bytes) -> Optional[bytes]:
    """The key field of a dm-crypt table line: the key itself when given in hex, None when
    it is a reference to a logon key in the kernel keyring (cryptsetup >= 2.6 with LUKS2),
    which by design no process can read back."""
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


def probe_key_on_disk(config: NodeConfig) -> Probe:
    """Search the LUKS header area and the package's state for the live volume key."""
    name = "volume key on disk"
    layout = volume.Layout()
    finding = storage.Storage(config).check()
    device = finding.facts.get("device")
    if not device:
        return Probe(name, False, f"no volume to check: {finding.detail}")
    try:
        key = _volume_key(layout.mapper)
    except (CommandError, ValueError) as error:
        return Probe(name, False, f"cannot read the volume key: {error}")
    if key is None:
        return Probe(name, True, "the volume key is a logon key in the kernel keyring, "
                     "which no process can read back")
    places = [(Path(device), volume.HEADER_BYTES)]
    places += [(path, path.stat().st_size) for path in _files(KEY_FREE_DIRECTORIES)
               if path != layout.backing_file]
    found = [str(path) for path, limit in places if _contains(path, key, limit)]
    if found:
        return Probe(name, False, "volume key found in " + ", ".join(found))
    return Probe(name, True, f"not in the header of {device} nor in {len(places) - 1} state files")


def run_all(config: NodeConfig) -> List[Probe]:
    """Every probe, in the order an intruder would try them."""
    return [probe_pty(), *probe_units(), probe_keyslots(config), probe_key_on_disk(config)]
