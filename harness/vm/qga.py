"""The hypervisor's side of qemu-guest-agent: what a VM's operator can do through the
agent's virtio port without SSH or a terminal (guest-exec runs anything as root).

One connection per call; each call starts with guest-sync so that a late answer to an
earlier call is never taken for this one. No answer within the timeout means no agent.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence


class _Channel:
    """One connection to the agent's chardev socket, JSON lines each way."""

    def __init__(self, path: Path, deadline: float):
        self.deadline = deadline
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buffer = b""

    def _send(self, command: str, arguments: Dict[str, Any]) -> None:
        self.sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode()
                          + b"\n")

    def call(self, command: str, **arguments: Any) -> Any:
        """Send a command and return its "return" value (None when the agent is silent)."""
        self._send(command, arguments)
        reply = self._reply()
        return None if reply is None else reply.get("return")

    def sync(self) -> bool:
        """Whether the agent answers; skips late answers to earlier calls."""
        token = secrets.randbelow(1 << 31)
        self._send("guest-sync", {"id": token})
        while True:
            reply = self._reply()
            if reply is None:
                return False
            if reply.get("return") == token:
                return True

    def _reply(self) -> Optional[Dict[str, Any]]:
        while b"\n" not in self.buffer:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self.sock.close()


def guest_exec(path: Path, argv: Sequence[str], timeout: float = 30) -> Optional[int]:
    """Run argv in the guest through its agent and return the exit code; None when no agent
    answers within `timeout` seconds."""
    channel = _Channel(path, time.monotonic() + timeout)
    try:
        if not channel.sync():
            return None
        started = channel.call("guest-exec", path=argv[0], arg=list(argv[1:]))
        if not started:
            return None
        while True:
            status = channel.call("guest-exec-status", pid=started["pid"])
            if status is None:
                return None
            if status.get("exited"):
                return int(status.get("exitcode", -1))
            time.sleep(0.2)
    finally:
        channel.close()
