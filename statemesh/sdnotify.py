"""systemd's notify protocol (sd_notify(3)): one datagram to $NOTIFY_SOCKET.

Kept apart from statemesh.systemd so that the watchdog reports readiness without loading the
D-Bus stack: its terminal sources must work even where that stack cannot load.
"""

from __future__ import annotations

import os
import socket

READY = b"READY=1"


def notify(message: bytes) -> bool:
    """Send `message` to systemd; False when not run by systemd (no NOTIFY_SOCKET)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(message, address)
    return True


def ready() -> None:
    """READY=1: what a Type=notify unit's start job waits for."""
    notify(READY)
