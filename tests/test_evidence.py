"""The evidence encoding: canonical round trips and a parser that only ever refuses cleanly."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statemesh.attest import evidence
from statemesh.attest.evidence import Evidence, EvidenceFormatError, NodeState, StateCheck

names = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True)
blobs = st.binary(min_size=1, max_size=300)
digests = st.binary(min_size=32, max_size=32)
pcr_lists = st.lists(st.tuples(st.integers(0, 23), digests), min_size=1, max_size=24,
                     unique_by=lambda item: item[0]).map(lambda items: tuple(sorted(items)))
checks = st.builds(StateCheck, name=st.from_regex(r"[a-z][a-z0-9_]{0,31}", fullmatch=True),
                   holds=st.booleans(), detail=st.from_regex(r"[ -~]{0,60}", fullmatch=True))
states = st.builds(
    NodeState, checked=st.integers(0, 2**63 - 1), installed=st.booleans(),
    package_version=st.from_regex(r"[A-Za-z0-9.+~:-]{0,64}", fullmatch=True),
    checks=st.lists(checks, max_size=5).map(tuple),
    exempt_units=st.lists(st.from_regex(r"[A-Za-z0-9:_.@\\-]{1,40}", fullmatch=True),
                          max_size=3).map(tuple),
)
evidences = st.builds(
    Evidence, node_id=names, zone=names, security_class=st.sampled_from(["tpm", "weak"]),
    issued=st.integers(0, 2**63 - 1), nonce=digests, tls_spki_sha256=digests,
    session_binding=digests, node_state=states, ak_public=blobs, ek_public=blobs, quote=blobs,
    signature=blobs, pcr_values=pcr_lists, ek_chain=st.lists(blobs, max_size=4).map(tuple),
)
READY = NodeState(1_699_999_990, True, "0.1.0", (StateCheck("ssh", True, "masked"),),
                  ("sm-runtime.service",))


@given(evidences)
def test_round_trip_is_exact(ev: Evidence) -> None:
    data = evidence.encode(ev)
    assert evidence.decode(data) == ev
    assert evidence.encode(evidence.decode(data)) == data


@given(st.binary(max_size=400))
def test_arbitrary_bytes_are_refused_cleanly(data: bytes) -> None:
    try:
        evidence.decode(data)
    except EvidenceFormatError:
        return
    assert evidence.encode(evidence.decode(data)) == data


# No deadline: a test asserts behaviour, never speed (a loaded machine made examples slow).
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(evidences, st.data())
def test_mutations_are_refused_or_canonical(ev: Evidence, data: st.DataObject) -> None:
    """Flip, insert or delete bytes anywhere: only a clean refusal or another canonical form."""
    encoded = bytearray(evidence.encode(ev))
    position = data.draw(st.integers(0, len(encoded) - 1))
    operation = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
    if operation == "flip":
        encoded[position] ^= data.draw(st.integers(1, 255))
    elif operation == "insert":
        encoded[position:position] = data.draw(st.binary(min_size=1, max_size=4))
    elif operation == "delete":
        del encoded[position]
    else:
        del encoded[position:]
    try:
        decoded = evidence.decode(bytes(encoded))
    except EvidenceFormatError:
        return
    assert evidence.encode(decoded) == bytes(encoded)


def _sample() -> Evidence:
    return Evidence("node-1", "eu-west", "tpm", 1_700_000_000, b"n" * 32, b"k" * 32, b"s" * 32,
                    READY, b"ak", b"ek", b"quote", b"sig", ((0, b"\0" * 32), (7, b"\7" * 32)),
                    (b"der",))


@pytest.mark.parametrize("change, complaint", [
    (dict(security_class="gold"), "security class"),
    (dict(zone="Upper-Case"), "lower-case"),
    (dict(nonce=b"short"), "exactly 32"),
    (dict(pcr_values=((7, b"\0" * 32), (0, b"\0" * 32))), "increase"),
    (dict(pcr_values=()), "between 1 and 24"),
    (dict(ek_chain=(b"x",) * 5), "more than 4"),
    (dict(quote=b""), "1 to 1024"),
    (dict(issued=-1), "not a time"),
    (dict(node_state=None), "node state is missing"),
    (dict(node_state=dataclasses.replace(READY, package_version="0.1 beta")), "package version"),
    (dict(node_state=dataclasses.replace(READY, checks=(StateCheck("SSH", True, ""),))),
     "check name"),
    (dict(node_state=dataclasses.replace(READY, checks=(StateCheck("ssh", True, "\n"),))),
     "check detail"),
    (dict(node_state=dataclasses.replace(READY, checks=(StateCheck("ssh", 1, ""),))),
     "not a flag"),
    (dict(node_state=dataclasses.replace(READY, exempt_units=("a b.service",))), "exempt unit"),
    (dict(node_state=dataclasses.replace(READY, checks=(READY.checks[0],) * 33)), "more than 32"),
])
def test_out_of_format_values_are_refused_at_encoding(change: dict, complaint: str) -> None:
    with pytest.raises(EvidenceFormatError, match=complaint):
        evidence.encode(dataclasses.replace(_sample(), **change))


def test_non_canonical_and_foreign_inputs_are_refused() -> None:
    data = evidence.encode(_sample())
    with pytest.raises(EvidenceFormatError, match="magic"):
        evidence.decode(b"XXXX" + data[4:])
    with pytest.raises(EvidenceFormatError, match="version"):
        evidence.decode(data[:4] + b"\x01" + data[5:])  # version 1 had no node state
    with pytest.raises(EvidenceFormatError, match="after the last field"):
        evidence.decode(data + b"\0")
    swapped = data[:5] + struct.pack(">BH", 2, 6) + b"node-1" + data[5 + 3 + 6:]
    with pytest.raises(EvidenceFormatError, match="where field 1"):
        evidence.decode(swapped)
    with pytest.raises(EvidenceFormatError, match="exceeds"):
        evidence.decode(data + b"\0" * evidence.MAX_SIZE)


def test_claims_digest_covers_each_claim_and_nothing_else() -> None:
    base = _sample()
    digest = base.claims_digest()
    for change in [dict(node_id="node-2"), dict(zone="us-east"), dict(security_class="weak"),
                   dict(issued=1), dict(nonce=b"N" * 32), dict(tls_spki_sha256=b"K" * 32),
                   dict(session_binding=b"S" * 32)]:
        assert dataclasses.replace(base, **change).claims_digest() != digest
    assert dataclasses.replace(base, quote=b"other", signature=b"x").claims_digest() == digest


def test_readiness_is_installed_and_every_check_holding() -> None:
    assert READY.ready and READY.failing() == []
    failing = dataclasses.replace(READY, checks=(StateCheck("ssh", True, "masked"),
                                                 StateCheck("firewall", False, "ufw is off")))
    assert not failing.ready and failing.failing() == ["firewall: ufw is off"]
    refused = dataclasses.replace(READY, installed=False)
    assert not refused.ready and refused.failing() == ["not installed"]
    unchecked = dataclasses.replace(READY, checks=())
    assert not unchecked.ready and unchecked.failing() == ["nothing was checked"]


def test_the_node_state_is_signed_with_the_claims() -> None:
    """Changing the state changes the quote's qualifying data: it cannot be swapped."""
    sample = _sample()
    changed = dataclasses.replace(sample, node_state=dataclasses.replace(READY, installed=False))
    assert changed.claims_digest() != sample.claims_digest()
    assert dataclasses.replace(sample, quote=b"other").claims_digest() == sample.claims_digest()
