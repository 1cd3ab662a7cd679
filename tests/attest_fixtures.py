"""Session fixtures shared by the attestation tests: real swtpm TPMs and CA directories.

`trusted` has an EK certificate issued by a private CA whose root `ca_dir` trusts (the
node's `node_ca_dir` also holds the issuing CA); `bare` is a
second TPM without any certificate; `foreign_ca_dir` trusts an unrelated CA.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness.nodestates import installed_node_state as ready_state
from harness.swtpm import SwTpm, provision_with_ca
from statemesh.attest.attester import Attester
from statemesh.attest.tpm import Tpm, open_tpm
from statemesh.attest.verifier import Expected, Policy, Verifier

PCRS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)  # statemesh.config's default
# What GRUB's tpm module extends at boot: each command, the kernel command line among them,
# into PCR 8, and each file it reads into PCR 9. The trusted TPM has them, as a node booted
# by Debian's signed GRUB; the bare one has not, as a guest booted by its hypervisor.
BOOT_LOADER_EVENTS = ((8, b"linux /boot/vmlinuz root=LABEL=root ro quiet"), (9, b"/boot/vmlinuz"))


def self_signed_ca(name: str) -> bytes:
    """A throw-away root CA certificate (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.utcnow()
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


@dataclasses.dataclass
class TpmWorld:
    trusted: Tpm
    bare: Tpm
    ca_dir: Path
    node_ca_dir: Path
    foreign_ca_dir: Path


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TpmWorld]:
    base = tmp_path_factory.mktemp("tpm-world")
    root = provision_with_ca(base / "trusted-state", base / "localca")
    ca_dir = base / "ca.d"
    ca_dir.mkdir()
    shutil.copy(root, ca_dir / "root.pem")
    node_ca_dir = base / "node-ca.d"  # the node also holds the issuing CA, to send it along
    node_ca_dir.mkdir()
    shutil.copy(root, node_ca_dir / "root.pem")
    shutil.copy(root.parent / "issuercert.pem", node_ca_dir / "issuing.pem")
    foreign = base / "foreign-ca.d"
    foreign.mkdir()
    (foreign / "other.pem").write_bytes(self_signed_ca("Some Other TPM Vendor CA"))
    trusted_sw, bare_sw = SwTpm(base / "trusted-state"), SwTpm(base / "bare-state")
    measure_boot_loader(trusted_sw.tcti)
    trusted, bare = open_tpm(trusted_sw.tcti), open_tpm(bare_sw.tcti)
    try:
        yield TpmWorld(trusted, bare, ca_dir, node_ca_dir, foreign)
    finally:
        for tpm in (trusted, bare):
            tpm.close()
        for sw in (trusted_sw, bare_sw):
            sw.stop()


def measure_boot_loader(tcti: str) -> None:
    for index, event in BOOT_LOADER_EVENTS:
        subprocess.run(["tpm2_pcrextend", "-T", tcti,
                        f"{index}:sha256={hashlib.sha256(event).hexdigest()}"],
                       check=True, capture_output=True, timeout=30,
                       env={"PATH": "/usr/bin:/bin"})


def policy(ca_dir: Path, **overrides: object) -> Policy:
    values = dict(allowed_classes=frozenset({"tpm", "weak"}), zones=None, ek_ca_dir=ca_dir)
    values.update(overrides)
    return Policy(**values)  # type: ignore[arg-type]


def expected() -> Expected:
    """Binding values of a fictitious connection."""
    return Expected(secrets.token_bytes(32), secrets.token_bytes(32), secrets.token_bytes(32))


def attest(attester: Attester, want: Expected) -> bytes:
    return attester.evidence(want.nonce, want.tls_spki_sha256, want.session_binding)


def full_check(verifier: Verifier, attester: Attester, data: bytes, want: Expected) -> None:
    """Evidence checks, then the credential-activation round trip."""
    verdict = verifier.check(data, want)
    challenge = verifier.challenge(verdict)
    if challenge is not None:
        verifier.confirm(challenge, attester.activate(challenge.blob, challenge.encrypted_secret))
