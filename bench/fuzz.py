"""Mutation fuzzing of the verifier: every mutated evidence must be refused cleanly.

    /usr/bin/python3 -m bench.fuzz [--n 100000] [--seed 1]

Takes one genuine evidence from a swtpm (a `tpm`-class node whose EK chains to a private
test CA, so the unmutated evidence is accepted) and feeds Verifier.check N mutations of
it: byte flips, insertions, deletions, truncations, splices, and structure-aware changes
that re-encode the evidence canonically with one field replaced (random or shifted TPM
structures, swapped certificates, other PCR values). The only acceptable outcome is a
VerificationError; anything else (another exception, or an acceptance) is counted and shown.
The last line: `fuzz mutated=<n> rejected=<r> accepted=<a> crashed=<c> seconds=<s>`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import random
import secrets
import shutil
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Counter, List

from harness.nodestates import installed_node_state
from harness.swtpm import SwTpm, provision_with_ca
from statemesh.attest import evidence
from statemesh.attest.attester import Attester
from statemesh.attest.refusals import VerificationError
from statemesh.attest.evidence import Evidence
from statemesh.attest.tpm import open_tpm
from statemesh.attest.verifier import Expected, Policy, Verifier

PCRS = (0, 1, 2, 3, 4, 5, 6, 7)
_TPM_FIELDS = ("ak_public", "ek_public", "quote", "signature")


def _byte_level(rng: random.Random, data: bytes) -> bytes:
    mutated = bytearray(data)
    operation = rng.randrange(5)
    position = rng.randrange(len(mutated))
    if operation == 0:
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
    elif operation == 1:
        mutated[position:position] = rng.randbytes(rng.randint(1, 16))
    elif operation == 2:
        del mutated[position:position + rng.randint(1, 16)]
    elif operation == 3:
        del mutated[position:]
    else:
        other = rng.randrange(len(mutated))
        mutated[position:position + 8] = mutated[other:other + 8]
    return bytes(mutated)


def _field_level(rng: random.Random, ev: Evidence) -> bytes:
    """Canonical encodings with one field changed: these reach the verifier's deeper checks."""
    choice = rng.randrange(6)
    if choice == 0:
        name = rng.choice(_TPM_FIELDS)
        value = bytearray(getattr(ev, name))
        value[rng.randrange(len(value))] ^= 1 << rng.randrange(8)
        changed = dataclasses.replace(ev, **{name: bytes(value)})
    elif choice == 1:
        name = rng.choice(_TPM_FIELDS)
        value = getattr(ev, name)
        cut = rng.randrange(1, len(value))
        changed = dataclasses.replace(ev, **{name: value[:cut] + rng.randbytes(rng.randint(0, 4))})
    elif choice == 2:
        first, second = rng.sample(_TPM_FIELDS, 2)
        changed = dataclasses.replace(ev, **{first: getattr(ev, second)})
    elif choice == 3:
        index = rng.randrange(len(ev.pcr_values))
        values = list(ev.pcr_values)
        values[index] = (values[index][0], rng.randbytes(32))
        changed = dataclasses.replace(ev, pcr_values=tuple(values))
    elif choice == 4:
        chain = list(ev.ek_chain)
        if rng.random() < 0.5:
            rng.shuffle(chain)
        else:
            der = bytearray(chain[0])
            der[rng.randrange(len(der))] ^= 1 << rng.randrange(8)
            chain[0] = bytes(der)
        changed = dataclasses.replace(ev, ek_chain=tuple(chain))
    else:
        changed = dataclasses.replace(ev, security_class="weak" if ev.security_class == "tpm"
                                      else "tpm", issued=ev.issued + rng.randint(-5, 5))
    return evidence.encode(changed)


def _field_or_byte_level(rng: random.Random, ev: Evidence, genuine: bytes) -> bytes:
    try:
        return _field_level(rng, ev)
    except evidence.EvidenceFormatError:  # a change the format cannot even express
        return _byte_level(rng, genuine)


def run(verifier: Verifier, genuine: bytes, want: Expected, n: int, seed: int) -> int:
    rng = random.Random(seed)
    ev = evidence.decode(genuine)
    mutators: List[Callable[[], bytes]] = [lambda: _byte_level(rng, genuine),
                                           lambda: _field_or_byte_level(rng, ev, genuine)]
    codes: Counter[str] = collections.Counter()
    accepted = crashed = mutated = 0
    start = time.monotonic()
    while mutated < n:
        data = rng.choice(mutators)()
        if data == genuine:
            continue
        mutated += 1
        try:
            verifier.check(data, want)
        except VerificationError as error:
            codes[error.code] += 1
            continue
        except Exception:  # what the fuzzer is looking for
            crashed += 1
            if crashed <= 5:
                traceback.print_exc()
            continue
        accepted += 1
        if accepted <= 5:
            changed = [f.name for f in dataclasses.fields(ev)
                       if getattr(ev, f.name) != getattr(evidence.decode(data), f.name)]
            print(f"ACCEPTED a mutation of {changed or 'the encoding only'}: {data.hex()}")
    seconds = time.monotonic() - start
    for code, count in codes.most_common():
        print(f"  {code:<16} {count}")
    print(f"fuzz mutated={mutated} rejected={sum(codes.values())} accepted={accepted} "
          f"crashed={crashed} seconds={seconds:.1f}")
    return 0 if accepted == crashed == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="mutated evidences")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    # Mutated certificates make cryptography warn (negative serials...): the count says enough.
    warnings.simplefilter("ignore")
    work = Path(tempfile.mkdtemp(prefix="bench-fuzz-"))
    sw = None
    try:
        root = provision_with_ca(work / "state", work / "ca")
        ca_dir = work / "ca.d"
        ca_dir.mkdir()
        shutil.copy(root, ca_dir)
        shutil.copy(root.parent / "issuercert.pem", ca_dir)
        sw = SwTpm(work / "state")
        want = Expected(*(secrets.token_bytes(32) for _ in range(3)))
        with open_tpm(sw.tcti) as tpm:
            attester = Attester(tpm, "tpm", "fuzz", PCRS, ca_dir, node_state=installed_node_state)
            genuine = attester.evidence(want.nonce, want.tls_spki_sha256, want.session_binding)
        verifier = Verifier(Policy(frozenset({"tpm", "weak"}), None, ca_dir))
        verifier.check(genuine, want)  # the starting point is accepted
        print(f"genuine evidence: {len(genuine)} bytes, accepted")
        return run(verifier, genuine, want, args.n, args.seed)
    finally:
        if sw:
            sw.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
