"""Endorsement-key certificate chains, checked link by link.

cryptography 38 (Debian 12) has no X.509 path validation, so this module does it
explicitly: each certificate's signature by the next one, validity periods, CA basic
constraints, key usage and path length, and no critical extension left unexamined. EK
certificates have an empty subject and a critical subjectAltName (TCG EK Credential
Profile), which is accepted; any other unknown critical extension is refused.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtensionOID

from statemesh.attest.refusals import EkChainInvalid, EkUntrusted

MAX_DEPTH = 4
_UNDERSTOOD_CRITICAL = {
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.EXTENDED_KEY_USAGE,
}
_PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_WEAK_HASHES = (hashes.SHA1, hashes.MD5)


def load_anchors(directory: Path) -> List[x509.Certificate]:
    """Every certificate in the PEM (.pem/.crt) files of a CA directory; none if it is absent."""
    anchors: List[x509.Certificate] = []
    if not directory.is_dir():
        return anchors
    for path in sorted(directory.iterdir()):
        if path.suffix not in (".pem", ".crt") or not path.is_file():
            continue
        for block in _PEM_RE.findall(path.read_bytes()):
            try:
                anchors.append(x509.load_pem_x509_certificate(block))
            except ValueError as error:
                raise EkChainInvalid(f"{path}: not a PEM certificate ({error})") from None
    return anchors


def _tlv(der: bytes, offset: int) -> Tuple[int, int, int]:
    """(tag, start of value, end of value) of the DER element at `offset`."""
    if offset + 2 > len(der):
        raise ValueError("truncated DER")
    tag, first = der[offset], der[offset + 1]
    start = offset + 2
    if first < 0x80:
        length = first
    elif 0x81 <= first <= 0x84:
        start += first - 0x80
        length = int.from_bytes(der[offset + 2:start], "big")
    else:
        raise ValueError("unsupported DER length")
    if start + length > len(der):
        raise ValueError("truncated DER")
    return tag, start, start + length


def _strict_frame(der: bytes) -> Optional[str]:
    """What is wrong with the certificate's unsigned frame, or None.

    cryptography 38 checks neither that the outer signatureAlgorithm equals the signed one
    in tbsCertificate (RFC 5280 4.1.1.2) nor that the signature BIT STRING has no unused
    bits, so changes there would yield another encoding that still verifies (bench/fuzz
    found both).
    """
    _tag, body, body_end = _tlv(der, 0)
    _tag, tbs_start, tbs_end = _tlv(der, body)
    _tag, _start, outer_end = _tlv(der, tbs_end)
    tag, bits_start, bits_end = _tlv(der, outer_end)
    if body_end != len(der) or bits_end != body_end:
        return "bytes outside the certificate's three parts"
    if tag != 0x03 or bits_start == bits_end or der[bits_start] != 0:
        return "the signature is not a BIT STRING without unused bits"
    position = tbs_start
    tag, _start, end = _tlv(der, position)
    if tag == 0xA0:  # [0] EXPLICIT version
        position = end
        tag, _start, end = _tlv(der, position)
    position = end  # past serialNumber
    _tag, _start, end = _tlv(der, position)
    if der[position:end] != der[tbs_end:outer_end]:
        return "outer and signed signature algorithms differ"
    return None


def parse(chain: Sequence[bytes]) -> List[x509.Certificate]:
    """DER certificates, EK certificate first; refuses anything unparsable."""
    if not chain:
        raise EkChainInvalid("no EK certificate")
    if len(chain) > MAX_DEPTH:
        raise EkChainInvalid(f"more than {MAX_DEPTH} certificates")
    certificates = []
    for index, der in enumerate(chain):
        try:
            certificate = x509.load_der_x509_certificate(der)
            # cryptography parses lazily: make every part we use raise here, not later.
            certificate.extensions, certificate.subject, certificate.issuer  # noqa: B018
            validity(certificate)
            certificate.public_key()
            problem = _strict_frame(der)
            if problem:
                raise ValueError(problem)
        except Exception as error:  # noqa: BLE001 - cryptography 38 raises KeyError,
            # ValueError or UnsupportedAlgorithm on different malformations of hostile DER
            raise EkChainInvalid(f"certificate {index} is not valid DER X.509 "
                                 f"({type(error).__name__}: {error})") from None
        certificates.append(certificate)
    return certificates


def _extension(certificate: x509.Certificate, oid: x509.ObjectIdentifier) -> Optional[x509.Extension]:
    try:
        return certificate.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None


def _check_extensions(certificate: x509.Certificate, what: str, is_ca: bool) -> None:
    for extension in certificate.extensions:
        if extension.critical and extension.oid not in _UNDERSTOOD_CRITICAL:
            raise EkChainInvalid(f"{what}: unknown critical extension {extension.oid.dotted_string}")
    constraints = _extension(certificate, ExtensionOID.BASIC_CONSTRAINTS)
    usage = _extension(certificate, ExtensionOID.KEY_USAGE)
    if is_ca:
        if constraints is None or not constraints.value.ca:
            raise EkChainInvalid(f"{what}: issues certificates but is not a CA (basicConstraints)")
        if usage is not None and not usage.value.key_cert_sign:
            raise EkChainInvalid(f"{what}: a CA whose key usage excludes keyCertSign")
    elif constraints is not None and constraints.value.ca:
        raise EkChainInvalid(f"{what}: the EK certificate is a CA certificate")
    if not is_ca and not certificate.subject:
        san = _extension(certificate, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        if san is None or not san.critical:
            raise EkChainInvalid(f"{what}: empty subject without a critical subjectAltName")


def utc_now(timestamp: Optional[float] = None) -> datetime.datetime:
    """Now (or `timestamp`) as a naive UTC datetime, the form validity() returns."""
    moment = (datetime.datetime.now(datetime.timezone.utc) if timestamp is None
              else datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc))
    return moment.replace(tzinfo=None)


def validity(certificate: x509.Certificate) -> Tuple[datetime.datetime, datetime.datetime]:
    """(not before, not after) as naive UTC. cryptography 42 (Debian 13) deprecates the naive
    properties for *_utc ones, which 38 (Debian 12) and 3.4 (Ubuntu 22.04) do not have."""
    if hasattr(certificate, "not_valid_before_utc"):
        return (certificate.not_valid_before_utc.replace(tzinfo=None),
                certificate.not_valid_after_utc.replace(tzinfo=None))
    return certificate.not_valid_before, certificate.not_valid_after


def _check_validity(certificate: x509.Certificate, what: str, now: datetime.datetime) -> None:
    not_before, not_after = validity(certificate)
    if not not_before <= now <= not_after:
        raise EkChainInvalid(
            f"{what}: not valid at {now:%Y-%m-%d %H:%M} UTC ({not_before} to {not_after})"
        )


def _signed_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer`'s key made `certificate`'s signature (names checked by the caller)."""
    try:
        algorithm = certificate.signature_hash_algorithm
        key = issuer.public_key()
    except (UnsupportedAlgorithm, ValueError) as error:
        raise EkChainInvalid(f"unsupported signature or key: {error}") from None
    if isinstance(algorithm, _WEAK_HASHES):
        raise EkChainInvalid(f"signature with the broken hash {algorithm.name}")
    try:
        if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(certificate.signature, certificate.tbs_certificate_bytes,
                       padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(certificate.signature, certificate.tbs_certificate_bytes,
                       ec.ECDSA(algorithm))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(certificate.signature, certificate.tbs_certificate_bytes)
        else:
            raise EkChainInvalid(f"unsupported issuer key or signature: {type(key).__name__}")
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        return False
    return True


def _issued(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    return certificate.issuer == issuer.subject and _signed_by(certificate, issuer)


def _check_path_length(issuer: x509.Certificate, cas_below: int, what: str) -> None:
    constraints = _extension(issuer, ExtensionOID.BASIC_CONSTRAINTS)
    limit = constraints.value.path_length if constraints else None
    if limit is not None and cas_below > limit:
        raise EkChainInvalid(f"{what}: path length {cas_below} exceeds its limit {limit}")


def verify(chain: Sequence[bytes], anchors: Sequence[x509.Certificate],
           now: Optional[datetime.datetime] = None) -> x509.Certificate:
    """Check that the EK certificate (chain[0]) chains to one of `anchors`; return it.

    Every certificate given must be a link of the path: each is issued by the next, and
    the last is a trusted anchor or issued by one. EkChainInvalid: a malformed or broken
    chain. EkUntrusted: a sound chain that ends at no trusted anchor.
    """
    now = now or utc_now()
    certificates = parse(chain)
    for index, certificate in enumerate(certificates):
        what = "EK certificate" if index == 0 else f"chain certificate {index}"
        _check_validity(certificate, what, now)
        _check_extensions(certificate, what, is_ca=index > 0)
        if index > 0:
            _check_path_length(certificate, index - 1, what)
        if index + 1 < len(certificates) and not _issued(certificate, certificates[index + 1]):
            raise EkChainInvalid(f"{what} is not signed by the next certificate of the chain")
    last = certificates[-1]
    anchor_ders = {a.public_bytes(serialization.Encoding.DER) for a in anchors}
    if last.public_bytes(serialization.Encoding.DER) in anchor_ders:
        return certificates[0]
    for anchor in anchors:
        if _issued(last, anchor):
            _check_validity(anchor, "trusted CA", now)
            _check_extensions(anchor, "trusted CA", is_ca=True)
            _check_path_length(anchor, len(certificates) - 1, "trusted CA")
            return certificates[0]
    raise EkUntrusted(f"the EK certificate (issuer {last.issuer.rfc4514_string()}) "
                      "does not chain to a trusted TPM CA")


def intermediates_for(ek_certificate: bytes, anchors: Sequence[x509.Certificate]) -> List[bytes]:
    """The DER CA certificates (not self-signed roots) that link an EK certificate upwards.

    A node sends these beside its EK certificate, so that verifiers need only the roots.
    """
    current = x509.load_der_x509_certificate(ek_certificate)
    found: List[bytes] = []
    for _ in range(MAX_DEPTH - 1):
        issuer = next((a for a in anchors if current.issuer == a.subject and a.issuer != a.subject
                       and _signed_by(current, a)), None)
        if issuer is None:
            break
        found.append(issuer.public_bytes(serialization.Encoding.DER))
        current = issuer
    return found
