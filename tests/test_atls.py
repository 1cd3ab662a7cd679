"""aTLS end to end on loopback with real swtpm TPMs: plain and mutual, relays, limits."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
import types
from pathlib import Path
from typing import Iterator, Optional, Tuple

import pytest
from OpenSSL import SSL, crypto

from statemesh import cli
from statemesh.attest import atls
from statemesh.attest.attester import Attester
from statemesh.attest.refusals import ClassRefused, ProtocolError, SessionMismatch, TlsKeyMismatch
from statemesh.attest.verifier import Verifier
from tests.attest_fixtures import PCRS, TpmWorld, policy, ready_state, world


__all__ = ["world"]

# Tests that open a TLS connection: they need pyOpenSSL on the system's libssl.so.3, where the
# session-ticket switch is called (make test-jammy deselects them: PyPI's cryptography 3.4.8
# carries its own OpenSSL, and its source predates OpenSSL 3, which Ubuntu patches it for).
SYSTEM_LIBSSL = pytest.mark.system_libssl


class Running:
    """An AtlsServer on an ephemeral loopback port, served by a background thread."""

    def __init__(self, server: atls.AtlsServer):
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> Tuple[str, int]:
        return self.server.address

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(10)


@pytest.fixture
def node(world: TpmWorld) -> Attester:
    return Attester(world.trusted, "tpm", "eu-west", PCRS, world.node_ca_dir,
                    node_state=ready_state)


@pytest.fixture
def endpoint(world: TpmWorld, node: Attester) -> Iterator[Running]:
    identity = atls.TlsIdentity.generate(node.node_id)
    running = Running(atls.AtlsServer(("127.0.0.1", 0), node, identity))
    yield running
    running.stop()


def _client() -> atls.TlsIdentity:
    return atls.TlsIdentity.generate("customer")


def _wait_handled(seen: list, count: int) -> None:
    """The server's handler runs after its client has the answer: on a loaded machine it
    may not have run yet when the client returns (seen once in `make test` beside a VM run)."""
    deadline = time.monotonic() + 10
    while len(seen) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_the_connection_key_reaches_pyopenssl_whole() -> None:
    """pyOpenSSL takes the EC connection key, in every version the node runs with (21.0, on
    Ubuntu 22.04, converts no EC key from cryptography directly)."""
    key = _client().key
    converted = atls._openssl_key(key)  # noqa: SLF001
    assert converted.type() == crypto.TYPE_EC
    assert converted.to_cryptography_key().private_numbers() == key.private_numbers()


def test_a_libssl_that_is_not_pyopenssls_is_refused_not_called(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The ticket switch is never called in a library the context does not live in (PyPI's
    cryptography carries its own OpenSSL): a clear error instead of a crash."""
    def tls_method_elsewhere() -> int:
        return 1  # not the address of pyOpenSSL's TLS_method table

    other_libssl = types.SimpleNamespace(TLS_method=tls_method_elsewhere)
    atls._pyopenssl_libssl.cache_clear()  # noqa: SLF001
    monkeypatch.setattr(atls.ctypes, "CDLL", lambda name: other_libssl)
    with pytest.raises(RuntimeError, match="does not use the system's libssl.so.3"):
        atls.tls_context(_client(), server=True)
    atls._pyopenssl_libssl.cache_clear()  # noqa: SLF001


@SYSTEM_LIBSSL
def test_client_verifies_a_tpm_node(world: TpmWorld, endpoint: Running) -> None:
    connection = atls.connect(endpoint.address, Verifier(policy(world.ca_dir)), _client())
    assert connection.peer is not None
    assert (connection.peer.evidence.security_class, connection.peer.evidence.zone) == ("tpm", "eu-west")
    connection.close()


@SYSTEM_LIBSSL
def test_optional_mutual_endpoint_serves_customers_and_verifies_peers(world: TpmWorld,
                                                                     node: Attester) -> None:
    seen = []
    server = atls.AtlsServer(("127.0.0.1", 0), node, atls.TlsIdentity.generate("server"),
                             verifier=Verifier(policy(world.ca_dir)),
                             handler=lambda c: seen.append(c.peer))
    running = Running(server)
    try:
        atls.connect(running.address, Verifier(policy(world.ca_dir)), _client()).close()
        weak = Attester(world.bare, "weak", "us-east", PCRS, world.ca_dir, node_state=ready_state)
        atls.connect(running.address, Verifier(policy(world.ca_dir)), _client(), attester=weak).close()
        _wait_handled(seen, 2)
    finally:
        running.stop()
    peers = [verdict.evidence.zone for verdict in seen if verdict is not None]
    assert len(seen) == 2 and peers == ["us-east"]  # the customer did not attest


@SYSTEM_LIBSSL
def test_policy_refusal_reaches_the_client_with_its_own_error(world: TpmWorld, endpoint: Running) -> None:
    with pytest.raises(ClassRefused):
        atls.connect(endpoint.address, Verifier(policy(world.ca_dir, allowed_classes=frozenset({"weak"}))),
                     _client())


@SYSTEM_LIBSSL
def test_mutual_atls_between_a_tpm_node_and_a_weak_node(world: TpmWorld, node: Attester) -> None:
    seen = []
    server = atls.AtlsServer(("127.0.0.1", 0), node, atls.TlsIdentity.generate("server"),
                             verifier=Verifier(policy(world.ca_dir)), require_mutual=True,
                             handler=lambda c: seen.append(c.peer))
    running = Running(server)
    try:
        weak = Attester(world.bare, "weak", "us-east", PCRS, world.ca_dir, node_state=ready_state)
        connection = atls.connect(running.address, Verifier(policy(world.ca_dir)),
                                  atls.TlsIdentity.generate("peer"), attester=weak)
        assert connection.peer is not None and connection.peer.evidence.security_class == "tpm"
        connection.close()
        with pytest.raises(ProtocolError, match="refused"):  # a client that does not attest
            atls.connect(running.address, Verifier(policy(world.ca_dir)), _client())
        _wait_handled(seen, 1)
    finally:
        running.stop()
    assert seen and seen[0] is not None and seen[0].evidence.security_class == "weak"


class Relay:
    """A man in the middle: its own TLS endpoint towards the victim, forwarding the exchange
    to the real node through its own TLS connection."""

    def __init__(self, node_address: Tuple[str, int], identity: atls.TlsIdentity):
        self.node_address = node_address
        self.identity = identity
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.thread = threading.Thread(target=self._relay_once, daemon=True)
        self.thread.start()

    def _relay_once(self) -> None:
        victim_sock, _ = self.listener.accept()
        victim = atls._open(victim_sock, atls.tls_context(self.identity, server=True), True, 10)
        node_sock = socket.create_connection(self.node_address)
        node = atls._open(node_sock, atls.tls_context(_client(), server=False), False, 10)
        node.send(atls.HELLO, victim.receive(atls.HELLO))
        victim.send(atls.EVIDENCE, node.receive(atls.EVIDENCE))
        try:
            victim.receive(atls.CHALLENGE)
        except ProtocolError:
            pass
        finally:
            victim_sock.close()
            node_sock.close()


@SYSTEM_LIBSSL
@pytest.mark.parametrize("attacker_key, error", [("own", TlsKeyMismatch), ("stolen", SessionMismatch)])
def test_relayed_evidence_is_rejected(world: TpmWorld, node: Attester, attacker_key: str,
                                      error: type) -> None:
    identity = atls.TlsIdentity.generate(node.node_id)
    running = Running(atls.AtlsServer(("127.0.0.1", 0), node, identity))
    try:
        relay = Relay(running.address, identity if attacker_key == "stolen" else _client())
        with pytest.raises(error):
            atls.connect(relay.address, Verifier(policy(world.ca_dir)), _client())
        relay.thread.join(10)
    finally:
        running.stop()


@SYSTEM_LIBSSL
def test_quote_rate_limit_refuses_cleanly(world: TpmWorld, node: Attester) -> None:
    limiter = atls.QuoteLimiter(rate=1000, per_source_rate=2)  # burst of one per source
    running = Running(atls.AtlsServer(("127.0.0.1", 0), node, _client(), limiter=limiter))
    try:
        atls.connect(running.address, Verifier(policy(world.ca_dir)), _client()).close()
        with pytest.raises(ProtocolError, match="busy"):
            atls.connect(running.address, Verifier(policy(world.ca_dir)), _client())
    finally:
        running.stop()


def test_token_bucket_refills_with_time() -> None:
    now = [0.0]
    bucket = atls.TokenBucket(rate=2, burst=2, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    now[0] += 0.5
    assert bucket.take() and not bucket.take()


def _plain_tls(address: Tuple[str, int], method_max: Optional[int] = None) -> SSL.Connection:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_verify(SSL.VERIFY_NONE, lambda *a: True)
    if method_max is not None:
        context.set_max_proto_version(method_max)
    sock = socket.create_connection(address)
    connection = SSL.Connection(context, sock)
    connection.set_connect_state()
    connection.do_handshake()
    return connection


@SYSTEM_LIBSSL
def test_tls_1_2_is_refused(endpoint: Running) -> None:
    with pytest.raises(SSL.Error):
        _plain_tls(endpoint.address, method_max=SSL.TLS1_2_VERSION)


@SYSTEM_LIBSSL
def test_no_session_is_resumed(endpoint: Running) -> None:
    """No ticket is issued and an offered session is not resumed (stdlib ssl reports both)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(socket.create_connection(endpoint.address)) as first:
        first.sendall(b"\x01\x00\x00\x00\x00")  # a bad HELLO: its refusal comes after any ticket
        first.recv(1)
        session = first.session
    assert session is not None and not session.has_ticket
    with context.wrap_socket(socket.create_connection(endpoint.address), session=session) as second:
        assert second.version() == "TLSv1.3" and not second.session_reused


def test_unreachable_node_is_a_clear_error(world: TpmWorld) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ProtocolError, match="cannot connect"):
        atls.connect(("127.0.0.1", port), Verifier(policy(world.ca_dir)), _client(), timeout=2)


def _cli(*argv: str) -> int:
    return cli.main(["--config", "/nonexistent/node.conf", *argv])


@SYSTEM_LIBSSL
def test_verify_command_prints_class_zone_pcrs_and_verdict(
        world: TpmWorld, endpoint: Running, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = f"{endpoint.address[0]}:{endpoint.address[1]}"
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"allowed_classes": ["tpm"], "zones": ["eu-west"],
                                       "ek_ca_dir": str(world.ca_dir)}))
    assert _cli("verify", target, "--policy", str(policy_file)) == 0
    out = capsys.readouterr().out
    assert "class     tpm" in out and "zone      eu-west" in out and "PCR 7" in out
    assert out.rstrip().endswith("verdict   ACCEPTED")
    assert _cli("verify", target, "--json", "--policy", str(policy_file)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "accepted" and sorted(report["pcrs"], key=int) == [str(p) for p in PCRS]
    policy_file.write_text(json.dumps({"allowed_classes": ["tpm"], "zones": ["us-east"],
                                       "ek_ca_dir": str(world.ca_dir)}))
    assert _cli("verify", target, "--json", "--policy", str(policy_file)) == 1
    assert json.loads(capsys.readouterr().out)["code"] == "zone-refused"


@SYSTEM_LIBSSL
def test_verify_command_without_policy_uses_node_conf_cas(endpoint: Running,
                                                          capsys: pytest.CaptureFixture) -> None:
    """The built-in policy trusts node.conf's TPM-CA-Dir: absent here, so the EK is untrusted."""
    assert _cli("verify", f"{endpoint.address[0]}:{endpoint.address[1]}") == 1
    assert "REFUSED (ek-untrusted)" in capsys.readouterr().out


@SYSTEM_LIBSSL
def test_verify_command_refuses_a_weak_node_unless_allowed_and_flags_it(
        world: TpmWorld, capsys: pytest.CaptureFixture) -> None:
    """A weak node's vTPM proves nothing about the host: the built-in policy refuses it;
    --allow-weak accepts it and the report still says what it is."""
    weak = Attester(world.bare, "weak", "us-east", PCRS, world.ca_dir, node_state=ready_state)
    running = Running(atls.AtlsServer(("127.0.0.1", 0), weak, atls.TlsIdentity.generate("weak")))
    target = f"{running.address[0]}:{running.address[1]}"
    try:
        assert _cli("verify", target) == 1
        out = capsys.readouterr().out
        assert "REFUSED (class-refused)" in out and "'weak'" in out, out
        assert _cli("verify", target, "--allow-weak") == 0
        out = capsys.readouterr().out
        assert "class     weak  (software vTPM: proves nothing about the host)" in out
        assert "class tpm or weak (--allow-weak)" in out and "verdict   ACCEPTED" in out
        assert _cli("verify", target, "--json") == 1
        assert json.loads(capsys.readouterr().out)["code"] == "class-refused"
    finally:
        running.stop()


@pytest.mark.parametrize("argv, complaint", [
    (["verify", "no-port"], "not HOST:PORT"),
    (["verify", "host:99999"], "not HOST:PORT"),
    (["verify", "127.0.0.1:7443", "--policy", "/nonexistent.json"], "cannot be read"),
    (["verify", "127.0.0.1:7443", "--policy", "/p.json", "--allow-weak"], "built-in policy"),
])
def test_verify_command_bad_input(argv: list, complaint: str, capsys: pytest.CaptureFixture) -> None:
    assert _cli(*argv) == 2
    assert complaint in capsys.readouterr().err


def test_the_state_service_started_by_hand_says_what_starts_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Only systemd's socket is believed by the endpoint: the service started without one
    (by hand, or its socket unit masked) refuses and says which unit starts it."""
    for name in ("LISTEN_PID", "LISTEN_FDS"):
        monkeypatch.delenv(name, raising=False)
    assert _cli("state-serve") == 1
    assert "statemesh-state.socket starts this service" in capsys.readouterr().err
