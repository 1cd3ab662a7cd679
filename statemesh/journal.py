"""The installation journal: every step with the boot id, the install state, the restore record.

Three files in persistent, non-secret state (/var/lib/statemesh-node/, never inside the
ephemeral volume, so that purge can still read them):

- journal.jsonl: one JSON line per step (time, boot id, pid, event, details), appended and
  fsynced, so that what happened before a power loss is still there afterwards;
- state.json: the installation state (installing, installed, failed, giving-back, given-back,
  removing, removed) with the boot id, the pid and the attempt of the transaction, replaced
  atomically;
- restore.json: what each guarantee found before it changed anything. The FIRST value
  remembered for a guarantee is kept, so re-applying never overwrites the operator's
  original state with our own.

"Reboot required": an installation that was interrupted (its process is gone while the
state still says installing, or a step failed) in the current boot leaves the lockdown
half-applied. Nothing may then run or retry until the boot id changes: a reboot resets
every runtime state (units stopped half-way, the ephemeral volume, /run), after which the
installation starts clean. No half-done installation is ever reported as installed. What
the harden unit does at the boot after one is statemesh.install.boot_action's rule.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from statemesh import __version__, proc, safefile

STATE_DIR = Path("/var/lib/statemesh-node")
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")

INSTALLING = "installing"
INSTALLED = "installed"
FAILED = "failed"
GIVING_BACK = "giving-back"
GIVEN_BACK = "given-back"
REMOVING = "removing"
REMOVED = "removed"
NOT_INSTALLED = "not-installed"


class RebootRequiredError(RuntimeError):
    """An installation was interrupted in this boot; only a reboot makes the node clean again."""


class JournalError(RuntimeError):
    """The journal's files cannot be read or written."""


@dataclasses.dataclass(frozen=True)
class InstallState:
    """Where the installation stands, and in which boot by which process it got there."""

    state: str
    boot_id: str = ""
    pid: int = 0
    start_ticks: int = 0
    version: str = ""
    reason: str = ""
    time: float = 0.0
    # 1 for the installation the operator started, 2 for its retry at the next boot.
    attempt: int = 1

    @property
    def installed(self) -> bool:
        return self.state == INSTALLED

    def in_progress(self) -> bool:
        """Whether the process that wrote this state is still running it (same pid, same start)."""
        return (self.boot_id == boot_id() and self.pid > 0
                and proc.start_ticks(self.pid) == self.start_ticks)


def boot_id() -> str:
    """This boot's id: it changes at every boot, so runtime leftovers of an older one do not count."""
    return BOOT_ID_PATH.read_text(encoding="ascii").strip()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: Any) -> None:
    """Replace `path` with JSON data so that a power loss leaves the old or the new file."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def _read_json(path: Path) -> Any:
    """The file's JSON, None when it is not there; JournalError when it cannot be read (a
    FIFO or a device too: root could leave one before installing, never waited on)."""
    try:
        return json.loads(safefile.read_text(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise JournalError(f"{path} cannot be read: {error}") from None


class Journal:
    """The journal of one state directory (the real one, or a test's temporary one)."""

    def __init__(self, directory: Path = STATE_DIR):
        self.directory = Path(directory)
        self.journal_path = self.directory / "journal.jsonl"
        self.state_path = self.directory / "state.json"
        self.restore_path = self.directory / "restore.json"

    def _ensure_dir(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- the contract every guarantee uses ---------------------------------------------------

    def record(self, event: str, **details: Any) -> None:
        """Append one step, durable before this returns."""
        self._ensure_dir()
        entry = {"time": round(time.time(), 3), "boot_id": boot_id(), "pid": os.getpid(),
                 "event": event, **details}
        line = json.dumps(entry, sort_keys=False, default=str) + "\n"
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def end(self) -> int:
        """Where the journal ends now: events(since=end()) are those recorded after."""
        try:
            return self.journal_path.stat().st_size
        except FileNotFoundError:
            return 0

    def events(self, since: int = 0) -> List[Dict[str, Any]]:
        """The events recorded from byte offset `since` on; a line cut short (power lost
        during its write) ends the list. JournalError for a FIFO or a device there."""
        return self._read_events(since)[0]

    def _read_events(self, since: int) -> Tuple[List[Dict[str, Any]], bool]:
        """(the events from `since` on, whether that is every line: no torn one ended it)."""
        try:
            with safefile.open_regular(self.journal_path) as stream:
                stream.seek(since)
                lines = stream.read().decode("utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return [], True
        except safefile.NotRegularFile as error:
            raise JournalError(f"{self.journal_path} cannot be read: {error}") from None
        found = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                return found, False  # only a read starting after a torn line can go on
            if isinstance(event, dict):
                found.append(event)
        return found, True

    def remember(self, guarantee_name: str, data: Dict[str, Any]) -> None:
        """Keep what a guarantee found before changing it; the first value stays."""
        record = self.restore_record()
        if guarantee_name in record:
            return
        record[guarantee_name] = data
        self._ensure_dir()
        write_atomically(self.restore_path, record)
        self.record("remembered", guarantee=guarantee_name)

    # -- restore record ------------------------------------------------------------------------

    def restore_record(self) -> Dict[str, Dict[str, Any]]:
        data = _read_json(self.restore_path)
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise JournalError(f"{self.restore_path} is not a JSON object")
        return data

    def forget_restore_record(self) -> None:
        """Once everything was given back, the record is spent: a reinstall records afresh."""
        self.restore_path.unlink(missing_ok=True)
        self.record("restore-record-spent")

    # -- installation state ----------------------------------------------------------------

    def state(self) -> InstallState:
        data = _read_json(self.state_path)
        if data is None:
            return InstallState(NOT_INSTALLED)
        try:
            return InstallState(**data)
        except TypeError as error:
            raise JournalError(f"{self.state_path} is malformed: {error}") from None

    def set_state(self, state: str, reason: str = "", attempt: int = 1) -> None:
        self._ensure_dir()
        pid = os.getpid()
        current = InstallState(state=state, boot_id=boot_id(), pid=pid,
                               start_ticks=proc.start_ticks(pid) or 0,
                               version=__version__, reason=reason, time=round(time.time(), 3),
                               attempt=attempt)
        write_atomically(self.state_path, dataclasses.asdict(current))
        self.record(f"state-{state}", reason=reason, attempt=attempt)

    def installed_in_this_boot(self) -> bool:
        """Whether an installation (a transaction begun on a node not installed, whose
        installing session kept root meanwhile) ran in this boot: not an upgrade. A torn
        line hides what follows it: then it may have."""
        this_boot, before = boot_id(), None
        events, complete = self._read_events(0)
        if not complete:
            return True
        for event in events:
            name = event.get("event")
            if not (isinstance(name, str) and name.startswith("state-")):
                continue
            if (name == f"state-{INSTALLING}" and before != f"state-{INSTALLED}"
                    and event.get("boot_id") == this_boot):
                return True
            before = name
        return False

    def require_clean_boot(self) -> None:
        """Refuse while an installation interrupted in this boot has left the node half-done."""
        current = self.state()
        if current.state not in (INSTALLING, FAILED) or current.boot_id != boot_id():
            return
        if current.state == INSTALLING and current.in_progress():
            return
        why = current.reason or f"an installation (pid {current.pid}) was interrupted"
        raise RebootRequiredError(
            f"reboot required: {why} in this boot; the node is not installed and StateMesh "
            f"changes nothing on it until the next boot (journal: {self.journal_path})")


def require_clean_boot(directory: Path = STATE_DIR) -> None:
    """Every StateMesh service that changes the machine calls this first (the watchdog
    excepted): see RebootRequiredError. The aTLS endpoint and the state service only report:
    status says a reboot is required, and the endpoint answers "not ready"."""
    Journal(directory).require_clean_boot()

