"""The kernel's audit feature that makes a loginuid permanent: asked and set over netlink.

pam_loginuid gives every login a loginuid, which its processes inherit; systemd's services
have none. The watchdog exempts an exempt unit's processes only if they have none, so a
login's shell written into that unit's cgroup.procs is still a login's. That holds only if
root cannot take the loginuid off again: the audit feature "loginuid_immutable", set and
locked, refuses every change of a loginuid once set, to root too, until the next boot
(what `auditctl --loginuid-immutable` does; no audit daemon is needed). Asking needs
CAP_AUDIT_CONTROL, as setting does.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import struct
from typing import Tuple

NETLINK_AUDIT = 9
AUDIT_SET_FEATURE = 1018
AUDIT_GET_FEATURE = 1019
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
AUDIT_FEATURE_VERSION = 1
LOGINUID_IMMUTABLE = 1 << 1  # AUDIT_FEATURE_LOGINUID_IMMUTABLE (bit 1)
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_FEATURES = struct.Struct("=IIII")  # struct audit_features: vers, mask, features, lock
TIMEOUT_SECONDS = 5.0


class AuditError(OSError):
    """The kernel's audit interface refused or is not there (audit=0, a container)."""


@dataclasses.dataclass(frozen=True)
class LoginuidImmutable:
    """Whether loginuids are immutable now, and whether that is locked until the next boot."""

    enabled: bool
    locked: bool

    @property
    def holds(self) -> bool:
        return self.enabled and self.locked


def _request(kind: int, payload: bytes, sequence: int) -> bytes:
    flags = NLM_F_REQUEST | NLM_F_ACK
    return _HEADER.pack(_HEADER.size + len(payload), kind, flags, sequence, 0) + payload


def _exchange(kind: int, payload: bytes) -> Tuple[int, bytes]:
    """Send one request; the first answer that is not an acknowledgement: (type, payload)."""
    try:
        channel = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_AUDIT)
    except OSError as error:
        raise AuditError(error.errno, f"no kernel audit interface: {error.strerror}") from None
    with channel:
        try:
            return _answer(channel, kind, payload)
        except socket.timeout:
            raise AuditError(errno.ETIMEDOUT,
                             "the kernel's audit interface did not answer") from None
        except AuditError:
            raise
        except OSError as error:
            raise AuditError(error.errno, f"kernel audit interface: {error.strerror}") from None


def _answer(channel: socket.socket, kind: int, payload: bytes) -> Tuple[int, bytes]:
    """The kernel acknowledges a request (NLMSG_ERROR with 0) before a GET's answer."""
    channel.settimeout(TIMEOUT_SECONDS)
    channel.bind((0, 0))
    sequence = os.getpid() & 0xFFFF
    channel.sendto(_request(kind, payload, sequence), (0, 0))
    while True:
        data = channel.recv(65536)
        length, answer, _flags, _sequence, _port = _HEADER.unpack_from(data)
        body = data[_HEADER.size:length]
        if answer != NLMSG_ERROR:
            return answer, body
        code = struct.unpack_from("=i", body)[0]
        if code < 0:
            raise AuditError(-code, f"audit request {kind}: {os.strerror(-code)}")
        if kind == AUDIT_SET_FEATURE:
            return answer, b""


def loginuid_immutable() -> LoginuidImmutable:
    """The kernel's loginuid_immutable feature, as it stands."""
    empty = _FEATURES.pack(AUDIT_FEATURE_VERSION, 0, 0, 0)
    kind, body = _exchange(AUDIT_GET_FEATURE, empty)
    if kind != AUDIT_GET_FEATURE or len(body) < _FEATURES.size:
        raise AuditError(errno.EPROTO, f"unexpected audit answer of type {kind}")
    _version, _mask, features, lock = _FEATURES.unpack_from(body)
    return LoginuidImmutable(bool(features & LOGINUID_IMMUTABLE), bool(lock & LOGINUID_IMMUTABLE))


def make_loginuid_immutable() -> None:
    """Set loginuid_immutable and lock it: nothing undoes it before the next boot."""
    request = _FEATURES.pack(AUDIT_FEATURE_VERSION, LOGINUID_IMMUTABLE, LOGINUID_IMMUTABLE,
                             LOGINUID_IMMUTABLE)
    _exchange(AUDIT_SET_FEATURE, request)
