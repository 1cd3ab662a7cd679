"""The node's attestation evidence and its one canonical byte encoding.

Encoding (version 2), all integers big-endian:

    "SMEV" | version:u8 | field* ,  field = tag:u8 | length:u16 | value[length]

Every field appears exactly once, in increasing tag order; there are no optional, unknown
or repeated fields and nothing may follow the last one. Integers have fixed widths, byte
strings fixed or bounded sizes, text a restricted ASCII alphabet. So each evidence has
exactly one encoding, and the parser accepts only that one (it re-encodes what it decoded
and compares). A length-prefixed TLV was chosen over CBOR or ASN.1 because those allow
several encodings of one value (map order, integer widths, indefinite lengths) that a
strict parser has to hunt down, and because Debian 12 ships no strict CBOR decoder: about
a hundred lines here are easy to audit and to fuzz.

The claims (fields 1-8) are what the TPM signs: the quote's qualifying data is
`claims_digest()`, SHA-256 over a domain tag and the claims' own canonical encoding.
Version 2 added the node's state (field 8): installed or not, the package version, each
check `status` runs with its verdict and detail, the watchdog's exempt units, and when the
checks ran. So a node that is not locked down still answers, but says so under its TPM's
signature, and a verifier refuses it as not ready (statemesh.attest.verifier).

    state = checked:u64 | installed:u8 | version:str8 | count:u8 | check* | count:u8 | unit:str8*
    check = name:str8 | holds:u8 | detail:str16        (strN: an N-bit length, then ASCII)
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import struct
from typing import Callable, Dict, List, Tuple

MAGIC = b"SMEV"
VERSION = 2
MAX_SIZE = 60 * 1024
DOMAIN_TAG = b"statemesh-atls-quote-v2\x00"

CLASSES: Dict[str, int] = {"tpm": 1, "weak": 2}
_CLASS_NAMES = {code: name for name, code in CLASSES.items()}
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
MAX_CHAIN = 4
MAX_CERT = 8 * 1024
MAX_TPM_BLOB = 1024
# The node's state: what status checks, in a bounded, printable form.
CHECK_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_VERSION_RE = re.compile(r"[A-Za-z0-9.+~:-]{0,64}")
_UNIT_RE = re.compile(r"[A-Za-z0-9:_.@\\-]{1,255}")
_DETAIL_RE = re.compile(r"[ -~]{0,400}")
MAX_CHECKS = 32
MAX_EXEMPT_UNITS = 16


class EvidenceFormatError(ValueError):
    """Bytes that are not the canonical encoding of a version-2 evidence."""


@dataclasses.dataclass(frozen=True)
class StateCheck:
    """One line of `status`: what was checked, whether it holds, and why (printable ASCII)."""

    name: str
    holds: bool
    detail: str


@dataclasses.dataclass(frozen=True)
class NodeState:
    """The node's state as `status` saw it at `checked`, signed with the other claims."""

    checked: int  # UNIX time, seconds: when the checks began
    installed: bool
    package_version: str
    checks: Tuple[StateCheck, ...]
    exempt_units: Tuple[str, ...]  # the watchdog spares their terminals

    @property
    def ready(self) -> bool:
        """Installed, and every check (at least one) holds: the only state that serves."""
        return self.installed and bool(self.checks) and all(c.holds for c in self.checks)

    def failing(self) -> List[str]:
        """Why it is not ready, one "name: detail" each."""
        reasons = [] if self.installed else ["not installed"]
        reasons += [f"{c.name}: {c.detail}" for c in self.checks if not c.holds]
        return reasons or ([] if self.checks else ["nothing was checked"])


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What a node presents: claims, the TPM quote over them and what is needed to check it."""

    node_id: str
    zone: str
    security_class: str
    issued: int  # UNIX time, seconds
    nonce: bytes  # the verifier's fresh 32-byte nonce
    tls_spki_sha256: bytes  # SHA-256 of the attester's TLS certificate SubjectPublicKeyInfo
    session_binding: bytes  # the TLS exporter value of this connection
    node_state: NodeState
    ak_public: bytes  # TPMT_PUBLIC of the attestation key
    ek_public: bytes  # TPMT_PUBLIC of the endorsement key
    quote: bytes  # TPMS_ATTEST, exactly as signed
    signature: bytes  # TPMT_SIGNATURE
    pcr_values: Tuple[Tuple[int, bytes], ...]  # (index, SHA-256 value), increasing index
    ek_chain: Tuple[bytes, ...]  # DER certificates, EK certificate first; empty on weak nodes

    def claims_digest(self) -> bytes:
        """The quote's expected qualifying data: binds every claim to this TPM signature."""
        return hashlib.sha256(DOMAIN_TAG + _encode_fields(self, _CLAIMS)).digest()


def _text(value: str) -> bytes:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise EvidenceFormatError(f"not a name of lower-case letters, digits, '.', '-': {value!r}")
    return value.encode("ascii")


def _parse_text(data: bytes) -> str:
    try:
        value = data.decode("ascii")
    except UnicodeDecodeError:
        raise EvidenceFormatError("text field is not ASCII") from None
    _text(value)
    return value


def _size(data: object) -> str:
    return f"{len(data)} bytes" if isinstance(data, bytes) else f"a {type(data).__name__}"


def _fixed(size: int) -> Tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    def check(data: bytes) -> bytes:
        if not isinstance(data, bytes) or len(data) != size:
            raise EvidenceFormatError(f"a field of exactly {size} bytes, not {_size(data)}")
        return data

    return check, check


def _bounded(limit: int) -> Tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    def check(data: bytes) -> bytes:
        if not isinstance(data, bytes) or not 0 < len(data) <= limit:
            raise EvidenceFormatError(f"a field of 1 to {limit} bytes, not {_size(data)}")
        return data

    return check, check


def _encode_class(value: str) -> bytes:
    if value not in CLASSES:
        raise EvidenceFormatError(f"unknown security class {value!r}")
    return bytes([CLASSES[value]])


def _parse_class(data: bytes) -> str:
    if len(data) != 1 or data[0] not in _CLASS_NAMES:
        raise EvidenceFormatError("unknown security class code")
    return _CLASS_NAMES[data[0]]


def _encode_time(value: int) -> bytes:
    if not isinstance(value, int) or not 0 <= value < 2**63:
        raise EvidenceFormatError(f"not a time: {value!r}")
    return struct.pack(">Q", value)


def _parse_time(data: bytes) -> int:
    if len(data) != 8 or data[0] & 0x80:
        raise EvidenceFormatError("time field is not a positive 8-byte integer")
    return int(struct.unpack(">Q", data)[0])


def _encode_pcrs(values: Tuple[Tuple[int, bytes], ...]) -> bytes:
    if not 0 < len(values) <= 24:
        raise EvidenceFormatError("between 1 and 24 PCR values are needed")
    previous = -1
    out = b""
    for index, digest in values:
        if not isinstance(index, int) or not previous < index <= 23:
            raise EvidenceFormatError("PCR indices must increase and stay within 0-23")
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise EvidenceFormatError(f"PCR {index} value is not a SHA-256 digest")
        out += bytes([index]) + digest
        previous = index
    return out


def _parse_pcrs(data: bytes) -> Tuple[Tuple[int, bytes], ...]:
    if len(data) % 33:
        raise EvidenceFormatError("PCR list length is not a multiple of 33")
    values = tuple((data[i], data[i + 1:i + 33]) for i in range(0, len(data), 33))
    _encode_pcrs(values)
    return values


def _encode_chain(chain: Tuple[bytes, ...]) -> bytes:
    if len(chain) > MAX_CHAIN:
        raise EvidenceFormatError(f"more than {MAX_CHAIN} certificates in the EK chain")
    out = b""
    for der in chain:
        if not isinstance(der, bytes) or not 0 < len(der) <= MAX_CERT:
            raise EvidenceFormatError(f"an EK chain certificate is not 1 to {MAX_CERT} bytes")
        out += struct.pack(">H", len(der)) + der
    return out


def _parse_chain(data: bytes) -> Tuple[bytes, ...]:
    chain: List[bytes] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 2:
            raise EvidenceFormatError("truncated EK chain")
        (size,) = struct.unpack(">H", data[offset:offset + 2])
        if size > len(data) - offset - 2:
            raise EvidenceFormatError("truncated EK chain certificate")
        chain.append(data[offset + 2:offset + 2 + size])
        offset += 2 + size
    _encode_chain(tuple(chain))
    return tuple(chain)


def _str(value: str, pattern: "re.Pattern[str]", width: int, what: str) -> bytes:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise EvidenceFormatError(f"{what} is not {pattern.pattern}: {value!r}")
    return struct.pack(">B" if width == 8 else ">H", len(value)) + value.encode("ascii")


def _flag(value: bool) -> bytes:
    if not isinstance(value, bool):
        raise EvidenceFormatError(f"not a flag: {value!r}")
    return bytes([value])


def _encode_state(state: NodeState) -> bytes:
    if not isinstance(state, NodeState):
        raise EvidenceFormatError("the node state is missing")
    if len(state.checks) > MAX_CHECKS or len(state.exempt_units) > MAX_EXEMPT_UNITS:
        raise EvidenceFormatError(f"more than {MAX_CHECKS} checks or {MAX_EXEMPT_UNITS} "
                                  "exempt units in the node state")
    out = _encode_time(state.checked) + _flag(state.installed)
    out += _str(state.package_version, _VERSION_RE, 8, "package version")
    out += bytes([len(state.checks)])
    for check in state.checks:
        if not isinstance(check, StateCheck):
            raise EvidenceFormatError("a node state check is not a StateCheck")
        out += (_str(check.name, CHECK_NAME_RE, 8, "check name") + _flag(check.holds)
                + _str(check.detail, _DETAIL_RE, 16, "check detail"))
    out += bytes([len(state.exempt_units)])
    for unit in state.exempt_units:
        out += _str(unit, _UNIT_RE, 8, "exempt unit")
    return out


def check_state(state: NodeState) -> NodeState:
    """The state as it is, if the evidence can carry it; EvidenceFormatError otherwise."""
    _encode_state(state)
    return state


class _Reader:
    """Reads the node state's parts in order; every shortfall is a format error."""

    def __init__(self, data: bytes):
        self.data, self.offset = data, 0

    def take(self, size: int) -> bytes:
        if size > len(self.data) - self.offset:
            raise EvidenceFormatError("truncated node state")
        self.offset += size
        return self.data[self.offset - size:self.offset]

    def number(self, width: int) -> int:
        return int.from_bytes(self.take(width // 8), "big")

    def text(self, width: int) -> str:
        try:
            return self.take(self.number(width)).decode("ascii")
        except UnicodeDecodeError:
            raise EvidenceFormatError("node state text is not ASCII") from None

    def flag(self) -> bool:
        value = self.number(8)
        if value > 1:
            raise EvidenceFormatError("node state flag is neither 0 nor 1")
        return value == 1


def _parse_state(data: bytes) -> NodeState:
    reader = _Reader(data)
    checked, installed = _parse_time(reader.take(8)), reader.flag()
    version = reader.text(8)
    checks = tuple(StateCheck(reader.text(8), reader.flag(), reader.text(16))
                   for _ in range(reader.number(8)))
    units = tuple(reader.text(8) for _ in range(reader.number(8)))
    if reader.offset != len(data):
        raise EvidenceFormatError("bytes after the node state")
    state = NodeState(checked, installed, version, checks, units)
    _encode_state(state)  # every value within the format
    return state


Codec = Tuple[Callable, Callable]
# tag -> (field, (encode, parse)); tags 1-8 are the claims signed through the quote.
_FIELDS: Dict[int, Tuple[str, Codec]] = {
    1: ("node_id", (_text, _parse_text)),
    2: ("zone", (_text, _parse_text)),
    3: ("security_class", (_encode_class, _parse_class)),
    4: ("issued", (_encode_time, _parse_time)),
    5: ("nonce", _fixed(32)),
    6: ("tls_spki_sha256", _fixed(32)),
    7: ("session_binding", _fixed(32)),
    8: ("node_state", (_encode_state, _parse_state)),
    9: ("ak_public", _bounded(MAX_TPM_BLOB)),
    10: ("ek_public", _bounded(MAX_TPM_BLOB)),
    11: ("quote", _bounded(MAX_TPM_BLOB)),
    12: ("signature", _bounded(MAX_TPM_BLOB)),
    13: ("pcr_values", (_encode_pcrs, _parse_pcrs)),
    14: ("ek_chain", (_encode_chain, _parse_chain)),
}
_CLAIMS = tuple(range(1, 9))


def _encode_fields(evidence: Evidence, tags: Tuple[int, ...]) -> bytes:
    out = b""
    for tag in tags:
        name, (encode, _parse) = _FIELDS[tag]
        value = encode(getattr(evidence, name))
        out += struct.pack(">BH", tag, len(value)) + value
    return out


def encode(evidence: Evidence) -> bytes:
    """The canonical encoding; raises EvidenceFormatError for values outside the format."""
    data = MAGIC + bytes([VERSION]) + _encode_fields(evidence, tuple(_FIELDS))
    if len(data) > MAX_SIZE:
        raise EvidenceFormatError(f"evidence of {len(data)} bytes exceeds {MAX_SIZE}")
    return data


def decode(data: bytes) -> Evidence:
    """Parse the canonical encoding, refusing any deviation from it."""
    if not isinstance(data, bytes):
        raise EvidenceFormatError("evidence must be bytes")
    if len(data) > MAX_SIZE:
        raise EvidenceFormatError(f"evidence of {len(data)} bytes exceeds {MAX_SIZE}")
    if data[:4] != MAGIC:
        raise EvidenceFormatError("not StateMesh evidence (bad magic)")
    if len(data) < 5 or data[4] != VERSION:
        raise EvidenceFormatError(f"unsupported evidence version (this parser reads {VERSION})")
    values: Dict[str, object] = {}
    offset = 5
    for tag, (name, (_encode, parse)) in _FIELDS.items():
        if len(data) - offset < 3:
            raise EvidenceFormatError(f"truncated before field {tag} ({name})")
        found, size = struct.unpack(">BH", data[offset:offset + 3])
        if found != tag:
            raise EvidenceFormatError(f"field {found} where field {tag} ({name}) belongs")
        if size > len(data) - offset - 3:
            raise EvidenceFormatError(f"field {tag} ({name}) is truncated")
        values[name] = parse(data[offset + 3:offset + 3 + size])
        offset += 3 + size
    if offset != len(data):
        raise EvidenceFormatError(f"{len(data) - offset} bytes after the last field")
    evidence = Evidence(**values)  # type: ignore[arg-type]
    if encode(evidence) != data:
        raise EvidenceFormatError("not the canonical encoding")
    return evidence
