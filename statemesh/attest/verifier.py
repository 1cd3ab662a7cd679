"""Checking a node's evidence against a customer's policy.

Stricter than the aTLS verifiers this design learned from (Constellation, Keylime, RA-TLS):
- the quote must be bound to this verifier's fresh nonce, to the TLS key the peer proved it
  holds and to this TLS session (exporter), so neither replay nor relay works;
- the AK must be restricted+sign+fixedTPM+fixedParent, the quote of magic TPM_GENERATED and
  type ATTEST_QUOTE, the PCRs those of the *signed* pcrSelect, SHA-256 only, the digest
  recomputed; every comparison of secrets or digests is constant-time;
- the AK is trusted only after it proved by credential activation that it lives in the TPM
  of the EK whose certificate chains to a trusted CA (see `challenge`/`confirm`).
A policy that allows nothing refuses everything: there is no default-open path.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from statemesh.attest import ekchain, evidence, nodestate, tpmwire
from statemesh.attest.credential import seal_credential
from statemesh.attest.refusals import (
    AkAttributesRefused, AkNotBound, ClaimsNotSigned, ClassRefused, EkChainInvalid,
    MalformedEvidence, NodeNotReady, NonceMismatch, PcrBankRefused, PcrDigestMismatch,
    PcrPolicyViolation, QuoteInvalid, SessionMismatch, SignatureInvalid, StaleEvidence,
    StaleNodeState, TlsKeyMismatch, ZoneRefused,
)
from statemesh.attest.evidence import Evidence

AK_REQUIRED = tpmwire.RESTRICTED | tpmwire.SIGN | tpmwire.FIXED_TPM | tpmwire.FIXED_PARENT
# The TCG EK Credential Profile's default (low range) EK templates, RSA 2048 and ECC P-256:
# the EK certificate certifies a key made from exactly this template, and nothing else is
# accepted as the EK (its attributes, policy and symmetric scheme are what MakeCredential uses).
EK_ATTRIBUTES = (tpmwire.FIXED_TPM | tpmwire.FIXED_PARENT | tpmwire.SENSITIVE_DATA_ORIGIN
                 | tpmwire.ADMIN_WITH_POLICY | tpmwire.RESTRICTED | tpmwire.DECRYPT)
EK_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
_SIGNATURE_HASHES = {
    tpmwire.ALG_SHA256: hashes.SHA256, tpmwire.ALG_SHA384: hashes.SHA384,
    tpmwire.ALG_SHA512: hashes.SHA512,
}
_CURVES = {tpmwire.ECC_NIST_P256: ec.SECP256R1, tpmwire.ECC_NIST_P384: ec.SECP384R1}
DEFAULT_MAX_AGE = 300
# How long before signing the node's state may have been checked (the node re-checks every
# 30 s: statemesh.attest.nodestate).
DEFAULT_MAX_STATE_AGE = 120


class PolicyError(ValueError):
    """A policy file that is missing, malformed or allows nothing (fail closed)."""


@dataclasses.dataclass(frozen=True)
class PcrExpectation:
    value: bytes
    enforce: bool  # False: a mismatch is reported as a warning only


@dataclasses.dataclass(frozen=True)
class Policy:
    """What a verifier accepts. zones=None accepts every zone (written "*" in the file).
    require_ready=False accepts a node that says it is not installed or that a check fails,
    with a warning (a customer inspecting a node, never one sending it work). Each of
    required_checks must be among the node's checks (default: every line of this version's
    status); a missing one counts as failing."""

    allowed_classes: FrozenSet[str]
    zones: Optional[FrozenSet[str]]
    ek_ca_dir: Path
    max_age: int = DEFAULT_MAX_AGE
    pcrs: Dict[int, PcrExpectation] = dataclasses.field(default_factory=dict)
    require_ready: bool = True
    max_state_age: int = DEFAULT_MAX_STATE_AGE
    required_checks: FrozenSet[str] = frozenset(nodestate.STATUS_CHECKS)


_POLICY_KEYS = {"allowed_classes", "zones", "ek_ca_dir", "max_age_seconds", "pcrs",
                "require_ready", "max_state_age_seconds", "required_checks"}
# What GRUB extends with its tpm module (Debian's and Ubuntu's signed GRUB, booted by UEFI
# with a TPM): PCR 8 each command it runs, the kernel command line among them (so
# init=/bin/sh shows), and PCR 9 each file it reads (kernel, initrd). All zero: nothing
# extended it in this boot, so nothing covers what the kernel was told (a hypervisor's
# direct kernel boot, as in this project's test guests, or a unified kernel image, which
# systemd-stub measures into PCRs 11-13). Not zero proves nothing by itself: root may
# extend these PCRs too. Only pinned values, with the firmware's and the loader's (PCRs 4
# and 7), say which command line was booted.
BOOT_LOADER_PCRS = {8: "the kernel command line and GRUB's commands",
                    9: "the kernel and initrd GRUB read"}
NEVER_EXTENDED = bytes(32)


def _seconds(raw: Dict[str, Any], key: str, default: int, source: str) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 86400:
        raise PolicyError(f"{source}: {key} must be an integer from 1 to 86400")
    return value


def _policy_pcrs(raw: Any) -> Dict[int, PcrExpectation]:
    if not isinstance(raw, dict):
        raise PolicyError("pcrs: must be an object mapping PCR index to {sha256, mode}")
    pcrs: Dict[int, PcrExpectation] = {}
    for index, spec in raw.items():
        if not (isinstance(index, str) and index.isdigit() and 0 <= int(index) <= 23):
            raise PolicyError(f"pcrs: {index!r} is not a PCR index 0-23")
        if not isinstance(spec, dict) or set(spec) - {"sha256", "mode"} or "sha256" not in spec:
            raise PolicyError(f"pcrs.{index}: needs exactly 'sha256' and optionally 'mode'")
        mode = spec.get("mode", "enforce")
        if mode not in ("enforce", "warn"):
            raise PolicyError(f"pcrs.{index}.mode: {mode!r} is neither 'enforce' nor 'warn'")
        try:
            value = bytes.fromhex(spec["sha256"])
        except (TypeError, ValueError):
            value = b""
        if len(value) != 32:
            raise PolicyError(f"pcrs.{index}.sha256: not 64 hexadecimal digits")
        pcrs[int(index)] = PcrExpectation(value, mode == "enforce")
    return pcrs


def parse_policy(raw: Any, source: str = "policy") -> Policy:
    """Validate a decoded policy document; an empty or allow-nothing policy is an error."""
    if not isinstance(raw, dict) or not raw:
        raise PolicyError(f"{source}: an empty policy accepts nothing; refusing to use it")
    unknown = set(raw) - _POLICY_KEYS
    if unknown:
        raise PolicyError(f"{source}: unknown keys {sorted(unknown)} (known: {sorted(_POLICY_KEYS)})")
    classes = raw.get("allowed_classes")
    if not isinstance(classes, list) or not classes or set(classes) - set(evidence.CLASSES):
        raise PolicyError(f"{source}: allowed_classes must list one or more of tpm, weak")
    zones = raw.get("zones")
    if zones != "*" and (not isinstance(zones, list) or not zones
                         or not all(isinstance(z, str) and z for z in zones)):
        raise PolicyError(f"{source}: zones must be a non-empty list of zone names, or \"*\"")
    ca_dir = raw.get("ek_ca_dir", "/etc/statemesh/tpm-ca.d")
    if not isinstance(ca_dir, str) or not ca_dir.startswith("/"):
        raise PolicyError(f"{source}: ek_ca_dir must be an absolute path")
    max_age = _seconds(raw, "max_age_seconds", DEFAULT_MAX_AGE, source)
    max_state_age = _seconds(raw, "max_state_age_seconds", DEFAULT_MAX_STATE_AGE, source)
    require_ready = raw.get("require_ready", True)
    if not isinstance(require_ready, bool):
        raise PolicyError(f"{source}: require_ready must be true or false")
    return Policy(frozenset(classes), None if zones == "*" else frozenset(zones), Path(ca_dir),
                  max_age, _policy_pcrs(raw.get("pcrs", {})), require_ready, max_state_age,
                  _required_checks(raw, source))


def _required_checks(raw: Dict[str, Any], source: str) -> FrozenSet[str]:
    """The policy's list of check names, or every line of this version's status."""
    names = raw.get("required_checks", list(nodestate.STATUS_CHECKS))
    if not isinstance(names, list) or not all(
            isinstance(n, str) and evidence.CHECK_NAME_RE.fullmatch(n) for n in names):
        raise PolicyError(f"{source}: required_checks must be a list of check names "
                          f"(status's: {', '.join(nodestate.STATUS_CHECKS)})")
    return frozenset(names)


def load_policy(path: Path) -> Policy:
    """Read a JSON policy file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise PolicyError(f"{path}: cannot be read: {error.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PolicyError(f"{path}: not JSON ({error})") from None
    return parse_policy(raw, str(path))


@dataclasses.dataclass(frozen=True)
class Expected:
    """What the verifier itself knows of this connection; the evidence must match it."""

    nonce: bytes
    tls_spki_sha256: bytes
    session_binding: bytes


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Evidence that passed every check (activation is confirmed separately)."""

    evidence: Evidence
    warnings: Tuple[str, ...]
    # Checks the policy requires that the node's state does not carry (an inspecting policy
    # accepts it): such a node is not ready, whatever its own state says.
    unchecked: Tuple[str, ...] = ()

    def as_dict(self) -> Dict[str, Any]:
        ev = self.evidence
        state = ev.node_state
        return {
            "node_id": ev.node_id, "zone": ev.zone, "class": ev.security_class,
            "issued": ev.issued, "pcrs": {str(i): v.hex() for i, v in ev.pcr_values},
            "state": {"ready": state.ready and not self.unchecked,
                      "unchecked": list(self.unchecked), "installed": state.installed,
                      "package_version": state.package_version, "checked": state.checked,
                      "checks": [dataclasses.asdict(c) for c in state.checks],
                      "exempt_units": list(state.exempt_units)},
            "warnings": list(self.warnings),
        }


@dataclasses.dataclass(frozen=True)
class Challenge:
    """A MakeCredential challenge for one AK; `secret` never leaves the verifier."""

    blob: bytes
    encrypted_secret: bytes
    secret: bytes
    key: Tuple[bytes, bytes]


def _public_key(public: tpmwire.Public) -> Any:
    """The cryptography public key of an RSA or ECC TPMT_PUBLIC."""
    if public.type == tpmwire.ALG_ECC:
        if public.curve not in _CURVES:
            raise MalformedEvidence(f"unsupported ECC curve {public.curve:#06x}")
        x, y = (int.from_bytes(c, "big") for c in public.unique)
        try:
            return ec.EllipticCurvePublicNumbers(x, y, _CURVES[public.curve]()).public_key()
        except ValueError:
            raise MalformedEvidence("ECC public point is not on its curve") from None
    if public.rsa_bits < 2048:
        raise MalformedEvidence(f"RSA key of {public.rsa_bits} bits")
    exponent = public.rsa_exponent or 65537
    try:
        return rsa.RSAPublicNumbers(exponent, int.from_bytes(public.unique[0], "big")).public_key()
    except ValueError:
        raise MalformedEvidence("RSA public key is invalid") from None


def _check_signature(ak: tpmwire.Public, signature: tpmwire.Signature, signed: bytes) -> None:
    if signature.hash_alg not in _SIGNATURE_HASHES:
        raise SignatureInvalid(f"signature hash {signature.hash_alg:#06x} is not SHA-256/384/512")
    algorithm = _SIGNATURE_HASHES[signature.hash_alg]()
    key = _public_key(ak)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey) and signature.alg == tpmwire.ALG_ECDSA:
            r, s = (int.from_bytes(v, "big") for v in signature.values)
            key.verify(encode_dss_signature(r, s), signed, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey) and signature.alg == tpmwire.ALG_RSASSA:
            key.verify(signature.values[0], signed, padding.PKCS1v15(), algorithm)
        elif isinstance(key, rsa.RSAPublicKey) and signature.alg == tpmwire.ALG_RSAPSS:
            key.verify(signature.values[0], signed,
                       padding.PSS(padding.MGF1(algorithm), padding.PSS.AUTO), algorithm)
        else:
            raise SignatureInvalid("signature algorithm does not match the AK's key type")
    except InvalidSignature:
        raise SignatureInvalid("the quote's signature does not verify with the AK") from None


def _same_key(public: tpmwire.Public, certificate_key: Any) -> bool:
    key = _public_key(public)
    if isinstance(key, rsa.RSAPublicKey) and isinstance(certificate_key, rsa.RSAPublicKey):
        return key.public_numbers() == certificate_key.public_numbers()
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(certificate_key, ec.EllipticCurvePublicKey):
        return key.public_numbers() == certificate_key.public_numbers()
    return False


def _is_default_ek(ek: tpmwire.Public) -> bool:
    shape = (ek.name_alg, ek.attributes, ek.auth_policy, ek.symmetric, ek.scheme)
    if shape != (tpmwire.ALG_SHA256, EK_ATTRIBUTES, EK_POLICY,
                 (tpmwire.ALG_AES, 128, tpmwire.ALG_CFB), (tpmwire.ALG_NULL, 0)):
        return False
    if ek.type == tpmwire.ALG_RSA:
        return ek.rsa_bits == 2048 and ek.rsa_exponent == 0 and len(ek.unique[0]) == 256
    return ek.curve == tpmwire.ECC_NIST_P256 and all(len(c) == 32 for c in ek.unique)


def _parse(data: bytes) -> Tuple[Evidence, tpmwire.Public, tpmwire.Public, tpmwire.Signature]:
    try:
        ev = evidence.decode(data)
        ak = tpmwire.parse_public(ev.ak_public)
        ek = tpmwire.parse_public(ev.ek_public)
        signature = tpmwire.parse_signature(ev.signature)
    except ValueError as error:
        raise MalformedEvidence(str(error)) from None
    return ev, ak, ek, signature


class Verifier:
    """Checks evidence under one policy; remembers AKs that passed credential activation."""

    def __init__(self, policy: Policy, clock: Callable[[], float] = time.time,
                 anchors: Optional[Sequence[x509.Certificate]] = None):
        """`anchors`: policy.ek_ca_dir's certificates when the caller has loaded them already."""
        self.policy = policy
        self.clock = clock
        self.anchors = list(anchors) if anchors is not None else ekchain.load_anchors(policy.ek_ca_dir)
        self._bound: Set[Tuple[bytes, bytes]] = set()
        # EK chains verified before, with the window in which all their certificates are valid:
        # a peer connecting again costs no chain walk.
        self._trusted_chains: Dict[bytes, Tuple[datetime.datetime, datetime.datetime]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def fresh_nonce() -> bytes:
        return secrets.token_bytes(32)

    def check(self, data: bytes, expected: Expected) -> Verdict:
        """Every check but credential activation; raises a VerificationError subclass."""
        ev, ak, ek, signature = _parse(data)
        if not ak.has(AK_REQUIRED) or ak.attributes & tpmwire.DECRYPT:
            raise AkAttributesRefused("the AK is not a restricted, fixedTPM, fixedParent signing key")
        try:
            quote = tpmwire.parse_attest(ev.quote)
        except tpmwire.TpmWireError as error:
            raise QuoteInvalid(str(error)) from None
        if quote.magic != tpmwire.TPM_GENERATED:
            raise QuoteInvalid("the quote's magic is not TPM_GENERATED")
        _check_signature(ak, signature, quote.raw)
        try:
            signer = ak.qualified_name()
        except tpmwire.TpmWireError as error:
            raise AkAttributesRefused(str(error)) from None
        if not hmac.compare_digest(quote.qualified_signer, signer):
            raise QuoteInvalid("the quote's signer is not the evidence's AK as a primary key of "
                               "the endorsement hierarchy")
        if not hmac.compare_digest(quote.extra_data, ev.claims_digest()):
            raise ClaimsNotSigned("the quote's qualifying data does not cover the claims")
        self._check_binding(ev, expected)
        if abs(self.clock() - ev.issued) > self.policy.max_age:
            raise StaleEvidence(f"issued {int(self.clock() - ev.issued)} s ago, beyond "
                                f"{self.policy.max_age} s")
        self._check_pcr_digest(ev, quote)
        self._check_endorsement(ev, ek)
        self._check_policy_claims(ev)
        warnings = self._check_node_state(ev) + self._check_boot_loader(ev)
        return Verdict(ev, tuple(warnings + self._check_pcr_policy(ev)), self._unchecked(ev))

    @staticmethod
    def _check_binding(ev: Evidence, expected: Expected) -> None:
        if not hmac.compare_digest(ev.nonce, expected.nonce):
            raise NonceMismatch("the evidence answers another nonce than this verifier's")
        if not hmac.compare_digest(ev.tls_spki_sha256, expected.tls_spki_sha256):
            raise TlsKeyMismatch("the evidence is bound to another TLS key than the peer's")
        if not hmac.compare_digest(ev.session_binding, expected.session_binding):
            raise SessionMismatch("the evidence is bound to another TLS session (relayed)")

    @staticmethod
    def _check_pcr_digest(ev: Evidence, quote: tpmwire.Quote) -> None:
        if len(quote.pcr_select) != 1 or quote.pcr_select[0].hash_alg != tpmwire.ALG_SHA256:
            banks = [f"{s.hash_alg:#06x}" for s in quote.pcr_select]
            raise PcrBankRefused(f"the quote must select the SHA-256 bank only, not {banks}")
        signed_indices = quote.pcr_select[0].indices
        if tuple(i for i, _v in ev.pcr_values) != signed_indices:
            raise PcrDigestMismatch(f"PCR values given for other PCRs than the quoted {signed_indices}")
        digest = hashlib.sha256(b"".join(v for _i, v in ev.pcr_values)).digest()
        if not hmac.compare_digest(digest, quote.pcr_digest):
            raise PcrDigestMismatch("the PCR values do not hash to the quoted PCR digest")

    def _check_endorsement(self, ev: Evidence, ek: tpmwire.Public) -> None:
        if not _is_default_ek(ek):
            raise EkChainInvalid("the EK is not made from the TCG default EK template")
        if ev.security_class != "tpm":
            return  # a weak node's vTPM EK proves nothing; activation still ties the AK to it
        now = ekchain.utc_now(self.clock())
        key = hashlib.sha256(b"".join(hashlib.sha256(c).digest() for c in ev.ek_chain)
                             + ev.ek_public).digest()
        with self._lock:
            window = self._trusted_chains.get(key)
        if window is not None and window[0] <= now <= window[1]:
            return
        certificate = ekchain.verify(ev.ek_chain, self.anchors, now)
        if not _same_key(ek, certificate.public_key()):
            raise EkChainInvalid("the EK certificate certifies another key than the EK's")
        involved = [*ekchain.parse(ev.ek_chain), *self.anchors]
        with self._lock:
            if len(self._trusted_chains) > 1024:
                self._trusted_chains.clear()
            windows = [ekchain.validity(c) for c in involved]
            self._trusted_chains[key] = (max(w[0] for w in windows), min(w[1] for w in windows))

    def _check_policy_claims(self, ev: Evidence) -> None:
        if ev.security_class not in self.policy.allowed_classes:
            raise ClassRefused(f"class {ev.security_class!r} is not allowed by the policy "
                               f"({', '.join(sorted(self.policy.allowed_classes))})")
        if self.policy.zones is not None and ev.zone not in self.policy.zones:
            raise ZoneRefused(f"zone {ev.zone!r} is not allowed by the policy")

    def _check_node_state(self, ev: Evidence) -> List[str]:
        """Checked recently before signing, and ready, unless the policy only inspects."""
        state = ev.node_state
        age = ev.issued - state.checked
        if not 0 <= age <= self.policy.max_state_age:
            raise StaleNodeState(f"the node's state was checked {age} s before its evidence "
                                 f"was issued, not within 0-{self.policy.max_state_age} s")
        missing = self._unchecked(ev)
        if state.ready and not missing:
            return []
        unchecked = [f"not checked: {', '.join(missing)}"] if missing else []
        reasons = "; ".join(state.failing() + unchecked)
        if self.policy.require_ready:
            raise NodeNotReady(f"not ready: {reasons}")
        return [f"node not ready: {reasons}"]

    def _unchecked(self, ev: Evidence) -> Tuple[str, ...]:
        names = {check.name for check in ev.node_state.checks}
        return tuple(sorted(self.policy.required_checks - names))

    @staticmethod
    def _check_boot_loader(ev: Evidence) -> List[str]:
        """A warning for each boot loader PCR a TPM node's quote leaves uncovered: not
        quoted, or never extended in this boot (a weak node's vTPM measures no boot at all:
        its class says so). A policy that must know the command line pins PCRs 4, 7, 8, 9."""
        if ev.security_class != "tpm":
            return []
        values = dict(ev.pcr_values)
        return [f"PCR {index} ({what}) " + (
            "was not quoted (Attestation-PCRs leaves it out)" if index not in values else
            "is not measured on this node: nothing extended it in this boot")
            for index, what in sorted(BOOT_LOADER_PCRS.items())
            if values.get(index, NEVER_EXTENDED) == NEVER_EXTENDED]

    def _check_pcr_policy(self, ev: Evidence) -> List[str]:
        values = dict(ev.pcr_values)
        warnings = []
        for index, expectation in sorted(self.policy.pcrs.items()):
            value = values.get(index)
            if value is not None and hmac.compare_digest(value, expectation.value):
                continue
            problem = f"PCR {index} " + ("was not quoted" if value is None else
                                         f"is {value.hex()}, expected {expectation.value.hex()}")
            if expectation.enforce:
                raise PcrPolicyViolation(problem)
            warnings.append(problem)
        return warnings

    def challenge(self, verdict: Verdict) -> Optional[Challenge]:
        """A credential-activation challenge for this evidence's AK, or None if it was bound."""
        ev = verdict.evidence
        ak_name = tpmwire.parse_public(ev.ak_public).name()
        key = (hashlib.sha256(ev.ek_public).digest(), ak_name)
        with self._lock:
            if key in self._bound:
                return None
        secret = secrets.token_bytes(32)
        try:
            blob, encrypted = seal_credential(ev.ek_public, ak_name, secret)
        except (ValueError, TypeError, RuntimeError) as error:
            raise MalformedEvidence(f"cannot make a credential for this EK: {error}") from None
        return Challenge(blob, encrypted, secret, key)

    def confirm(self, challenge: Challenge, answer: bytes) -> None:
        """Accept the AK if the node recovered the secret: its TPM holds both EK and AK."""
        if not hmac.compare_digest(answer, challenge.secret):
            raise AkNotBound("the node could not activate a credential for its AK with its EK")
        with self._lock:
            self._bound.add(challenge.key)

