"""The verifier's TPM2_MakeCredential, in software and in pure Python.

A verifier seals a secret to a node's EK so that only the TPM that holds that EK and also
an object with the AK's name can recover it (TPM2_ActivateCredential). Done here with
`cryptography` alone, as TPM 2.0 Part 1 ("Credential Protection", "Secret Sharing")
describes it, so a customer's verifier needs no TPM stack. The EK it reads (bytes a node
chose) goes through tpmwire's strict parser, then to `cryptography`'s key loading, which
refuses a point off its curve and a malformed RSA key (ValueError).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from typing import Tuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from statemesh.attest import tpmwire

DIGEST_BYTES = 32  # SHA-256, the only name algorithm the node's EKs use
MAX_SECRET_BYTES = 64  # a TPM2B_DIGEST
CURVES = {tpmwire.ECC_NIST_P256: ec.SECP256R1(), tpmwire.ECC_NIST_P384: ec.SECP384R1()}
IDENTITY_LABEL = b"IDENTITY\x00"


def kdfa(key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """TPM 2.0's KDFa with SHA-256 (SP 800-108 counter mode over HMAC)."""
    output, counter = b"", 1
    while len(output) * 8 < bits:
        block = (struct.pack(">I", counter) + label + b"\x00" + context_u + context_v
                 + struct.pack(">I", bits))
        output += hmac.new(key, block, hashlib.sha256).digest()
        counter += 1
    return output[:bits // 8]


def kdfe(shared: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """TPM 2.0's KDFe with SHA-256 (SP 800-56A's concatenation KDF)."""
    output, counter = b"", 1
    while len(output) * 8 < bits:
        output += hashlib.sha256(struct.pack(">I", counter) + shared + label + b"\x00"
                                 + party_u + party_v).digest()
        counter += 1
    return output[:bits // 8]


def _rsa_seed(ek: tpmwire.Public) -> Tuple[bytes, bytes]:
    """A random seed and its RSA-OAEP encryption to the EK, labelled "IDENTITY"."""
    modulus = int.from_bytes(ek.unique[0], "big")
    key = rsa.RSAPublicNumbers(ek.rsa_exponent or 65537, modulus).public_key()
    seed = secrets.token_bytes(DIGEST_BYTES)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                        label=IDENTITY_LABEL)
    return seed, key.encrypt(seed, oaep)


def _ecc_seed(ek: tpmwire.Public) -> Tuple[bytes, bytes]:
    """A seed agreed by ECDH between a one-time key and the EK; the one-time public point."""
    curve = CURVES.get(ek.curve)
    if curve is None:
        raise ValueError(f"EK curve {ek.curve:#06x} is not supported")
    ek_x, ek_y = ek.unique
    key = ec.EllipticCurvePublicNumbers(
        int.from_bytes(ek_x, "big"), int.from_bytes(ek_y, "big"), curve).public_key()
    one_time = ec.generate_private_key(curve)
    shared = one_time.exchange(ec.ECDH(), key)
    size = (curve.key_size + 7) // 8
    point = one_time.public_key().public_numbers()
    x, y = point.x.to_bytes(size, "big"), point.y.to_bytes(size, "big")
    seed = kdfe(shared, IDENTITY_LABEL[:-1], x, ek_x, DIGEST_BYTES * 8)
    return seed, tpmwire.sized(x) + tpmwire.sized(y)


def seal_credential(ek_public: bytes, ak_name: bytes, secret: bytes) -> Tuple[bytes, bytes]:
    """`secret` sealed to the EK (a TPMT_PUBLIC), usable only by the TPM that also holds
    an object named `ak_name`; returns (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET).
    ValueError for an EK this cannot seal to."""
    ek = tpmwire.parse_public(ek_public)
    if ek.name_alg != tpmwire.ALG_SHA256:
        raise ValueError(f"EK name algorithm {ek.name_alg:#06x} is not SHA-256")
    algorithm, key_bits, mode = ek.symmetric
    if algorithm != tpmwire.ALG_AES or mode != tpmwire.ALG_CFB or key_bits not in (128, 256):
        raise ValueError("the EK's symmetric algorithm is not AES-128 or AES-256 in CFB mode")
    if not ek.has(tpmwire.RESTRICTED | tpmwire.DECRYPT):
        raise ValueError("the EK is not a restricted decryption key")
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"a credential holds at most {MAX_SECRET_BYTES} bytes")
    seed, encrypted = _rsa_seed(ek) if ek.type == tpmwire.ALG_RSA else _ecc_seed(ek)
    symmetric_key = kdfa(seed, b"STORAGE", ak_name, b"", key_bits)
    encryptor = Cipher(algorithms.AES(symmetric_key), modes.CFB(bytes(16))).encryptor()
    identity = encryptor.update(tpmwire.sized(secret)) + encryptor.finalize()
    integrity_key = kdfa(seed, b"INTEGRITY", b"", b"", DIGEST_BYTES * 8)
    integrity = hmac.new(integrity_key, identity + ak_name, hashlib.sha256).digest()
    return tpmwire.sized(tpmwire.sized(integrity) + identity), tpmwire.sized(encrypted)
