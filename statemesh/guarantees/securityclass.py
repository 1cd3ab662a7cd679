"""The security-class guarantee: the node's class is known, and a weak node's vTPM runs.

The class itself (`tpm` or `weak`) is decided by statemesh.attest.nodeclass; this module
reports it (`status`, `statemesh-node security-class`) and records it at installation.
The TPM stack (tpm2-pytss, cryptography) is imported when a class is asked for, not when
the guarantees are listed: the boot units that list them never ask.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, Sequence

from statemesh.config import NodeConfig
from statemesh.guarantees.base import Finding, Way


class SecurityClass:
    """The security-class guarantee: the class is known and its TPM is there to attest."""

    name = "security_class"
    boot_unit = None  # classifying changes nothing; statemesh-vtpm.service runs on weak nodes
    tamper_watched = False
    holds_workload_data = False
    kept_by_upgrades_while_holding = False

    def __init__(self, config: NodeConfig):
        self.config = config

    def ways_in(self) -> Sequence[Way]:
        return ()

    def check(self) -> Finding:
        from statemesh.attest.nodeclass import classify, vtpm_listening
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
        from statemesh.attest.nodeclass import classify
        found = classify(self.config)
        journal.record("security-class", security_class=found.security_class, reason=found.reason)

    def revert(self, record: Dict[str, Any]) -> None:
        """Nothing to give back: classifying changed nothing on the machine."""
        del record


def print_class(config: NodeConfig, as_json: bool, exit_zero_if_weak: bool) -> int:
    """Show the security class; with --is-weak, the exit status says whether it is weak
    (statemesh-vtpm.service runs only then)."""
    from statemesh.attest.nodeclass import classify
    found = classify(config)
    if as_json:
        json.dump({"class": found.security_class, "reason": found.reason}, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"{found.security_class}: {found.reason}")
    if exit_zero_if_weak:
        return 0 if found.weak else 1
    return 0
