"""The operator-facing aTLS commands: `atls-serve` (the node's endpoint) and `verify`.

Kept apart from atls.py (the protocol) so that the protocol has no knowledge of node.conf,
systemd or terminal output.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from statemesh.attest import atls, ekchain, nodeclass, nodestate, stateservice, tpm, tpmdevices
from statemesh.attest.attester import Attester
from statemesh.attest.refusals import VerificationError
from statemesh.attest.verifier import Policy, Verifier, load_policy
from statemesh.config import NodeConfig

log = logging.getLogger(__name__)
TPM_OPEN_ATTEMPTS = 20  # the vTPM may still be starting when the endpoint does
# A node idle for a while measures its state before it answers (statemesh.attest.nodestate):
# a customer waits up to this long for each step of the exchange.
VERIFY_TIMEOUT = 30.0


def parse_target(target: str) -> Tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT."""
    host, _, port = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {target!r}")
    return host, int(port)


def default_policy(config: NodeConfig, allow_weak: bool = False) -> Policy:
    """Without --policy: any zone, EK CAs of this machine's node.conf, and class tpm only
    unless the customer allows weak nodes (a software vTPM proves nothing about the host:
    no sensitive data on them)."""
    return Policy(frozenset({"tpm", "weak"} if allow_weak else {"tpm"}), None,
                  config.tpm_ca_dir)


def _policy_source(policy_path: Optional[Path], allow_weak: bool) -> str:
    """What the report names as the policy it verified under."""
    if policy_path:
        return str(policy_path)
    if allow_weak:
        return "built-in: any zone, class tpm or weak (--allow-weak)"
    return "built-in: any zone, class tpm (--allow-weak also accepts weak nodes)"


def _open_vtpm() -> tpm.Tpm:
    """The local vTPM, emptied of what an endpoint killed before this one left in it (swtpm
    has no resource manager, and this endpoint is its only user)."""
    for _attempt in range(TPM_OPEN_ATTEMPTS - 1):
        try:
            return _emptied(tpm.open_tpm(tpmdevices.VTPM_TCTI))
        except tpm.TpmError as error:
            log.info("waiting for the TPM: %s", error)
            time.sleep(0.5)
    return _emptied(tpm.open_tpm(tpmdevices.VTPM_TCTI))


def _emptied(vtpm: tpm.Tpm) -> tpm.Tpm:
    try:
        left = vtpm.flush_transient_objects()
    except tpm.TpmError:
        vtpm.close()
        raise
    if left:
        log.info("flushed %d transient object(s) an earlier endpoint left in the vTPM", left)
    return vtpm


def _listen(attester: Attester, port: int, verifier: Verifier) -> atls.AtlsServer:
    identity = atls.TlsIdentity.generate(attester.node_id)
    try:
        return atls.AtlsServer(("::", port), attester, identity, verifier=verifier)
    except OSError as error:  # a kernel without IPv6
        log.info("no IPv6 (%s): listening on IPv4 only", error)
        return atls.AtlsServer(("0.0.0.0", port), attester, identity, verifier=verifier)


def serve(config: NodeConfig) -> int:
    """Serve this node's aTLS endpoint on the mesh port until stopped."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # Classified once: a tpm-class node attests with the TPM and the EK chain classifying
    # opened and verified, a weak node with the local vTPM; the CA certificates classifying
    # loaded serve the peers' verifier too.
    found, hardware = nodeclass.classify_open(config)
    log.info("security class %s: %s", found.security_class, found.reason)
    # Every evidence carries the node's state as status sees it, measured again once older
    # than nodestate.REFRESH_SECONDS by the state service (root; this process is not): a
    # node not locked down answers "not ready", signed.
    # Measured at the first handshake, not at start: a node nobody asks spends nothing on it
    # (a boot's CPU goes to the boot).
    state = nodestate.Fresh(lambda: nodestate.measure(config.watchdog_exempt_units,
                                                      stateservice.ask))
    try:
        node_tpm = hardware if hardware is not None else _open_vtpm()
        attester = Attester(node_tpm, found.security_class, config.zone,
                            config.attestation_pcrs, config.tpm_ca_dir, node_state=state,
                            ek_chain=found.ek_chain)
    except (tpm.TpmError, ValueError) as error:
        print(f"statemesh-node: cannot attest: {error}", file=sys.stderr)
        return 1
    log.info("TPM %s through the %s backend", node_tpm.tcti, node_tpm.backend)
    # Peers of this node's zone may attest to it too (mutual aTLS); customers need not.
    peers = Verifier(Policy(frozenset({"tpm", "weak"}), frozenset({config.zone}), config.tpm_ca_dir),
                     anchors=found.anchors)
    server = _listen(attester, config.mesh_port, peers)
    log.info("aTLS endpoint of node %s on port %d", attester.node_id, config.mesh_port)
    server.serve_forever()
    return 0


def _report(verdict: Any, policy_source: str) -> Dict[str, Any]:
    report = {"verdict": "accepted", "policy": policy_source, **verdict.as_dict()}
    report["issued"] = ekchain.utc_now(verdict.evidence.issued).isoformat() + "Z"
    return report


def _print_state(state: Dict[str, Any]) -> None:
    checked = ekchain.utc_now(state["checked"]).isoformat() + "Z"
    if state["ready"]:
        print(f"state     ready: installed {state['package_version']}, all "
              f"{len(state['checks'])} checks of status hold (checked {checked})")
    else:
        print(f"state     NOT READY (checked {checked})")
        for check in state["checks"]:
            if not check["holds"]:
                print(f"failing   {check['name']}: {check['detail']}")
        for name in state["unchecked"]:
            print(f"unchecked {name}: required by the policy, not in the node's state")
    if state["exempt_units"]:
        print(f"exempt    {' '.join(state['exempt_units'])}  (the watchdog spares their terminals)")


def _print_report(report: Dict[str, Any]) -> None:
    if report["verdict"] != "accepted":
        print(f"policy    {report['policy']}")
        print(f"verdict   REFUSED ({report['code']}): {report['reason']}")
        return
    weak = "  (software vTPM: proves nothing about the host)" if report["class"] == "weak" else ""
    print(f"node      {report['node_id']}")
    print(f"class     {report['class']}{weak}")
    print(f"zone      {report['zone']}")
    print(f"issued    {report['issued']}")
    _print_state(report["state"])
    for index, value in report["pcrs"].items():
        print(f"PCR {index:<5} {value}")
    for warning in report["warnings"]:
        print(f"warning   {warning}")
    print(f"policy    {report['policy']}")
    print("verdict   ACCEPTED")


def verify(target: str, policy_path: Optional[Path], config: NodeConfig, as_json: bool,
           allow_weak: bool = False) -> int:
    """Connect to HOST:PORT, verify its evidence under a policy, print what was proven."""
    try:
        if policy_path and allow_weak:
            raise ValueError("--allow-weak is for the built-in policy; a policy file says "
                             "which classes it allows (allowed_classes)")
        address = parse_target(target)
        policy = load_policy(policy_path) if policy_path else default_policy(config, allow_weak)
        verifier = Verifier(policy)
    except (ValueError, VerificationError) as error:  # PolicyError is a ValueError
        print(f"statemesh-node: {error}", file=sys.stderr)
        return 2
    source = _policy_source(policy_path, allow_weak)
    try:
        connection = atls.connect(address, verifier, atls.TlsIdentity.generate("verifier"),
                                  timeout=VERIFY_TIMEOUT)
    except VerificationError as error:
        report: Dict[str, Any] = {"verdict": "refused", "code": error.code, "reason": str(error),
                                  "policy": source}
    else:
        assert connection.peer is not None
        report = _report(connection.peer, source)
        connection.close()
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_report(report)
    return 0 if report["verdict"] == "accepted" else 1
