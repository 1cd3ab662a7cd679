"""A minimal client of QEMU's machine protocol (QMP), for saving and restoring guests.

The harness needs four things from a running QEMU: stop the guest, stream its state to a
file, load that state into a new QEMU, and know when either has finished. One JSON object
per line each way; asynchronous events are skipped.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any, Dict


class QmpError(RuntimeError):
    """QEMU refused a command, or a migration failed."""


class Qmp:
    """One QMP connection, negotiated and ready for commands."""

    def __init__(self, path: Path, timeout: float = 30):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:  # QEMU creates the socket a moment after it starts
            try:
                self._sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._reader = self._sock.makefile("rb")
        self._line()  # the greeting
        self.execute("qmp_capabilities")

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> "Qmp":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _line(self) -> Dict[str, Any]:
        line = self._reader.readline()
        if not line:
            raise QmpError("QEMU closed its QMP socket")
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        request = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._line()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")

    def wait_migration(self, timeout: float) -> None:
        """Wait until the outgoing or incoming migration has completed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.execute("query-migrate").get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise QmpError(f"migration {status}")
            time.sleep(0.1)
        raise QmpError(f"migration did not complete within {timeout:.0f} s")
