"""The TPM backends against real swtpm instances, and the EK chain checks against built chains.

`make test` runs this file (and the other attestation tests) once with each backend
(STATEMESH_TPM_BACKEND); `make test-jammy` runs it where tpm2-pytss is absent, as on
Ubuntu 22.04. Tests marked esapi compare the two backends and need tpm2-pytss.
"""

from __future__ import annotations

import datetime
import hashlib
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness.swtpm import SwTpm, provision_with_ca
from statemesh import backend
from statemesh.attest import endpoint, ekchain, nodeclass, tpm, tpm_direct, tpmdevices, tpmwire
from statemesh.attest.credential import seal_credential
from statemesh.attest.refusals import EkChainInvalid, EkUntrusted
from statemesh.attest.tpm import TpmError, open_tpm
from statemesh.config import NodeConfig
from statemesh.guarantees import securityclass
from tests.attest_fixtures import PCRS, TpmWorld, world

__all__ = ["world"]


def test_ek_certificate_chains_to_the_test_ca(world: TpmWorld) -> None:
    certificate = world.trusted.ek_certificate()
    assert certificate is not None
    anchors = ekchain.load_anchors(world.ca_dir)
    chain = [certificate, *ekchain.intermediates_for(certificate, ekchain.load_anchors(world.node_ca_dir))]
    assert len(chain) == 2  # EK certificate and the issuing CA; the root stays with the verifier
    ekchain.verify(chain, anchors)
    with pytest.raises(EkUntrusted):
        ekchain.verify(chain, ekchain.load_anchors(world.foreign_ca_dir))


def test_bare_tpm_has_no_ek_certificate_but_an_ek(world: TpmWorld) -> None:
    assert world.bare.ek_certificate() is None
    ek = tpmwire.parse_public(world.bare.ek_public())
    assert ek.has(tpmwire.RESTRICTED | tpmwire.DECRYPT | tpmwire.FIXED_TPM)


def test_ak_is_a_restricted_signing_key_of_this_tpm(world: TpmWorld) -> None:
    ak = tpmwire.parse_public(world.trusted.ak_public())
    assert ak.has(tpmwire.RESTRICTED | tpmwire.SIGN | tpmwire.FIXED_TPM | tpmwire.FIXED_PARENT)
    assert not ak.attributes & tpmwire.DECRYPT
    assert ak.type == tpmwire.ALG_ECC and ak.scheme == (tpmwire.ALG_ECDSA, tpmwire.ALG_SHA256)
    assert world.trusted.ak_public() != world.bare.ak_public()


def test_ak_is_the_same_after_a_tpm_restart(tmp_path: Path) -> None:
    """The AK is re-derived from the endorsement seed: nothing to store, nothing to steal."""
    seen = []
    for _restart in range(2):
        sw = SwTpm(tmp_path / "state")
        try:
            with open_tpm(sw.tcti) as tpm:
                seen.append((tpm.ak_public(), tpm.node_id()))
        finally:
            sw.stop()
    assert seen[0] == seen[1]


def test_keys_are_flushed_at_close_on_a_tpm_without_resource_manager(tmp_path: Path) -> None:
    """Over swtpm's socket no resource manager flushes a connection's keys, and swtpm
    holds three transient objects: without the flush the second connection's EK fails."""
    sw = SwTpm(tmp_path / "state")
    try:
        for _connection in range(4):
            with open_tpm(sw.tcti) as connection:
                connection.ak_public()
                connection.ek_public()
    finally:
        sw.stop()


def test_the_endpoint_empties_the_vtpm_of_what_killed_endpoints_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sw = SwTpm(tmp_path / "state")
    monkeypatch.setattr(tpmdevices, "VTPM_TCTI", sw.tcti)
    try:
        killed = tpm_direct.DirectTpm(sw.tcti)  # a killed endpoint flushes nothing: its keys stay
        killed.ak_public()
        killed.ek_public()
        killed._transport.close()
        for _activation in range(3):  # nor the policy session of an activation cut short
            killed = tpm_direct.DirectTpm(sw.tcti)
            killed._policy_session()
            killed._transport.close()
        with endpoint._open_vtpm() as opened:
            name = tpmwire.parse_public(opened.ak_public()).name()
            blob, encrypted = seal_credential(opened.ek_public(), name, b"s" * 32)
            assert opened.activate_credential(blob, encrypted) == b"s" * 32
    finally:
        sw.stop()


def test_quote_covers_data_and_pcr_values(world: TpmWorld) -> None:
    data = hashlib.sha256(b"qualifying").digest()
    attest, signature, values = world.trusted.quote(PCRS, data)
    quote = tpmwire.parse_attest(attest)
    assert quote.magic == tpmwire.TPM_GENERATED and quote.extra_data == data
    assert quote.pcr_select == (tpmwire.PcrSelection(tpmwire.ALG_SHA256, PCRS),)
    assert quote.pcr_digest == hashlib.sha256(b"".join(v for _i, v in values)).digest()
    assert tpmwire.parse_signature(signature).alg == tpmwire.ALG_ECDSA


def test_quote_of_more_than_eight_pcrs(world: TpmWorld) -> None:
    _attest, _signature, values = world.trusted.quote(tuple(range(12)), bytes(32))
    assert [i for i, _v in values] == list(range(12))


def test_credential_activation_only_in_the_right_tpm(world: TpmWorld) -> None:
    name = tpmwire.parse_public(world.trusted.ak_public()).name()
    blob, encrypted = seal_credential(world.trusted.ek_public(), name, b"s" * 32)
    assert world.trusted.activate_credential(blob, encrypted) == b"s" * 32
    with pytest.raises(TpmError):
        world.bare.activate_credential(blob, encrypted)
    with pytest.raises(TpmError):
        world.trusted.activate_credential(b"\x00\x05junk!", encrypted)


def test_unreachable_tpm_is_a_clear_error() -> None:
    with pytest.raises(TpmError, match="cannot open the TPM"):
        open_tpm("swtpm:host=127.0.0.1,port=1")


# --- EK chains built here, one defect at a time -------------------------------------------

NOW = datetime.datetime.utcnow()


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: Optional[x509.Certificate],
                 issuer_key: ec.EllipticCurvePrivateKey, ca: bool, path_length: Optional[int] = None,
                 days: int = 30, extra: Optional[x509.ExtensionType] = None,
                 hash_algorithm: hashes.HashAlgorithm = hashes.SHA256()) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]) if subject else x509.Name([])
    builder = (
        x509.CertificateBuilder().subject_name(name)
        .issuer_name(issuer.subject if issuer else name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
    )
    if not subject:
        san = x509.SubjectAlternativeName([x509.DirectoryName(x509.Name(
            [x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.1"), "id:00001014")]))])
        builder = builder.add_extension(san, critical=True)
    if extra is not None:
        builder = builder.add_extension(extra, critical=True)
    return builder.sign(issuer_key, hash_algorithm)


def _der(*certificates: x509.Certificate) -> List[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in certificates]


@pytest.fixture(scope="module")
def keys() -> List[ec.EllipticCurvePrivateKey]:
    return [ec.generate_private_key(ec.SECP256R1()) for _ in range(4)]


def test_three_link_chain_is_accepted(keys: List[ec.EllipticCurvePrivateKey]) -> None:
    root = _certificate("Root", keys[0], None, keys[0], ca=True)
    issuing = _certificate("Issuing", keys[1], root, keys[0], ca=True, path_length=0)
    ek = _certificate("", keys[2], issuing, keys[1], ca=False)
    assert ekchain.verify(_der(ek, issuing), [root]) == ek
    with pytest.raises(EkUntrusted):
        ekchain.verify(_der(ek, issuing), [_certificate("Other", keys[3], None, keys[3], ca=True)])


@pytest.mark.filterwarnings("ignore:SHA1 signatures:UserWarning")
@pytest.mark.parametrize("defect, complaint", [
    ("expired", "not valid at"),
    ("issuer-not-ca", "not a CA"),
    ("path-length", "path length"),
    ("unknown-critical", "unknown critical extension"),
    ("wrong-signer", "not signed by the next"),
    ("sha1", "broken hash"),
    ("no-san", "critical subjectAltName"),
    ("ek-is-ca", "is a CA certificate"),
])
def test_chain_defects_are_refused(keys: List[ec.EllipticCurvePrivateKey], defect: str,
                                   complaint: str) -> None:
    root = _certificate("Root", keys[0], None, keys[0], ca=True,
                        path_length=0 if defect == "path-length" else None)
    middle = _certificate("Middle", keys[1], root, keys[0], ca=defect != "issuer-not-ca")
    issuing = _certificate("Issuing", keys[2], middle, keys[1], ca=True)
    if defect == "no-san":
        ek = _no_san_ek(keys[3], issuing, keys[2])
    else:
        ek = _certificate(
            "", keys[3], issuing, keys[0] if defect == "wrong-signer" else keys[2],
            ca=defect == "ek-is-ca", days=-1 if defect == "expired" else 30,
            extra=x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00")
            if defect == "unknown-critical" else None,
            hash_algorithm=hashes.SHA1() if defect == "sha1" else hashes.SHA256(),
        )
    with pytest.raises(EkChainInvalid, match=complaint):
        ekchain.verify(_der(ek, issuing, middle), [root])


def _no_san_ek(key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate,
               issuer_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return (
        x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(issuer.subject)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .sign(issuer_key, hashes.SHA256())
    )


def test_garbage_and_empty_chains_are_refused() -> None:
    with pytest.raises(EkChainInvalid, match="no EK certificate"):
        ekchain.verify([], [])
    with pytest.raises(EkChainInvalid, match="not valid DER"):
        ekchain.verify([b"\x30\x03\x02\x01\x01"], [])


class _Cryptography42Certificate:
    """The validity of a certificate as cryptography >= 42 (Debian 13) offers it: aware
    *_utc properties, the naive ones deprecated (here: failing)."""

    not_valid_before_utc = datetime.datetime(2030, 1, 1, 12, tzinfo=datetime.timezone.utc)
    not_valid_after_utc = datetime.datetime(2031, 1, 1, 12, tzinfo=datetime.timezone.utc)

    @property
    def not_valid_before(self) -> datetime.datetime:
        raise AssertionError("the deprecated naive property was used")

    not_valid_after = not_valid_before


def test_validity_uses_the_utc_properties_where_cryptography_has_them() -> None:
    assert ekchain.validity(_Cryptography42Certificate()) == (
        datetime.datetime(2030, 1, 1, 12), datetime.datetime(2031, 1, 1, 12))
    assert ekchain.utc_now(0) == datetime.datetime(1970, 1, 1)


def test_ca_directory_with_a_broken_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(EkChainInvalid, match="bad.pem"):
        ekchain.load_anchors(tmp_path)
    assert ekchain.load_anchors(tmp_path / "absent") == []


# --- the security class -------------------------------------------------------------------


def test_no_tpm_device_means_weak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tpmdevices, "DEVICE", tmp_path / "tpmrm0")
    found = nodeclass.classify(NodeConfig())
    assert found.weak and "no TPM device" in found.reason


def test_tpm_class_needs_a_trusted_ek(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TPM device is stood in for by a provisioned swtpm; the CA directory decides."""
    root = provision_with_ca(tmp_path / "state", tmp_path / "ca")
    sw = SwTpm(tmp_path / "state")
    try:
        device = tmp_path / "tpmrm0"
        device.touch()
        monkeypatch.setattr(tpmdevices, "DEVICE", device)
        monkeypatch.setattr(tpmdevices, "DEVICE_TCTI", sw.tcti)
        ca_dir = tmp_path / "ca.d"
        ca_dir.mkdir()
        untrusted = nodeclass.classify(NodeConfig(tpm_ca_dir=ca_dir))
        assert untrusted.weak and "EK not trusted" in untrusted.reason
        shutil.copy(root, ca_dir)
        shutil.copy(root.parent / "issuercert.pem", ca_dir)
        trusted = securityclass.SecurityClass(NodeConfig(tpm_ca_dir=ca_dir)).check()
        assert trusted.holds and trusted.facts["class"] == "tpm"
    finally:
        sw.stop()


def test_weak_class_holds_only_while_the_vtpm_listens(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tpmdevices, "DEVICE", tmp_path / "tpmrm0")
    monkeypatch.setattr(tpmdevices, "VTPM_SOCKET", tmp_path / "tpm.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(tmp_path / "tpm.sock"))
        listener.listen(1)
        running = securityclass.SecurityClass(NodeConfig()).check()
    stopped = securityclass.SecurityClass(NodeConfig()).check()
    assert running.holds and running.facts == {"class": "weak", "reason": running.facts["reason"],
                                               "vtpm": "listening"}
    assert "WEAK" in running.detail
    assert not stopped.holds and "NOT running" in stopped.detail


def test_the_vtpm_tcti_is_the_units_socket() -> None:
    """statemesh-vtpm.service serves swtpm on the socket the endpoint opens, and on no port."""
    unit = (Path(__file__).resolve().parent.parent / "systemd" / "statemesh-vtpm.service").read_text()
    assert f"--server type=unixio,path={tpmdevices.VTPM_SOCKET} " in unit
    assert f"--ctrl type=unixio,path={tpmdevices.VTPM_SOCKET}.ctrl " in unit
    assert tpmdevices.VTPM_TCTI == f"swtpm:path={tpmdevices.VTPM_SOCKET}"
    assert "type=tcp" not in unit and "RestrictAddressFamilies=AF_UNIX\n" in unit


def test_apply_records_the_class(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tpmdevices, "DEVICE", tmp_path / "tpmrm0")
    recorded = []

    class Journal:
        def record(self, event: str, **details: object) -> None:
            recorded.append((event, details))

    securityclass.SecurityClass(NodeConfig()).apply(Journal())
    assert recorded == [("security-class", {"security_class": "weak",
                                            "reason": "no TPM device (" + str(tmp_path / "tpmrm0") + ")"})]


def test_unsigned_parts_of_a_certificate_are_strict(world: TpmWorld) -> None:
    """Found by bench/fuzz: cryptography 38 ignores both the outer AlgorithmIdentifier's
    parameters and the signature's unused-bits count."""
    der = world.trusted.ek_certificate()
    assert der is not None
    outer = der.rfind(bytes.fromhex("300d06092a864886f70d01010b0500"))
    tampered = der[:outer + 13] + b"\x15" + der[outer + 14:]  # NULL -> VideotexString, still empty
    with pytest.raises(EkChainInvalid, match="signature algorithms differ"):
        ekchain.parse([tampered])
    bit_string = len(der) - 385  # the unused-bits byte of the 3072-bit CA's signature
    assert der[bit_string - 4:bit_string + 1] == bytes.fromhex("0382018100")
    with pytest.raises(EkChainInvalid, match="without unused bits"):
        ekchain.parse([der[:bit_string] + b"\x01" + der[bit_string + 1:-1] + bytes([der[-1] & 0xFE])])
    assert ekchain.parse([der])


@pytest.mark.esapi
def test_tpm2_pytss_structures_work_after_unittest_mock_was_imported() -> None:
    """tpm2-pytss 1.2 disables its structures when unittest.mock is loaded first (the VM
    suite's process had it loaded, and MakeCredential broke there): the esapi backend's AK
    template, built after such an import, is still the direct backend's, byte for byte."""
    script = ("import sys, unittest.mock; sys.path.insert(0, sys.argv[1]); "
              "from statemesh.attest import tpm_esapi; "
              "template = tpm_esapi.TPMT_PUBLIC.parse(tpm_esapi.AK_TEMPLATE, "
              "objectAttributes=tpm_esapi.AK_ATTRIBUTES); "
              "sys.stdout.write(template.marshal().hex())")
    result = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent.parent)],
                            capture_output=True, text=True, check=True)
    assert bytes.fromhex(result.stdout) == tpm_direct.AK_TEMPLATE


# --- the two backends -----------------------------------------------------------------------


@pytest.mark.esapi
def test_the_direct_backends_templates_are_tpm2_pytss_s() -> None:
    """The EK templates (TCG EK Credential Profile L-1 and L-2) as tpm2-pytss builds them."""
    # tpm_esapi first: it imports tpm2-pytss with unittest.mock out of sys.modules (other
    # test modules load mock; tpm2-pytss imported first here would leave its structures
    # empty in this worker for every later test: a failure that came and went with xdist's
    # distribution of the tests)
    from statemesh.attest import tpm_esapi
    from tpm2_pytss.utils import NoSuchIndex  # noqa: I100 - after tpm_esapi, see above

    class NoNv:  # NVReadEK's interface: no certificate, template or nonce in NV
        def __call__(self, index: int) -> bytes:
            raise NoSuchIndex(index)

    for ek_type, direct in zip(tpm_esapi.EK_TYPES, (tpm_direct.EK_RSA2048, tpm_direct.EK_ECC256)):
        _certificate, template = tpm_esapi.create_ek_template(ek_type, NoNv())
        assert template.publicArea.marshal() == direct, ek_type


@pytest.mark.esapi
def test_both_backends_make_the_same_keys_in_the_same_tpm(tmp_path: Path) -> None:
    """A node's identity (node_id, AK) does not change when its backend does; and a quote
    of either backend verifies with the key the other made."""
    from statemesh.attest import tpm_esapi
    provision_with_ca(tmp_path / "state", tmp_path / "ca")
    sw = SwTpm(tmp_path / "state")
    seen = []
    try:
        for backend in (tpm_esapi.EsapiTpm, tpm_direct.DirectTpm):
            with backend(sw.tcti) as opened:
                seen.append((opened.ek_certificate(), opened.ek_public(), opened.ak_public(),
                             opened.node_id()))
    finally:
        sw.stop()
    assert seen[0] == seen[1] and seen[0][0] is not None


def test_the_backend_is_chosen_by_the_test_variable_or_what_is_installed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tpm.BACKEND_VARIABLE, "tpm2-tools")
    with pytest.raises(TpmError, match="not one of esapi, direct"):
        tpm.open_tpm("device:/nonexistent")
    monkeypatch.delenv(tpm.BACKEND_VARIABLE)
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TpmError, match="cannot open the TPM at device:/nonexistent"):
        tpm.open_tpm("device:/nonexistent")  # Ubuntu 22.04: no python3-tpm2-pytss, direct
    assert tpm.chosen_backend() == "direct"


def test_an_ecc_ek_seals_and_activates(tmp_path: Path) -> None:
    """A TPM whose EK certificate is ECC P-256: the verifier's ECDH-based MakeCredential."""
    sw = SwTpm(tmp_path / "state")
    try:
        with tpm_direct.DirectTpm(sw.tcti) as opened:
            opened._ek_template = (None, tpm_direct.EK_ECC256)
            ek = tpmwire.parse_public(opened.ek_public())
            assert ek.type == tpmwire.ALG_ECC and ek.curve == tpmwire.ECC_NIST_P256
            name = tpmwire.parse_public(opened.ak_public()).name()
            blob, encrypted = seal_credential(opened.ek_public(), name, b"e" * 32)
            assert opened.activate_credential(blob, encrypted) == b"e" * 32
            other = tpmwire.parse_public(opened.ek_public()).name()  # not the AK's name
            blob, encrypted = seal_credential(opened.ek_public(), other, b"e" * 32)
            with pytest.raises(TpmError):
                opened.activate_credential(blob, encrypted)
    finally:
        sw.stop()


def test_a_direct_response_error_says_what_failed_and_where() -> None:
    with pytest.raises(tpm_direct.TpmResponseError, match=r"TPM quote failed: auth fail \(session 1; response code 0x98e\)"):
        tpm_direct.response(struct.pack(">HII", 0x8001, 10, 0x98E), "quote")
    with pytest.raises(TpmError, match="says 20 bytes, 12 came"):
        tpm_direct.response(struct.pack(">HII", 0x8001, 20, 0) + b"ab", "quote")
    with pytest.raises(TpmError, match="a 3-byte response"):
        tpm_direct.response(b"abc", "quote")
    handles, reader = tpm_direct.response(
        struct.pack(">HIIIIH", 0x8002, 24, 0, 0x80000001, 2, 7) + bytes(4), "key creation", 1)
    assert handles == [0x80000001] and reader.u16() == 7
    with pytest.raises(TpmError, match="PCR 24 is outside 0-23"):
        tpm_direct.pcr_selection([24])


def test_the_direct_backend_opens_only_the_node_s_tctis() -> None:
    with pytest.raises(TpmError, match="device: and swtpm: TCTIs only"):
        tpm_direct.DirectTpm("mssim:host=localhost")
    with pytest.raises(TpmError, match="cannot open the TPM at device:/nonexistent"):
        tpm_direct.DirectTpm("device:/nonexistent")


def test_a_credential_longer_than_a_tpm_takes_never_reaches_the_vtpm(world: TpmWorld) -> None:
    """Any aTLS client sends the challenge the node activates. swtpm answers a command of
    more than 4096 bytes twice; on the direct backend that desynchronised the connection and
    left each activation's policy session behind, until swtpm had no session left."""
    name = tpmwire.parse_public(world.trusted.ak_public()).name()
    blob, encrypted = seal_credential(world.trusted.ek_public(), name, b"s" * 32)
    oversized = struct.pack(">H", 4998) + bytes(4998)
    for _attempt in range(4):
        with pytest.raises(TpmError, match="credential"):  # refused, by either backend
            world.trusted.activate_credential(oversized, encrypted)
    assert world.trusted.activate_credential(blob, encrypted) == b"s" * 32


def test_an_ek_made_from_its_makers_nonce_is_refused_by_the_direct_backend(tmp_path: Path) -> None:
    """tpm2-pytss puts the EK nonce of NV 0x01c00003 into the EK's template, and the
    certificate certifies that EK; the direct backend would make another, so it says so."""
    provision_with_ca(tmp_path / "state", tmp_path / "ca")
    sw = SwTpm(tmp_path / "state")
    try:
        subprocess.run(["tpm2_nvdefine", "-T", sw.tcti, "-C", "o", "-s", "16", "0x01c00003"],
                       check=True, capture_output=True, env={"PATH": "/usr/bin:/bin", "TSS2_LOG": "all+NONE"})
        with tpm_direct.DirectTpm(sw.tcti) as opened:
            for _attempt in range(2):  # and not cached as "no certificate" after the first
                with pytest.raises(TpmError, match="made with its maker's data .NV 0x1c00003."):
                    opened.ek_certificate()
    finally:
        sw.stop()


def test_a_broken_swtpm_connection_is_replaced(tmp_path: Path) -> None:
    sw = SwTpm(tmp_path / "state")
    try:
        with tpm_direct.DirectTpm(sw.tcti) as opened:
            ak = opened.ak_public()
            transport = opened._transport
            assert isinstance(transport, tpm_direct.SocketTransport) and transport._socket
            transport._socket.shutdown(socket.SHUT_RDWR)  # as a timeout or a garbled answer
            with pytest.raises(TpmError):
                opened.quote((0,), bytes(32))
            attest, _signature, _values = opened.quote((0,), bytes(32))  # a new connection
            assert tpmwire.parse_attest(attest).extra_data == bytes(32) and opened.ak_public() == ak
    finally:
        sw.stop()
