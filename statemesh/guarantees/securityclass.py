"""The node's security class: `tpm` (a TPM whose EK chains to a trusted CA) or `weak`.

A weak node attests with the local vTPM (statemesh-vtpm.service, swtpm with its state under
/run): the protocol is the same, but a software TPM proves nothing about the host, which is
why the class is in every piece of evidence and in `statemesh-node status`.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Any, Dict

from statemesh.attest import ekchain, tpm
from statemesh.attest.refusals import VerificationError
from statemesh.config import NodeConfig
from statemesh.guarantees.base import Finding


@dataclasses.dataclass(frozen=True)
class Classification:
    security_class: str
    reason: str

    @property
    def weak(self) -> bool:
        return self.security_class == "weak"


def classify(config: NodeConfig) -> Classification:
    """Decide the class from the TPM device and the EK CA directory; no side effects."""
    if not tpm.DEVICE.exists():
        return Classification("weak", f"no TPM device ({tpm.DEVICE})")
    try:
        with tpm.Tpm(tpm.DEVICE_TCTI) as device:
            certificate = device.ek_certificate()
    except tpm.TpmError as error:
        return Classification("weak", f"the TPM is unusable: {error}")
    if certificate is None:
        return Classification("weak", "the TPM has no EK certificate")
    try:
        anchors = ekchain.load_anchors(config.tpm_ca_dir)
        chain = [certificate, *ekchain.intermediates_for(certificate, anchors)]
        ekchain.verify(chain, anchors)
    except (VerificationError, ValueError) as error:
        return Classification("weak", f"EK not trusted ({config.tpm_ca_dir}): {error}")
    return Classification("tpm", f"EK certificate chains to a CA in {config.tpm_ca_dir}")


def vtpm_listening() -> bool:
    """Whether the local vTPM accepts connections (without opening a TPM session: swtpm
    serves one client at a time and the aTLS endpoint holds it)."""
    try:
        socket.create_connection(("127.0.0.1", tpm.VTPM_PORT), timeout=2).close()
    except OSError:
        return False
    return True


class SecurityClass:
    """The security-class guarantee: the class is known and its TPM is there to attest."""

    name = "security_class"
    boot_unit = None  # classifying changes nothing; statemesh-vtpm.service runs on weak nodes
    tamper_watched = False
    holds_workload_data = False

    def __init__(self, config: NodeConfig):
        self.config = config

    def check(self) -> Finding:
        found = classify(self.config)
        facts: Dict[str, Any] = {"class": found.security_class, "reason": found.reason}
        if not found.weak:
            return Finding(self.name, True, f"tpm: {found.reason}", facts)
        listening = vtpm_listening()
        facts["vtpm"] = "listening" if listening else "not running"
        detail = (f"WEAK ({found.reason}): attests with the local vTPM, which proves nothing "
                  f"about this host" + ("" if listening else "; the vTPM is NOT running"))
        return Finding(self.name, listening, detail, facts)

    def apply(self, journal: Any) -> None:
        """Record the class; the vTPM unit itself is installed and started by the package."""
        found = classify(self.config)
        journal.record("security-class", security_class=found.security_class, reason=found.reason)

    def revert(self, record: Dict[str, Any]) -> None:
        """Nothing to give back: classifying changed nothing on the machine."""
        del record
