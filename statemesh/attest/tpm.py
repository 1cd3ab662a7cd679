"""The node's TPM: one interface, two backends.

The node needs few TPM operations: the EK certificate and the EK, an attestation key (AK),
quotes, and credential activation. tpm2-pytss (ESAPI, statemesh.attest.tpm_esapi) does
them where Debian or Ubuntu package it (Debian 12 on, Ubuntu 24.04 on); where they do not
(Ubuntu 22.04), statemesh.attest.tpm_direct sends the same TPM 2.0 commands itself, in pure
Python, over the kernel's resource manager or swtpm's socket. Both create the same keys
from the same templates, so a node's identity does not depend on the backend.

The AK is a primary key of the endorsement hierarchy created from a fixed template: the TPM
derives it from its endorsement seed, so it is the same key after every restart without
being stored anywhere, and it can only ever live in this TPM.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import logging
import os
import threading
from typing import Callable, List, Optional, Sequence, Tuple, TypeVar

from statemesh import backend
from statemesh.attest import tpmwire

log = logging.getLogger(__name__)
# Which backend open_tpm uses: "esapi", "direct", or unset for esapi where tpm2-pytss is
# installed and direct elsewhere. The test suites set it to run the same tests on both; the
# units never do (their environment is the package's).
BACKEND_VARIABLE = "STATEMESH_TPM_BACKEND"
BACKENDS = ("esapi", "direct")
PCR_READ_RETRIES = 5
PCR_READ_BATCH = 8  # PCR_Read returns at most 8 digests per call
MAX_TRANSIENT = 64  # more than any TPM holds at once (swtpm: 3 of each kind)
Quote = Tuple[bytes, bytes, Tuple[Tuple[int, bytes], ...]]
Result = TypeVar("Result")


class TpmError(RuntimeError):
    """The TPM could not be opened or refused an operation; the message says which."""


class Tpm(abc.ABC):
    """One open TPM connection; thread-safe (the TPM serialises commands anyway)."""

    backend = ""
    # What the backend's library raises for a failed command, turned into TpmError.
    library_errors: Tuple[type, ...] = ()

    def __init__(self, tcti: str):
        self.tcti = tcti
        self._lock = threading.Lock()
        # Made once per connection: (certificate, EK template), then (handle, TPMT_PUBLIC).
        self._ek_template: Optional[Tuple[Optional[bytes], object]] = None
        self._ek: Optional[Tuple[object, bytes]] = None
        self._ak: Optional[Tuple[object, bytes]] = None

    # --- what each backend does -------------------------------------------------------

    @abc.abstractmethod
    def _find_certificate(self) -> Tuple[Optional[bytes], object]:
        """The EK certificate from NV (RSA 2048 first, then ECC P-256) and the template of
        the key it certifies; NV reads only, no key generation."""

    @abc.abstractmethod
    def _ak_template(self) -> object:
        """The AK's template, in the backend's form."""

    @abc.abstractmethod
    def _create_primary(self, template: object) -> Tuple[object, bytes]:
        """A primary key of the endorsement hierarchy: (handle, TPMT_PUBLIC)."""

    @abc.abstractmethod
    def _quote(self, handle: object, pcrs: Sequence[int], data: bytes) -> Tuple[bytes, bytes]:
        """TPM2_Quote of SHA-256 PCRs with the key at `handle`: (TPMS_ATTEST, TPMT_SIGNATURE)."""

    @abc.abstractmethod
    def _read_pcrs(self, batch: Sequence[int]) -> List[bytes]:
        """The SHA-256 values of at most PCR_READ_BATCH PCRs, in ascending order."""

    @abc.abstractmethod
    def _activate(self, blob: bytes, secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the AK and the EK (under its policy session)."""

    @abc.abstractmethod
    def _flush_transient_objects(self) -> int:
        """Flush every transient object and loaded session; return how many."""

    @abc.abstractmethod
    def _flush(self, handle: object) -> None:
        """Flush one object this connection made."""

    @abc.abstractmethod
    def _disconnect(self) -> None:
        """Close the connection to the TPM."""

    # --- made once per connection -----------------------------------------------------

    def _certificate_and_template(self) -> Tuple[Optional[bytes], object]:
        if self._ek_template is None:  # set only once found: a failed read is read again
            self._ek_template = self._find_certificate()
        return self._ek_template

    def _endorsement(self) -> Tuple[object, bytes]:
        """The EK matching the EK certificate: (handle, TPMT_PUBLIC)."""
        if self._ek is None:
            self._ek = self._create_primary(self._certificate_and_template()[1])
        return self._ek

    def _attestation(self) -> Tuple[object, bytes]:
        """The AK: (handle, TPMT_PUBLIC)."""
        if self._ak is None:
            self._ak = self._create_primary(self._ak_template())
        return self._ak

    def _quote_once(self, pcrs: Sequence[int], data: bytes) -> Quote:
        """Quote, then read the PCRs: (TPMS_ATTEST, TPMT_SIGNATURE, PCR values)."""
        attest, signature = self._quote(self._attestation()[0], pcrs, data)
        values: List[Tuple[int, bytes]] = []
        for start in range(0, len(pcrs), PCR_READ_BATCH):
            batch = tuple(pcrs[start:start + PCR_READ_BATCH])
            values.extend(zip(batch, self._read_pcrs(batch)))
        return attest, signature, tuple(values)

    # --- the interface ----------------------------------------------------------------

    def close(self) -> None:
        """Flush the keys this connection made, then close. A resource manager (the
        kernel's /dev/tpmrm0) would flush them anyway; the vTPM, reached over swtpm's
        socket, has none, keeps them after their creator is gone, and holds only three."""
        with self._lock:
            for created in (self._ek, self._ak):
                if created is not None:
                    with contextlib.suppress(TpmError, *self.library_errors):
                        self._flush(created[0])
            self._ek = self._ak = None
            self._disconnect()

    def __enter__(self) -> "Tpm":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, what: str, function: Callable[..., Result], *args: object) -> Result:
        with self._lock:
            try:
                return function(*args)
            except self.library_errors as error:
                raise TpmError(f"TPM {what} failed: {error}") from None

    def flush_transient_objects(self) -> int:
        """Flush every transient object and loaded session in the TPM; returns how many
        there were. Only for a TPM this process alone uses and no resource manager cleans
        up after (the vTPM and its endpoint): what a killed predecessor left (its keys, the
        policy session of an activation it was in) would otherwise fill it for good; swtpm
        holds three of each. Call it before this connection makes keys of its own."""
        return self._call("flush of transient objects", self._flush_transient_objects)

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

    def quote(self, pcrs: Sequence[int], data: bytes) -> Quote:
        """Quote SHA-256 PCRs over `data`; return (TPMS_ATTEST, TPMT_SIGNATURE, PCR values).

        The PCRs are read after quoting, and can change in between (an extend by another
        process): the read is retried until the values hash to the quoted digest.
        """
        pcrs = sorted(set(pcrs))  # the order of a PCR selection and of its digest
        for _ in range(PCR_READ_RETRIES):
            attest, signature, values = self._call("quote", self._quote_once, pcrs, data)
            digest = hashlib.sha256(b"".join(v for _i, v in values)).digest()
            if tpmwire.parse_attest(attest).pcr_digest == digest:
                return attest, signature, values
        raise TpmError(f"PCRs kept changing during {PCR_READ_RETRIES} quotes")

    def activate_credential(self, blob: bytes, secret: bytes) -> bytes:
        """Recover a verifier's secret sealed to our EK for our AK's name (TPM2_ActivateCredential).

        Only the TPM holding both the EK and an object with the named AK can do this.
        """
        try:
            return self._call("credential activation", self._activate, blob, secret)
        except (ValueError, TypeError) as error:
            raise TpmError(f"malformed credential: {error}") from None


def chosen_backend() -> str:
    """The backend open_tpm uses here: the variable's, else esapi where tpm2-pytss is."""
    try:
        return backend.choose(BACKEND_VARIABLE, BACKENDS, "tpm2_pytss")
    except ValueError as error:
        raise TpmError(str(error)) from None


def open_tpm(tcti: str) -> Tpm:
    """Open the TPM at `tcti` ("device:/dev/tpmrm0" or "swtpm:path=SOCKET") with the
    chosen backend; TpmError when it cannot be reached."""
    if chosen_backend() == "esapi":
        try:
            from statemesh.attest.tpm_esapi import EsapiTpm
        except ImportError as error:  # found, but broken (libtss2 missing, say)
            if os.environ.get(BACKEND_VARIABLE):
                raise TpmError(f"the esapi TPM backend needs tpm2-pytss: {error}") from None
            log.warning("tpm2-pytss does not load (%s): using the direct TPM backend", error)
        else:
            return EsapiTpm(tcti)
    from statemesh.attest.tpm_direct import DirectTpm
    return DirectTpm(tcti)
