"""The node's security class: `tpm` (a TPM whose EK chains to a trusted CA) or `weak`.

A weak node attests with the local vTPM (statemesh-vtpm.service, swtpm with its state under
/run): the protocol is the same, but a software TPM proves nothing about the host, which is
why the class is in every piece of evidence and in `statemesh-node status`.

Deciding the class reads the EK certificate and builds its chain to a trusted CA: the aTLS
endpoint keeps both (the open TPM, the verified chain) to attest with, rather than doing
the same work again.
"""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple

from statemesh.attest import tpmdevices
from statemesh.attest.refusals import VerificationError
from statemesh.config import NodeConfig

if TYPE_CHECKING:
    from cryptography import x509

    from statemesh.attest import tpm


@dataclasses.dataclass(frozen=True)
class Classification:
    security_class: str
    reason: str
    # A tpm-class node's EK certificate and the intermediates that chain it to a trusted CA,
    # as verified when classifying (DER); empty on a weak node.
    ek_chain: Tuple[bytes, ...] = ()
    # The CA directory's certificates, when classifying got as far as loading them.
    anchors: Optional[Tuple[x509.Certificate, ...]] = None

    @property
    def weak(self) -> bool:
        return self.security_class == "weak"


def _classify_ek(device: tpm.Tpm, ca_dir: Path) -> Classification:
    from statemesh.attest import ekchain, tpm
    try:
        certificate = device.ek_certificate()
    except tpm.TpmError as error:
        return Classification("weak", f"the TPM is unusable: {error}")
    if certificate is None:
        return Classification("weak", "the TPM has no EK certificate")
    try:
        anchors = tuple(ekchain.load_anchors(ca_dir))
    except (VerificationError, ValueError) as error:
        return Classification("weak", f"EK not trusted ({ca_dir}): {error}")
    try:
        chain = (certificate, *ekchain.intermediates_for(certificate, anchors))
        ekchain.verify(chain, anchors)
    except (VerificationError, ValueError) as error:
        return Classification("weak", f"EK not trusted ({ca_dir}): {error}", anchors=anchors)
    return Classification("tpm", f"EK certificate chains to a CA in {ca_dir}", chain, anchors)


def classify_open(config: NodeConfig) -> Tuple[Classification, Optional[tpm.Tpm]]:
    """Decide the class; on a tpm-class node also return the hardware TPM, left open for
    the caller to attest with (and close). Nothing is changed on the TPM. The TPM stack is
    imported only when there is a TPM to open: a weak node's `status` is a second faster."""
    if not tpmdevices.DEVICE.exists():
        return Classification("weak", f"no TPM device ({tpmdevices.DEVICE})"), None
    from statemesh.attest import tpm
    try:
        device = tpm.open_tpm(tpmdevices.DEVICE_TCTI)
    except tpm.TpmError as error:
        return Classification("weak", f"the TPM is unusable: {error}"), None
    try:
        found = _classify_ek(device, config.tpm_ca_dir)
    except BaseException:
        device.close()
        raise
    if found.weak:
        device.close()
        return found, None
    return found, device


def classify(config: NodeConfig) -> Classification:
    """Decide the class from the TPM device and the EK CA directory; no side effects."""
    found, device = classify_open(config)
    if device is not None:
        device.close()
    return found


def vtpm_listening() -> bool:
    """Whether the local vTPM accepts connections (without opening a TPM session: swtpm
    serves one client at a time and the aTLS endpoint holds it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(tpmdevices.VTPM_SOCKET))
        except OSError:
            return False
    return True
