"""The node's TPM: EK certificate, endorsement and attestation keys, quotes, activation.

Built on tpm2-pytss (ESAPI). A node uses its hardware TPM through the kernel's resource
manager (/dev/tpmrm0) or, on a weak node, the local swtpm that statemesh-vtpm.service runs.
The attestation key (AK) is a primary key of the endorsement hierarchy created from a fixed
template: the TPM derives it from its endorsement seed, so it is the same key after every
restart without being stored anywhere, and it can only ever live in this TPM.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
from typing import Optional, Sequence, Tuple

# Before tpm2_pytss loads libtss2-esys: its expected "no such NV index" probes log to stderr.
os.environ.setdefault("TSS2_LOG", "all+NONE")
# tpm2-pytss 1.2 leaves every TPM structure uninitialised when unittest.mock was imported
# before it (a hack for its documentation build), which any test suite may have done.
_MOCK = sys.modules.pop("unittest.mock", None)

from tpm2_pytss import (  # noqa: E402
    ESAPI,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPML_PCR_SELECTION,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TSS2_Exception,
)
from tpm2_pytss.constants import (  # noqa: E402
    ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_HR, TPM2_SE, TPMA_OBJECT)
from tpm2_pytss.types import TPM2B_NAME  # noqa: E402
from tpm2_pytss.utils import NVReadEK, create_ek_template, make_credential  # noqa: E402

if _MOCK is not None:
    sys.modules["unittest.mock"] = _MOCK

from statemesh.attest import tpmwire  # noqa: E402

# The restricted signing template; tpm2-pytss 1.2 needs the explicit ":null" symmetric part.
AK_TEMPLATE = "ecc256:ecdsa-sha256:null"
AK_ATTRIBUTES = (
    TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH
)
EK_TYPES = ("EK-RSA2048", "EK-ECC256")  # NV 0x01c00002 and 0x01c0000a, in order of preference
PCR_READ_RETRIES = 5
# More than any TPM holds at once (swtpm: 3 transient objects; hardware TPMs a few more).
MAX_TRANSIENT = 64


class TpmError(RuntimeError):
    """The TPM could not be opened or refused an operation; the message says which."""


def _selection(pcrs: Sequence[int]) -> TPML_PCR_SELECTION:
    return TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(p) for p in pcrs))


class Tpm:
    """One open TPM connection; thread-safe (the TPM serialises commands anyway)."""

    def __init__(self, tcti: str):
        self.tcti = tcti
        self._lock = threading.Lock()
        try:
            self._esapi = ESAPI(tcti)
        except (TSS2_Exception, RuntimeError) as error:
            raise TpmError(f"cannot open the TPM at {tcti}: {error}") from None
        self._ek_template: Optional[Tuple[Optional[bytes], TPM2B_PUBLIC]] = None
        self._ek: Optional[Tuple[ESYS_TR, bytes]] = None
        self._ak: Optional[Tuple[ESYS_TR, bytes]] = None

    def close(self) -> None:
        """Flush the keys this connection made, then close. A resource manager (the
        kernel's /dev/tpmrm0) would flush them anyway; the vTPM, reached over swtpm's
        socket, has none, keeps them after their creator is gone, and holds only three."""
        with self._lock:
            for created in (self._ek, self._ak):
                if created is not None:
                    with contextlib.suppress(TSS2_Exception):
                        self._esapi.flush_context(created[0])
            self._ek = self._ak = None
            self._esapi.close()

    def flush_transient_objects(self) -> int:
        """Flush every transient object and loaded session in the TPM; returns how many
        there were. Only for a TPM this process alone uses and no resource manager cleans
        up after (the vTPM and its endpoint): what a killed predecessor left (its keys, the
        policy session of an activation it was in) would otherwise fill it for good; swtpm
        holds three of each. Call it before this connection makes keys of its own."""
        return self._call("flush of transient objects", self._flush_transient_objects)

    def _flush_transient_objects(self) -> int:
        handles = set()
        for first in (TPM2_HR.TRANSIENT, TPM2_HR.HMAC_SESSION, TPM2_HR.POLICY_SESSION):
            _more, found = self._esapi.get_capability(TPM2_CAP.HANDLES, first, MAX_TRANSIENT)
            handles.update(found.data.handles)
        for handle in sorted(handles):
            self._esapi.flush_context(self._esapi.tr_from_tpmpublic(handle))
        return len(handles)

    def __enter__(self) -> "Tpm":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _certificate_and_template(self) -> Tuple[Optional[bytes], TPM2B_PUBLIC]:
        """The EK certificate from NV (RSA 2048 first, then ECC P-256) and the template of
        the key it certifies; NV reads only, no key generation."""
        if self._ek_template is None:
            reader = NVReadEK(self._esapi)
            for ek_type in EK_TYPES:
                certificate, template = create_ek_template(ek_type, reader)
                if certificate:
                    self._ek_template = (certificate, template)
                    break
            else:
                self._ek_template = (None, create_ek_template(EK_TYPES[0], reader)[1])
        return self._ek_template

    def _endorsement(self) -> Tuple[ESYS_TR, bytes]:
        """Create (once) the EK matching the TPM's EK certificate."""
        if self._ek is None:
            _certificate, template = self._certificate_and_template()
            handle, public, *_ = self._esapi.create_primary(None, template, ESYS_TR.ENDORSEMENT)
            self._ek = (handle, public.publicArea.marshal())
        return self._ek

    def _attestation(self) -> Tuple[ESYS_TR, bytes]:
        if self._ak is None:
            template = TPM2B_PUBLIC(TPMT_PUBLIC.parse(AK_TEMPLATE, objectAttributes=AK_ATTRIBUTES))
            handle, public, *_ = self._esapi.create_primary(None, template, ESYS_TR.ENDORSEMENT)
            self._ak = (handle, public.publicArea.marshal())
        return self._ak

    def _call(self, what: str, function, *args, **kwargs):  # type: ignore[no-untyped-def]
        with self._lock:
            try:
                return function(*args, **kwargs)
            except TSS2_Exception as error:
                raise TpmError(f"TPM {what} failed: {error}") from None

    def ek_certificate(self) -> Optional[bytes]:
        """The DER EK certificate from NV (RSA 2048 first, then ECC P-256), if provisioned.
        Cheap: `status` calls it, and creating an RSA EK takes seconds on some TPMs."""
        return self._call("EK certificate read", self._certificate_and_template)[0]

    def ek_public(self) -> bytes:
        """The EK's TPMT_PUBLIC, for the verifier's MakeCredential."""
        return self._call("EK creation", self._endorsement)[1]

    def ak_public(self) -> bytes:
        """The AK's TPMT_PUBLIC."""
        return self._call("AK creation", self._attestation)[1]

    def node_id(self) -> str:
        """A stable identifier of this TPM: derived from its EK, which never changes."""
        return "ek-" + hashlib.sha256(self.ek_public()).hexdigest()[:24]

    def _quote_once(self, pcrs: Sequence[int], data: bytes) -> Tuple[bytes, bytes, Tuple]:
        handle, _public = self._attestation()
        attest, signature = self._esapi.quote(
            handle, _selection(pcrs), data, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
        )
        values = []
        remaining = list(pcrs)
        while remaining:  # PCR_Read returns at most 8 digests per call
            _counter, selection, digests = self._esapi.pcr_read(_selection(remaining[:8]))
            values.extend(zip(remaining[:8], (bytes(d) for d in digests)))
            remaining = remaining[8:]
        return attest.marshal()[2:], signature.marshal(), tuple(values)

    def quote(self, pcrs: Sequence[int], data: bytes) -> Tuple[bytes, bytes, Tuple[Tuple[int, bytes], ...]]:
        """Quote SHA-256 PCRs over `data`; return (TPMS_ATTEST, TPMT_SIGNATURE, PCR values).

        The PCRs are read after quoting, and can change in between (an extend by another
        process): the read is retried until the values hash to the quoted digest.
        """
        for _ in range(PCR_READ_RETRIES):
            attest, signature, values = self._call("quote", self._quote_once, pcrs, data)
            digest = hashlib.sha256(b"".join(v for _i, v in values)).digest()
            if tpmwire.parse_attest(attest).pcr_digest == digest:
                return attest, signature, values
        raise TpmError(f"PCRs kept changing during {PCR_READ_RETRIES} quotes")

    def _activate(self, blob: bytes, secret: bytes) -> bytes:
        ek_handle, _ = self._endorsement()
        ak_handle, _ = self._attestation()
        credential, _ = TPM2B_ID_OBJECT.unmarshal(blob)
        encrypted, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(secret)
        # The EK's policy is PolicySecret(endorsement hierarchy) in the default templates.
        session = self._esapi.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256,
        )
        try:
            self._esapi.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
            recovered = self._esapi.activate_credential(
                ak_handle, ek_handle, credential, encrypted,
                session1=ESYS_TR.PASSWORD, session2=session,
            )
        finally:
            self._esapi.flush_context(session)
        return bytes(recovered)

    def activate_credential(self, blob: bytes, secret: bytes) -> bytes:
        """Recover a verifier's secret sealed to our EK for our AK's name (TPM2_ActivateCredential).

        Only the TPM holding both the EK and an object with the named AK can do this.
        """
        try:
            return self._call("credential activation", self._activate, blob, secret)
        except (ValueError, TypeError) as error:
            raise TpmError(f"malformed credential: {error}") from None


def seal_credential(ek_public: bytes, ak_name: bytes, secret: bytes) -> Tuple[bytes, bytes]:
    """The verifier's TPM2_MakeCredential, in software: `secret` sealed to the EK, usable
    only by the TPM that also holds an object named `ak_name`; returns (blob, encrypted seed)."""
    public, _ = TPMT_PUBLIC.unmarshal(ek_public)
    blob, encrypted = make_credential(TPM2B_PUBLIC(public), secret, TPM2B_NAME(ak_name))
    return blob.marshal(), encrypted.marshal()
