"""Why a piece of evidence was refused: one exception class, with a stable code, per reason.

Each reason has its own class so that callers, tests and the CLI's JSON tell a replayed
nonce from a relayed TLS session or an untrusted EK without parsing messages. Every
refusal the verifier makes is a `VerificationError`; nothing else escapes it.
"""

from __future__ import annotations


class VerificationError(Exception):
    """Evidence refused; `code` names the reason in machine-readable form."""

    code = "refused"


class MalformedEvidence(VerificationError):
    code = "malformed"


class ProtocolError(VerificationError):
    """The peer broke the aTLS exchange (bad frame, unexpected message, early close)."""

    code = "protocol"


class ClassRefused(VerificationError):
    code = "class-refused"


class ZoneRefused(VerificationError):
    code = "zone-refused"


class StaleEvidence(VerificationError):
    code = "stale"


class NonceMismatch(VerificationError):
    """Not bound to this verifier's fresh nonce: a replay."""

    code = "replay"


class TlsKeyMismatch(VerificationError):
    """Bound to another TLS key than the one this connection's peer proved it holds."""

    code = "tls-key"


class SessionMismatch(VerificationError):
    """Bound to another TLS session: the evidence was relayed."""

    code = "session"


class ClaimsNotSigned(VerificationError):
    """The quote's qualifying data does not cover the evidence's claims."""

    code = "claims-binding"


class QuoteInvalid(VerificationError):
    code = "quote"


class AkAttributesRefused(VerificationError):
    code = "ak-attributes"


class SignatureInvalid(VerificationError):
    code = "signature"


class PcrBankRefused(VerificationError):
    code = "pcr-bank"


class PcrDigestMismatch(VerificationError):
    code = "pcr-digest"


class PcrPolicyViolation(VerificationError):
    code = "pcr-policy"


class EkChainInvalid(VerificationError):
    code = "ek-chain"


class EkUntrusted(VerificationError):
    code = "ek-untrusted"


class AkNotBound(VerificationError):
    """The AK could not prove, by credential activation, that it lives beside the EK."""

    code = "ak-not-bound"


class NodeNotReady(VerificationError):
    """The node says, under its TPM's signature, that it is not installed or that a check of
    its status fails: it is not a node to send work to."""

    code = "not-ready"


class StaleNodeState(VerificationError):
    """The node's state was checked longer ago than the policy allows (or after signing)."""

    code = "state-stale"
