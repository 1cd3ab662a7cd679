"""The node's side of attestation: evidence bound to a verifier's nonce and a TLS session.

It owns no policy: it states the node's class, zone, state and PCRs, and lets the TPM sign
them together with the binding values the verifier will check.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

from statemesh.attest import ekchain, evidence
from statemesh.attest.tpm import Tpm


class Attester:
    """Produces evidence and answers credential-activation challenges with one TPM."""

    def __init__(self, tpm: Tpm, security_class: str, zone: str, pcrs: Sequence[int],
                 ca_dir: Path, *, node_state: Callable[[], evidence.NodeState],
                 clock: Callable[[], float] = time.time,
                 ek_chain: Optional[Sequence[bytes]] = None):
        """`node_state`: the node's state now (statemesh.attest.nodestate), signed into every
        evidence. `ek_chain`: the EK chain a classification already built and verified;
        without it a tpm-class attester builds it from its TPM's EK certificate and
        `ca_dir`."""
        if security_class not in evidence.CLASSES:
            raise ValueError(f"unknown security class {security_class!r}")
        self.tpm = tpm
        self.security_class = security_class
        self.zone = zone
        self.pcrs = tuple(pcrs)
        self.node_state = node_state
        self.clock = clock
        self.node_id = tpm.node_id()
        if security_class != "tpm":
            self.ek_chain: Tuple[bytes, ...] = ()
        else:
            self.ek_chain = tuple(ek_chain) if ek_chain is not None else self._chain(ca_dir)

    def _chain(self, ca_dir: Path) -> Tuple[bytes, ...]:
        """The EK certificate and the intermediate CAs from the node's CA directory."""
        certificate = self.tpm.ek_certificate()
        if certificate is None:
            raise ValueError("a tpm-class node needs an EK certificate in its TPM's NV")
        anchors = ekchain.load_anchors(ca_dir)
        return (certificate, *ekchain.intermediates_for(certificate, anchors))

    def evidence(self, nonce: bytes, tls_spki_sha256: bytes, session_binding: bytes) -> bytes:
        """Fresh evidence: one TPM quote whose qualifying data covers every claim."""
        state = self.node_state()
        claims = evidence.Evidence(
            node_id=self.node_id, zone=self.zone, security_class=self.security_class,
            issued=int(self.clock()), nonce=nonce, tls_spki_sha256=tls_spki_sha256,
            session_binding=session_binding, node_state=state, ak_public=self.tpm.ak_public(),
            ek_public=self.tpm.ek_public(), quote=b"-", signature=b"-",
            pcr_values=((0, bytes(32)),), ek_chain=self.ek_chain,
        )
        quote, signature, values = self.tpm.quote(self.pcrs, claims.claims_digest())
        return evidence.encode(dataclasses.replace(
            claims, quote=quote, signature=signature, pcr_values=values))

    def activate(self, blob: bytes, encrypted_secret: bytes) -> bytes:
        """Answer a verifier's MakeCredential challenge (TpmError if it is not for us)."""
        return self.tpm.activate_credential(blob, encrypted_secret)
