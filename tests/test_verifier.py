"""The verifier against evidence from real swtpm TPMs: one good path, one error per attack."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from statemesh.attest import endpoint, evidence, nodestate
from statemesh.attest.attester import Attester
from statemesh.attest.evidence import NodeState, StateCheck
from statemesh.attest.refusals import (
    AkNotBound, ClaimsNotSigned, ClassRefused, EkChainInvalid, EkUntrusted, NodeNotReady,
    NonceMismatch, PcrDigestMismatch, PcrPolicyViolation, SessionMismatch, SignatureInvalid,
    StaleEvidence, StaleNodeState, TlsKeyMismatch, ZoneRefused,
)
from statemesh.attest.tpm import TpmError
from statemesh.attest.verifier import (
    Expected, PcrExpectation, PolicyError, Verifier, load_policy, parse_policy,
)
from tests.attest_fixtures import (PCRS, TpmWorld, attest, expected, full_check, policy,
                                   ready_state, world)

__all__ = ["world"]


@pytest.fixture
def node(world: TpmWorld) -> Attester:
    return Attester(world.trusted, "tpm", "eu-west", PCRS, world.node_ca_dir,
                    node_state=ready_state)


def test_good_evidence_is_accepted_with_its_claims(world: TpmWorld, node: Attester) -> None:
    verifier = Verifier(policy(world.ca_dir))
    want = expected()
    data = attest(node, want)
    verdict = verifier.check(data, want)
    assert (verdict.evidence.security_class, verdict.evidence.zone) == ("tpm", "eu-west")
    assert [i for i, _ in verdict.evidence.pcr_values] == list(PCRS)
    challenge = verifier.challenge(verdict)
    assert challenge is not None
    verifier.confirm(challenge, node.activate(challenge.blob, challenge.encrypted_secret))
    assert verifier.challenge(verdict) is None  # the activated AK is remembered


def test_forged_signature_is_rejected(world: TpmWorld, node: Attester) -> None:
    want = expected()
    ev = evidence.decode(attest(node, want))
    signature = bytearray(ev.signature)
    signature[-1] ^= 0x01
    forged = evidence.encode(dataclasses.replace(ev, signature=bytes(signature)))
    with pytest.raises(SignatureInvalid):
        Verifier(policy(world.ca_dir)).check(forged, want)


def test_claims_changed_after_quoting_are_rejected(world: TpmWorld, node: Attester) -> None:
    want = expected()
    ev = evidence.decode(attest(node, want))
    relabelled = evidence.encode(dataclasses.replace(ev, zone="us-east"))
    with pytest.raises(ClaimsNotSigned):
        Verifier(policy(world.ca_dir)).check(relabelled, want)


def test_a_state_changed_after_quoting_is_rejected(world: TpmWorld, node: Attester) -> None:
    """A relay cannot turn a node's "not ready" into "ready": the state is a signed claim."""
    want = expected()
    ev = evidence.decode(attest(node, want))
    refused = dataclasses.replace(ev.node_state, installed=False)
    with pytest.raises(ClaimsNotSigned):
        Verifier(policy(world.ca_dir)).check(
            evidence.encode(dataclasses.replace(ev, node_state=refused)), want)


def _node_in_state(world: TpmWorld, state: NodeState) -> Attester:
    return Attester(world.trusted, "tpm", "eu-west", PCRS, world.node_ca_dir,
                    node_state=lambda: state)


def test_a_node_that_is_not_ready_is_refused_naming_why(world: TpmWorld) -> None:
    """A refused or failed installation, or a guarantee that fails: the node answers, signed,
    and the default policy refuses it with each failing check; an inspecting policy
    (require_ready false) accepts it with the same reasons as a warning. (Its states carry
    two checks: the policies here require no others.)"""
    now = int(time.time())
    state = NodeState(now, False, "0.1.0",
                      (StateCheck("installation", False, "not installed (preflight-refused)"),
                       StateCheck("ssh", False, "ssh.service is not masked")), ())
    node = _node_in_state(world, state)
    want = expected()
    data = attest(node, want)
    two_checks = policy(world.ca_dir, required_checks=frozenset())
    with pytest.raises(NodeNotReady) as refused:
        Verifier(two_checks).check(data, want)
    assert str(refused.value) == ("not ready: not installed; installation: not installed "
                                  "(preflight-refused); ssh: ssh.service is not masked")
    assert refused.value.code == "not-ready"
    inspecting = dataclasses.replace(two_checks, require_ready=False)
    verdict = Verifier(inspecting).check(data, want)
    assert verdict.warnings[0].startswith("node not ready: not installed; installation:")
    assert verdict.as_dict()["state"]["ready"] is False
    holding = dataclasses.replace(state, installed=True,
                                  checks=(StateCheck("ssh", True, "masked"),
                                          StateCheck("firewall", False, "ufw is inactive")))
    with pytest.raises(NodeNotReady, match="^not ready: firewall: ufw is inactive$"):
        Verifier(two_checks).check(attest(_node_in_state(world, holding), want), want)


def test_a_node_whose_status_leaves_a_check_out_is_refused_naming_it(
        world: TpmWorld, capsys: pytest.CaptureFixture) -> None:
    """An older or altered package's status without the firewall line, every other holding:
    not a node whose every guarantee holds. A policy may list the checks it requires."""
    state = dataclasses.replace(ready_state(), checks=tuple(
        check for check in ready_state().checks if check.name != "firewall"))
    want = expected()
    data = attest(_node_in_state(world, state), want)
    with pytest.raises(NodeNotReady, match="^not ready: not checked: firewall$"):
        Verifier(policy(world.ca_dir)).check(data, want)
    fewer = policy(world.ca_dir, required_checks=frozenset({"installation", "ssh"}))
    assert not Verifier(fewer).check(data, want).warnings
    inspecting = Verifier(policy(world.ca_dir, require_ready=False)).check(data, want)
    assert list(inspecting.warnings) == ["node not ready: not checked: firewall"]
    # What an inspecting verifier prints and reports: not ready, though the node says it is.
    reported = inspecting.as_dict()["state"]
    assert reported["ready"] is False and reported["unchecked"] == ["firewall"]
    endpoint._print_state(reported)
    printed = capsys.readouterr().out
    assert printed.startswith("state     NOT READY (checked "), printed
    assert "unchecked firewall: required by the policy" in printed, printed


@pytest.mark.parametrize("checked_before_issue", [121, -5])
def test_a_state_checked_too_long_before_signing_or_after_is_refused(
        world: TpmWorld, checked_before_issue: int) -> None:
    now = int(time.time())
    state = dataclasses.replace(ready_state(), checked=now - checked_before_issue)
    node = Attester(world.trusted, "tpm", "eu-west", PCRS, world.node_ca_dir,
                    node_state=lambda: state, clock=lambda: float(now))
    want = expected()
    with pytest.raises(StaleNodeState, match="checked -?[0-9]+ s before its evidence"):
        Verifier(policy(world.ca_dir), clock=lambda: float(now)).check(attest(node, want), want)
    relaxed = Verifier(policy(world.ca_dir, max_state_age=600), clock=lambda: float(now))
    if checked_before_issue > 0:
        relaxed.check(attest(node, want), want)  # within the policy's own bound


def test_ak_of_another_tpm_beside_a_trusted_ek_fails_activation(world: TpmWorld) -> None:
    """A bare TPM's AK presented with the trusted TPM's EK certificate and EK."""
    impostor = Attester(world.bare, "weak", "eu-west", PCRS, world.node_ca_dir,
                        node_state=ready_state)
    honest = Attester(world.trusted, "tpm", "eu-west", PCRS, world.node_ca_dir,
                      node_state=ready_state)
    impostor.security_class = "tpm"
    impostor.ek_chain = honest.ek_chain
    impostor.tpm = _WithEk(world.bare, world.trusted.ek_public())
    verifier = Verifier(policy(world.ca_dir))
    want = expected()
    verdict = verifier.check(attest(impostor, want), want)  # every signature is genuine
    challenge = verifier.challenge(verdict)
    assert challenge is not None
    with pytest.raises(TpmError):
        world.bare.activate_credential(challenge.blob, challenge.encrypted_secret)
    with pytest.raises(AkNotBound):
        verifier.confirm(challenge, bytes(32))


class _WithEk:
    """A TPM that claims another TPM's EK public area (what an impostor would send)."""

    def __init__(self, tpm: object, ek_public: bytes):
        self._tpm = tpm
        self._ek_public = ek_public

    def ek_public(self) -> bytes:
        return self._ek_public

    def __getattr__(self, name: str) -> object:
        return getattr(self._tpm, name)


def test_replayed_evidence_is_rejected(world: TpmWorld, node: Attester) -> None:
    old = expected()
    data = attest(node, old)
    new = dataclasses.replace(old, nonce=Verifier.fresh_nonce())
    with pytest.raises(NonceMismatch):
        Verifier(policy(world.ca_dir)).check(data, new)


def test_evidence_relayed_through_another_tls_key_is_rejected(world: TpmWorld, node: Attester) -> None:
    node_side = expected()
    data = attest(node, node_side)
    verifier_side = dataclasses.replace(node_side, tls_spki_sha256=bytes(32))
    with pytest.raises(TlsKeyMismatch):
        Verifier(policy(world.ca_dir)).check(data, verifier_side)


def test_evidence_relayed_through_another_session_is_rejected(world: TpmWorld, node: Attester) -> None:
    """Even with the node's own TLS key (leaked), another session has another exporter."""
    node_side = expected()
    data = attest(node, node_side)
    verifier_side = dataclasses.replace(node_side, session_binding=bytes(32))
    with pytest.raises(SessionMismatch):
        Verifier(policy(world.ca_dir)).check(data, verifier_side)


def test_changed_pcr_value_is_rejected(world: TpmWorld, node: Attester) -> None:
    want = expected()
    ev = evidence.decode(attest(node, want))
    values = list(ev.pcr_values)
    values[7] = (7, b"\x11" * 32)
    changed = evidence.encode(dataclasses.replace(ev, pcr_values=tuple(values)))
    with pytest.raises(PcrDigestMismatch):
        Verifier(policy(world.ca_dir)).check(changed, want)


def test_pcr_policy_enforced_and_warn_only(world: TpmWorld, node: Attester) -> None:
    want = expected()
    data = attest(node, want)
    actual = dict(evidence.decode(data).pcr_values)
    wrong = PcrExpectation(b"\x22" * 32, enforce=False)
    warn = Verifier(policy(world.ca_dir, pcrs={0: PcrExpectation(actual[0], True), 7: wrong}))
    assert len(warn.check(data, want).warnings) == 1
    enforce = Verifier(policy(world.ca_dir, pcrs={7: dataclasses.replace(wrong, enforce=True)}))
    with pytest.raises(PcrPolicyViolation):
        enforce.check(data, want)


def test_a_boot_loader_pcr_left_uncovered_is_named(world: TpmWorld, node: Attester) -> None:
    """PCR 8 carries the kernel command line where GRUB measures it: a node that quotes it
    extended gets no word; one whose quote leaves PCRs 8 and 9 out (or, in the VM suite,
    whose hypervisor booted the kernel itself) is named. A weak node's vTPM measures no
    boot: its class says so."""
    want = expected()
    verifier = Verifier(policy(world.ca_dir))
    assert verifier.check(attest(node, want), want).warnings == ()
    firmware_only = Attester(world.trusted, "tpm", "eu-west", PCRS[:8], world.node_ca_dir,
                             node_state=ready_state)
    assert verifier.check(attest(firmware_only, want), want).warnings == (
        "PCR 8 (the kernel command line and GRUB's commands) was not quoted "
        "(Attestation-PCRs leaves it out)",
        "PCR 9 (the kernel and initrd GRUB read) was not quoted "
        "(Attestation-PCRs leaves it out)")
    weak = Attester(world.bare, "weak", "eu-west", PCRS, world.node_ca_dir,
                    node_state=ready_state)
    assert verifier.check(attest(weak, want), want).warnings == ()


def test_ek_outside_trusted_cas_is_rejected(world: TpmWorld, node: Attester) -> None:
    want = expected()
    with pytest.raises(EkUntrusted):
        Verifier(policy(world.foreign_ca_dir)).check(attest(node, want), want)


def test_weak_node_under_a_policy_refusing_weak(world: TpmWorld) -> None:
    weak = Attester(world.bare, "weak", "eu-west", PCRS, world.node_ca_dir,
                    node_state=ready_state)
    want = expected()
    data = attest(weak, want)
    full_check(Verifier(policy(world.ca_dir)), weak, data, want)  # accepted when allowed
    with pytest.raises(ClassRefused):
        Verifier(policy(world.ca_dir, allowed_classes=frozenset({"tpm"}))).check(data, want)


def test_zone_and_age_policies(world: TpmWorld, node: Attester) -> None:
    want = expected()
    data = attest(node, want)
    with pytest.raises(ZoneRefused):
        Verifier(policy(world.ca_dir, zones=frozenset({"us-east"}))).check(data, want)
    issued = evidence.decode(data).issued
    late = Verifier(policy(world.ca_dir, max_age=60), clock=lambda: issued + 61.0)
    with pytest.raises(StaleEvidence):
        late.check(data, want)


def test_each_rejection_has_its_own_code() -> None:
    classes = [AkNotBound, ClaimsNotSigned, ClassRefused, EkUntrusted, NodeNotReady,
               NonceMismatch, PcrDigestMismatch, PcrPolicyViolation, SessionMismatch,
               SignatureInvalid, StaleEvidence, StaleNodeState, TlsKeyMismatch, ZoneRefused]
    assert len({c.code for c in classes}) == len(classes)


@pytest.mark.parametrize("document, complaint", [
    ({}, "empty policy"),
    ({"allowed_classes": [], "zones": "*"}, "allowed_classes"),
    ({"allowed_classes": ["tpm"]}, "zones"),
    ({"allowed_classes": ["tpm"], "zones": "*", "surprise": 1}, "unknown keys"),
    ({"allowed_classes": ["tpm"], "zones": "*", "pcrs": {"7": {"sha256": "ab"}}}, "64 hex"),
    ({"allowed_classes": ["tpm"], "zones": "*", "pcrs": {"7": {"sha256": "00" * 32,
                                                                 "mode": "maybe"}}}, "mode"),
    ({"allowed_classes": ["gold"], "zones": "*"}, "allowed_classes"),
    ({"allowed_classes": ["tpm"], "zones": "*", "max_age_seconds": 0}, "max_age_seconds"),
    ({"allowed_classes": ["tpm"], "zones": "*", "require_ready": "no"}, "require_ready"),
    ({"allowed_classes": ["tpm"], "zones": "*", "max_state_age_seconds": True},
     "max_state_age_seconds"),
    ({"allowed_classes": ["tpm"], "zones": "*", "required_checks": "ssh"}, "required_checks"),
    ({"allowed_classes": ["tpm"], "zones": "*", "required_checks": ["ssh", ""]},
     "required_checks"),
    ({"allowed_classes": ["tpm"], "zones": "*", "required_checks": ["Firewall"]},
     "required_checks"),
])
def test_bad_policies_are_refused(document: object, complaint: str) -> None:
    with pytest.raises(PolicyError, match=complaint):
        parse_policy(document)


def test_policy_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({
        "allowed_classes": ["tpm"], "zones": ["eu-west"], "ek_ca_dir": "/srv/ca",
        "max_age_seconds": 30, "pcrs": {"7": {"sha256": "ab" * 32, "mode": "warn"}},
    }))
    loaded = load_policy(path)
    assert loaded.zones == frozenset({"eu-west"}) and loaded.max_age == 30
    assert loaded.require_ready and loaded.max_state_age == 120  # the defaults
    path.write_text(json.dumps({"allowed_classes": ["weak"], "zones": "*",
                                "require_ready": False, "max_state_age_seconds": 45}))
    inspecting = load_policy(path)
    assert not inspecting.require_ready and inspecting.max_state_age == 45
    assert loaded.required_checks == frozenset(nodestate.STATUS_CHECKS)  # the default
    path.write_text(json.dumps({"allowed_classes": ["tpm"], "zones": "*",
                                "required_checks": ["installation", "firewall"]}))
    assert load_policy(path).required_checks == frozenset({"installation", "firewall"})
    assert loaded.pcrs[7] == PcrExpectation(bytes.fromhex("ab" * 32), enforce=False)
    path.write_text("")
    with pytest.raises(PolicyError, match="not JSON"):
        load_policy(path)
    with pytest.raises(PolicyError, match="cannot be read"):
        load_policy(tmp_path / "absent.json")


def test_expected_is_what_the_connection_knows() -> None:
    assert {f.name for f in dataclasses.fields(Expected)} == {
        "nonce", "tls_spki_sha256", "session_binding"}


def test_ek_certificate_of_another_tpm_is_rejected_even_after_caching(world: TpmWorld,
                                                                      node: Attester) -> None:
    """A bare TPM sending the trusted TPM's EK certificate beside its own EK, to a verifier
    that has just accepted (and cached) that certificate chain."""
    verifier = Verifier(policy(world.ca_dir))
    want = expected()
    verifier.check(attest(node, want), want)
    impostor = Attester(world.bare, "weak", "eu-west", PCRS, world.ca_dir, node_state=ready_state)
    impostor.security_class, impostor.ek_chain = "tpm", node.ek_chain
    with pytest.raises(EkChainInvalid, match="another key"):
        verifier.check(attest(impostor, want), want)
