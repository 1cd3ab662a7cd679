"""The TPM backend on tpm2-pytss (ESAPI): Debian 12 and 13, Ubuntu 24.04 and later.

statemesh.attest.tpm has the interface and the reasons; this module only maps each of its
operations to ESAPI calls.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence, Tuple

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
from tpm2_pytss.utils import NVReadEK, create_ek_template  # noqa: E402

if _MOCK is not None:
    sys.modules["unittest.mock"] = _MOCK

from statemesh.attest.tpm import MAX_TRANSIENT, Tpm, TpmError  # noqa: E402

# The restricted signing template; tpm2-pytss 1.2 needs the explicit ":null" symmetric part.
AK_TEMPLATE = "ecc256:ecdsa-sha256:null"
AK_ATTRIBUTES = (
    TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH
)
EK_TYPES = ("EK-RSA2048", "EK-ECC256")  # NV 0x01c00002 and 0x01c0000a, in order of preference


def _selection(pcrs: Sequence[int]) -> TPML_PCR_SELECTION:
    return TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(p) for p in pcrs))


class EsapiTpm(Tpm):
    """One open TPM connection through tpm2-tss's ESAPI."""

    backend = "esapi"
    library_errors = (TSS2_Exception,)

    def __init__(self, tcti: str):
        super().__init__(tcti)
        try:
            self._esapi = ESAPI(tcti)
        except (TSS2_Exception, RuntimeError) as error:
            raise TpmError(f"cannot open the TPM at {tcti}: {error}") from None

    def _flush(self, handle: ESYS_TR) -> None:
        self._esapi.flush_context(handle)

    def _disconnect(self) -> None:
        self._esapi.close()

    def _flush_transient_objects(self) -> int:
        handles = set()
        for first in (TPM2_HR.TRANSIENT, TPM2_HR.HMAC_SESSION, TPM2_HR.POLICY_SESSION):
            _more, found = self._esapi.get_capability(TPM2_CAP.HANDLES, first, MAX_TRANSIENT)
            handles.update(found.data.handles)
        for handle in sorted(handles):
            self._esapi.flush_context(self._esapi.tr_from_tpmpublic(handle))
        return len(handles)

    def _find_certificate(self) -> Tuple[Optional[bytes], TPM2B_PUBLIC]:
        reader = NVReadEK(self._esapi)
        for ek_type in EK_TYPES:
            certificate, template = create_ek_template(ek_type, reader)
            if certificate:
                return certificate, template
        return None, create_ek_template(EK_TYPES[0], reader)[1]

    def _ak_template(self) -> TPM2B_PUBLIC:
        return TPM2B_PUBLIC(TPMT_PUBLIC.parse(AK_TEMPLATE, objectAttributes=AK_ATTRIBUTES))

    def _create_primary(self, template: TPM2B_PUBLIC) -> Tuple[ESYS_TR, bytes]:
        handle, public, *_ = self._esapi.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        return handle, public.publicArea.marshal()

    def _quote(self, handle: ESYS_TR, pcrs: Sequence[int], data: bytes) -> Tuple[bytes, bytes]:
        attest, signature = self._esapi.quote(
            handle, _selection(pcrs), data, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
        )
        return attest.marshal()[2:], signature.marshal()

    def _read_pcrs(self, batch: Sequence[int]) -> List[bytes]:
        _counter, _selection_out, digests = self._esapi.pcr_read(_selection(batch))
        return [bytes(digest) for digest in digests]

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
