"""Strict pure-Python parsers for the few TPM 2.0 structures a verifier must read.

The verifier reads bytes an attacker chose (TPMS_ATTEST, the AK's TPMT_PUBLIC, a
TPMT_SIGNATURE). Parsing them here, in small bounded steps that reject trailing bytes and
unknown algorithms, keeps untrusted input away from C unmarshalling code and lets a customer
run the verifier without a TPM stack. Field layouts follow TPM 2.0 Part 2 (Structures).
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from typing import Dict, List, Tuple

# TPM_ALG_ID values (Part 2, table 9) the product meets.
ALG_RSA = 0x0001
ALG_SHA1 = 0x0004
ALG_AES = 0x0006
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_NULL = 0x0010
ALG_RSASSA = 0x0014
ALG_RSAPSS = 0x0016
ALG_ECDSA = 0x0018
ALG_ECC = 0x0023
ALG_CFB = 0x0043

HASH_SIZES: Dict[int, int] = {ALG_SHA1: 20, ALG_SHA256: 32, ALG_SHA384: 48, ALG_SHA512: 64}
ECC_NIST_P256 = 0x0003
ECC_NIST_P384 = 0x0004

# TPMA_OBJECT bits (Part 2, table 31).
FIXED_TPM = 1 << 1
FIXED_PARENT = 1 << 4
SENSITIVE_DATA_ORIGIN = 1 << 5
USER_WITH_AUTH = 1 << 6
ADMIN_WITH_POLICY = 1 << 7
RESTRICTED = 1 << 16
DECRYPT = 1 << 17
SIGN = 1 << 18

TPM_GENERATED = 0xFF544347
RH_ENDORSEMENT = 0x4000000B
ST_ATTEST_QUOTE = 0x8018

MAX_PCR_SELECT = 4  # 32 PCRs at most in any real TPM


def sized(data: bytes) -> bytes:
    """A TPM2B as written: a u16 size, then the bytes (the reverse of Reader.sized)."""
    return struct.pack(">H", len(data)) + data


class TpmWireError(ValueError):
    """Bytes that are not a well-formed instance of the expected TPM structure."""


class Reader:
    """Big-endian cursor over bytes that refuses to read past the end."""

    def __init__(self, data: bytes, what: str):
        self.data = data
        self.offset = 0
        self.what = what

    def take(self, size: int) -> bytes:
        if size > len(self.data) - self.offset:
            raise TpmWireError(f"{self.what}: truncated at byte {self.offset}")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def sized(self, limit: int) -> bytes:
        """A TPM2B: a u16 size then that many bytes, at most `limit`."""
        size = self.u16()
        if size > limit:
            raise TpmWireError(f"{self.what}: a {size}-byte field exceeds its {limit}-byte limit")
        return self.take(size)

    def rest(self) -> bytes:
        """Everything not read yet."""
        return self.take(len(self.data) - self.offset)

    def end(self) -> None:
        if self.offset != len(self.data):
            raise TpmWireError(f"{self.what}: {len(self.data) - self.offset} trailing bytes")


@dataclasses.dataclass(frozen=True)
class PcrSelection:
    """One bank of a TPML_PCR_SELECTION: the hash algorithm and the selected indices."""

    hash_alg: int
    indices: Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Quote:
    """A TPMS_ATTEST of type ATTEST_QUOTE; `raw` is exactly the bytes the AK signed."""

    raw: bytes
    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    firmware_version: int
    pcr_select: Tuple[PcrSelection, ...]
    pcr_digest: bytes


def parse_pcr_selection(reader: Reader) -> Tuple[PcrSelection, ...]:
    count = reader.u32()
    if count > 8:
        raise TpmWireError(f"{reader.what}: {count} PCR banks selected")
    banks: List[PcrSelection] = []
    for _ in range(count):
        hash_alg = reader.u16()
        size = reader.u8()
        if size > MAX_PCR_SELECT:
            raise TpmWireError(f"{reader.what}: PCR select of {size} bytes")
        bitmap = reader.take(size)
        indices = tuple(
            byte * 8 + bit for byte in range(size) for bit in range(8) if bitmap[byte] >> bit & 1
        )
        banks.append(PcrSelection(hash_alg, indices))
    return tuple(banks)


def parse_attest(data: bytes) -> Quote:
    """Parse a TPMS_ATTEST; only the quote variant is understood, anything else is refused."""
    reader = Reader(data, "TPMS_ATTEST")
    magic = reader.u32()
    attest_type = reader.u16()
    qualified_signer = reader.sized(2 + 64)
    extra_data = reader.sized(64)
    clock, reset_count, restart_count = reader.u64(), reader.u32(), reader.u32()
    reader.u8()  # clockInfo.safe
    firmware_version = reader.u64()
    if attest_type != ST_ATTEST_QUOTE:
        raise TpmWireError(f"TPMS_ATTEST: type {attest_type:#06x} is not ATTEST_QUOTE")
    pcr_select = parse_pcr_selection(reader)
    pcr_digest = reader.sized(64)
    reader.end()
    return Quote(data, magic, attest_type, qualified_signer, extra_data, clock, reset_count,
                 restart_count, firmware_version, pcr_select, pcr_digest)


@dataclasses.dataclass(frozen=True)
class Public:
    """A TPMT_PUBLIC of an RSA or ECC key; `raw` is what the object's name hashes."""

    raw: bytes
    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    symmetric: Tuple[int, int, int]  # (algorithm, key bits, mode); (ALG_NULL, 0, 0) when none
    scheme: Tuple[int, int]  # (scheme, hash); (ALG_NULL, 0) when none
    curve: int  # ECC only
    rsa_bits: int  # RSA only
    rsa_exponent: int  # RSA only; 0 means 65537
    unique: Tuple[bytes, ...]  # ECC: (x, y); RSA: (modulus,)

    def name(self) -> bytes:
        """The object's TPM name: nameAlg then the digest of the public area."""
        if self.name_alg != ALG_SHA256:
            raise TpmWireError(f"TPMT_PUBLIC: name algorithm {self.name_alg:#06x} is not SHA-256")
        return struct.pack(">H", self.name_alg) + hashlib.sha256(self.raw).digest()

    def qualified_name(self, hierarchy: int = RH_ENDORSEMENT) -> bytes:
        """The qualified name of this key as a primary key of `hierarchy`: what the TPM
        writes, signed, as qualifiedSigner in every TPMS_ATTEST the key makes."""
        digest = hashlib.sha256(struct.pack(">I", hierarchy) + self.name()).digest()
        return struct.pack(">H", ALG_SHA256) + digest

    def has(self, attributes: int) -> bool:
        return self.attributes & attributes == attributes


def _scheme(reader: Reader) -> Tuple[int, int]:
    scheme = reader.u16()
    if scheme == ALG_NULL:
        return (scheme, 0)
    if scheme not in (ALG_ECDSA, ALG_RSASSA, ALG_RSAPSS, 0x0017, 0x0019):  # +OAEP, ECDH
        raise TpmWireError(f"{reader.what}: unsupported scheme {scheme:#06x}")
    return (scheme, reader.u16())


def parse_public(data: bytes) -> Public:
    """Parse a TPMT_PUBLIC of type RSA or ECC, refusing any other object type."""
    reader = Reader(data, "TPMT_PUBLIC")
    key_type, name_alg, attributes = reader.u16(), reader.u16(), reader.u32()
    auth_policy = reader.sized(64)
    sym_alg = reader.u16()
    symmetric = (sym_alg, 0, 0) if sym_alg == ALG_NULL else (sym_alg, reader.u16(), reader.u16())
    scheme = _scheme(reader)
    curve = rsa_bits = exponent = 0
    if key_type == ALG_ECC:
        curve = reader.u16()
        kdf = reader.u16()
        if kdf != ALG_NULL:
            raise TpmWireError("TPMT_PUBLIC: an ECC key with a KDF is not supported")
        unique: Tuple[bytes, ...] = (reader.sized(66), reader.sized(66))
    elif key_type == ALG_RSA:
        rsa_bits, exponent = reader.u16(), reader.u32()
        unique = (reader.sized(512),)
    else:
        raise TpmWireError(f"TPMT_PUBLIC: key type {key_type:#06x} is neither RSA nor ECC")
    reader.end()
    return Public(data, key_type, name_alg, attributes, auth_policy, symmetric, scheme, curve,
                  rsa_bits, exponent, unique)


@dataclasses.dataclass(frozen=True)
class Signature:
    """A TPMT_SIGNATURE: ECDSA carries (r, s), RSASSA/RSAPSS carries (signature,)."""

    alg: int
    hash_alg: int
    values: Tuple[bytes, ...]


def parse_signature(data: bytes) -> Signature:
    """Parse a TPMT_SIGNATURE made by ECDSA, RSASSA or RSAPSS."""
    reader = Reader(data, "TPMT_SIGNATURE")
    alg, hash_alg = reader.u16(), reader.u16()
    if alg == ALG_ECDSA:
        values: Tuple[bytes, ...] = (reader.sized(66), reader.sized(66))
    elif alg in (ALG_RSASSA, ALG_RSAPSS):
        values = (reader.sized(512),)
    else:
        raise TpmWireError(f"TPMT_SIGNATURE: algorithm {alg:#06x} is not ECDSA, RSASSA or RSAPSS")
    reader.end()
    return Signature(alg, hash_alg, values)
