"""aTLS: TLS 1.3 whose first exchange, on the established channel, is attestation.

How the evidence travels: not in an X.509 extension of a per-connection certificate (as
Constellation does) but as the first messages inside the TLS 1.3 channel, after the
handshake. The binding is what makes that safe: the quote covers the verifier's fresh
nonce, the SHA-256 of the attester's certificate SubjectPublicKeyInfo and this session's
TLS exporter value (RFC 8446 section 7.5), so evidence shown on any other connection, or
relayed by a man in the middle holding another or even the same key, fails. In exchange
the certificate needs no per-connection key generation or custom extension parsing in
the handshake, the evidence is encrypted on the wire, and credential activation fits in
the same exchange. pyOpenSSL is used on both sides because Python's ssl has neither
export_keying_material nor the hooks for a client certificate the peer then attests.

Exchange (one frame = type:u8 | length:u32 | body), `>` from client to server:
  > HELLO(version, flags, nonce_c)           flags bit 0: the client attests too (mutual)
  < [HELLO(nonce_s) if mutual] EVIDENCE(server evidence bound to nonce_c)
  > [EVIDENCE(client evidence bound to nonce_s) if mutual] CHALLENGE(for the server's AK)
  < [CHALLENGE(for the client's AK) if mutual] ANSWER(server's activation)
  > [ANSWER(client's activation) if mutual] VERDICT(client's verdict on the server)
  < [VERDICT(server's verdict on the client) if mutual]
An empty CHALLENGE means "this AK was activated before": no ANSWER follows it, which saves
a round trip on every connection after the first between a verifier and a node.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import functools
import hashlib
import logging
import socket
import struct
import threading
import time
from typing import Callable, Dict, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi, lib as openssl_lib

from statemesh.attest.attester import Attester
from statemesh.attest.refusals import ProtocolError, VerificationError
from statemesh.attest.tpm import TpmError
from statemesh.attest.verifier import Expected, Verdict, Verifier

log = logging.getLogger(__name__)

VERSION = 1
EXPORTER_LABEL = b"EXPORTER-statemesh-atls-v1"
MAX_FRAME = 64 * 1024
FLAG_MUTUAL = 0x01
HELLO, EVIDENCE, CHALLENGE, ANSWER, VERDICT = 1, 2, 3, 4, 5
_NAMES = {HELLO: "HELLO", EVIDENCE: "EVIDENCE", CHALLENGE: "CHALLENGE", ANSWER: "ANSWER",
          VERDICT: "VERDICT"}
ACCEPTED = b"accepted"


@dataclasses.dataclass(frozen=True)
class TlsIdentity:
    """This process's TLS key and self-signed certificate; the attestation vouches for it."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def generate(cls, common_name: str) -> "TlsIdentity":
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    @property
    def spki_sha256(self) -> bytes:
        return spki_sha256(self.certificate)


def spki_sha256(certificate: x509.Certificate) -> bytes:
    """SHA-256 of a certificate's SubjectPublicKeyInfo: what the quote binds."""
    return hashlib.sha256(certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()


def _accept_any(_conn: SSL.Connection, _cert: crypto.X509, _errno: int, _depth: int, _ok: int) -> bool:
    """Certificates are self-signed: the peer's identity is its attestation, checked after."""
    return True


@functools.lru_cache(maxsize=1)
def _pyopenssl_libssl() -> ctypes.CDLL:
    """The system's libssl, once shown to be the one pyOpenSSL's contexts live in: both hand
    out the same TLS_method table. A cryptography carrying its own static OpenSSL (PyPI's
    wheels do) would otherwise be given a context of another library, and crash."""
    try:
        libssl = ctypes.CDLL("libssl.so.3")
    except OSError as error:
        raise RuntimeError(f"no libssl.so.3 ({error}): cannot turn TLS 1.3 session tickets "
                           "off") from None
    libssl.TLS_method.restype = ctypes.c_void_p
    if libssl.TLS_method() != int(ffi.cast("uintptr_t", openssl_lib.TLS_method())):
        raise RuntimeError("pyOpenSSL does not use the system's libssl.so.3 (a cryptography "
                           "with its own OpenSSL?): cannot turn TLS 1.3 session tickets off")
    libssl.SSL_CTX_set_num_tickets.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libssl


def _no_tickets(context: SSL.Context) -> None:
    """SSL_CTX_set_num_tickets(ctx, 0). In TLS 1.3, OP_NO_TICKET only makes OpenSSL send
    stateful tickets instead; pyOpenSSL (21 to 23 at least) does not bind set_num_tickets, so
    it is called in the libssl pyOpenSSL's context lives in (tests/test_atls.py checks the
    effect)."""
    libssl = _pyopenssl_libssl()
    pointer = int(ffi.cast("uintptr_t", context._context))  # noqa: SLF001
    if libssl.SSL_CTX_set_num_tickets(pointer, 0) != 1:
        raise RuntimeError("OpenSSL refused to disable TLS 1.3 session tickets")


def _openssl_key(key: ec.EllipticCurvePrivateKey) -> crypto.PKey:
    """The connection key as pyOpenSSL takes it. PKey.from_cryptography_key converts EC keys
    only from pyOpenSSL 22 on; on 21.0 (Ubuntu 22.04) the key goes through its PKCS#8 form,
    a copy in Python memory that only that version needs."""
    try:
        return crypto.PKey.from_cryptography_key(key)
    except TypeError:
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        return crypto.load_privatekey(crypto.FILETYPE_ASN1, der)


@functools.lru_cache(maxsize=32)
def tls_context(identity: TlsIdentity, server: bool, client_certificate: str = "none") -> SSL.Context:
    """TLS 1.3 only, no session tickets or cache: every connection is a full, attested one.
    Cached per identity: a client making many connections builds its context once."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_options(SSL.OP_NO_TICKET)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    _no_tickets(context)
    context.use_certificate(crypto.X509.from_cryptography(identity.certificate))
    context.use_privatekey(_openssl_key(identity.key))
    mode = SSL.VERIFY_PEER  # clients always want the server's certificate
    if server:  # client_certificate: "none", "optional" or "required"
        mode = {"none": SSL.VERIFY_NONE, "optional": SSL.VERIFY_PEER,
                "required": SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT}[client_certificate]
    context.set_verify(mode, _accept_any)
    return context


class Channel:
    """Frames over an established pyOpenSSL connection, with a deadline on every read."""

    def __init__(self, connection: SSL.Connection):
        self.connection = connection

    def send(self, kind: int, body: bytes = b"") -> None:
        self.connection.sendall(struct.pack(">BI", kind, len(body)) + body)

    def _read(self, size: int) -> bytes:
        chunks = b""
        while len(chunks) < size:
            try:
                chunk = self.connection.recv(size - len(chunks))
            except SSL.ZeroReturnError:
                chunk = b""
            except (SSL.WantReadError, SSL.WantWriteError, socket.timeout):
                raise ProtocolError("the peer did not answer in time") from None
            except (SSL.Error, OSError) as error:
                raise ProtocolError(f"connection failed: {error}") from None
            if not chunk:
                raise ProtocolError("the peer closed the connection during attestation")
            chunks += chunk
        return chunks

    def receive(self, kind: int) -> bytes:
        found, size = struct.unpack(">BI", self._read(5))
        if size > MAX_FRAME:
            raise ProtocolError(f"a {size}-byte message exceeds {MAX_FRAME}")
        body = self._read(size)
        if found == VERDICT and kind != VERDICT:
            raise ProtocolError("the peer refused: " + body.decode("utf-8", "replace")[:200])
        if found != kind:
            raise ProtocolError(f"expected {_NAMES[kind]}, got message type {found}")
        return body

    def exporter(self) -> bytes:
        return self.connection.export_keying_material(EXPORTER_LABEL, 32)

    def peer_spki_sha256(self) -> bytes:
        certificate = self.connection.get_peer_certificate()
        if certificate is None:
            raise ProtocolError("the peer presented no TLS certificate")
        return spki_sha256(certificate.to_cryptography())


def _pack_challenge(blob: bytes, encrypted: bytes) -> bytes:
    return struct.pack(">H", len(blob)) + blob + encrypted


def _unpack_challenge(body: bytes) -> Tuple[bytes, bytes]:
    if len(body) < 2 or struct.unpack(">H", body[:2])[0] > len(body) - 2:
        raise ProtocolError("malformed credential challenge")
    size = struct.unpack(">H", body[:2])[0]
    return body[2:2 + size], body[2 + size:]


class _Attesting:
    """The attester's half of the exchange."""

    def __init__(self, channel: Channel, attester: Attester, identity: TlsIdentity):
        self.channel, self.attester, self.identity = channel, attester, identity

    def send_evidence(self, nonce: bytes) -> None:
        data = self.attester.evidence(nonce, self.identity.spki_sha256, self.channel.exporter())
        self.channel.send(EVIDENCE, data)

    def answer(self, challenge: bytes) -> None:
        if not challenge:
            return
        blob, encrypted = _unpack_challenge(challenge)
        try:
            recovered = self.attester.activate(blob, encrypted)
        except TpmError as error:
            log.warning("credential activation failed: %s", error)
            recovered = b""
        self.channel.send(ANSWER, recovered)

    def await_verdict(self) -> None:
        verdict = self.channel.receive(VERDICT)
        if verdict != ACCEPTED:
            raise ProtocolError("the peer refused our evidence: "
                                + verdict.decode("utf-8", "replace")[:200])


class _Verifying:
    """The verifier's half of the exchange."""

    def __init__(self, channel: Channel, verifier: Verifier):
        self.channel, self.verifier = channel, verifier
        self.nonce = verifier.fresh_nonce()
        self.verdict: Optional[Verdict] = None
        self.challenge = None

    def check_evidence(self, data: bytes) -> None:
        """Check evidence and send the challenge; a refusal is told to the peer, then raised."""
        expected = Expected(self.nonce, self.channel.peer_spki_sha256(), self.channel.exporter())
        try:
            self.verdict = self.verifier.check(data, expected)
            self.challenge = self.verifier.challenge(self.verdict)
        except VerificationError as error:
            self.refuse(error)
            raise
        body = b"" if self.challenge is None else _pack_challenge(
            self.challenge.blob, self.challenge.encrypted_secret)
        self.channel.send(CHALLENGE, body)

    def confirm(self) -> Verdict:
        """Read the answer to our challenge, if we made one, and send the verdict."""
        assert self.verdict is not None
        try:
            if self.challenge is not None:
                self.verifier.confirm(self.challenge, self.channel.receive(ANSWER))
        except VerificationError as error:
            self.refuse(error)
            raise
        self.channel.send(VERDICT, ACCEPTED)
        return self.verdict

    def refuse(self, error: VerificationError) -> None:
        try:
            self.channel.send(VERDICT, f"{error.code}: {error}".encode())
        except (SSL.Error, OSError):
            pass


@dataclasses.dataclass
class AtlsConnection:
    """An attested connection: TLS, its socket, and what was proven about the peer (None
    when the peer did not attest: the client of a non-mutual endpoint)."""

    connection: SSL.Connection
    sock: socket.socket
    peer: Optional[Verdict]

    def close(self) -> None:
        try:
            self.connection.shutdown()
        except (SSL.Error, OSError):
            pass
        self.sock.close()


def _open(sock: socket.socket, context: SSL.Context, server: bool, timeout: float) -> Channel:
    """Handshake on a blocking socket whose reads and writes time out after `timeout`."""
    sock.setblocking(True)
    # The exchange is small messages answered at once: Nagle plus delayed ACKs would add 40 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    interval = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, interval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, interval)
    connection = SSL.Connection(context, sock)
    if server:
        connection.set_accept_state()
    else:
        connection.set_connect_state()
    try:
        connection.do_handshake()
    except (SSL.WantReadError, SSL.WantWriteError):
        raise ProtocolError("the TLS handshake timed out") from None
    except (SSL.Error, OSError) as error:
        raise ProtocolError(f"the TLS handshake failed: {error}") from None
    return Channel(connection)


def connect(address: Tuple[str, int], verifier: Verifier, identity: TlsIdentity,
            attester: Optional[Attester] = None, timeout: float = 10.0) -> AtlsConnection:
    """Connect, verify the server's evidence; with `attester`, attest ourselves too (mutual)."""
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as error:
        raise ProtocolError(f"cannot connect to {address[0]}:{address[1]}: {error}") from None
    try:
        channel = _open(sock, tls_context(identity, server=False), False, timeout)
        verifying = _Verifying(channel, verifier)
        channel.send(HELLO, bytes([VERSION, FLAG_MUTUAL if attester else 0]) + verifying.nonce)
        if attester is None:
            verifying.check_evidence(channel.receive(EVIDENCE))
            verdict = verifying.confirm()
        else:
            verdict = _client_mutual(channel, verifying, _Attesting(channel, attester, identity))
        return AtlsConnection(channel.connection, sock, verdict)
    except BaseException:
        sock.close()
        raise


def _client_mutual(channel: Channel, verifying: _Verifying, attesting: _Attesting) -> Verdict:
    server_nonce = channel.receive(HELLO)
    if len(server_nonce) != 32:
        raise ProtocolError("malformed HELLO from the server")
    server_evidence = channel.receive(EVIDENCE)
    attesting.send_evidence(server_nonce)
    verifying.check_evidence(server_evidence)
    attesting.answer(channel.receive(CHALLENGE))  # each side answers before it confirms
    verdict = verifying.confirm()
    attesting.await_verdict()
    return verdict


class TokenBucket:
    """`rate` events per second on average, bursts up to `burst`."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.stamp = burst, clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class QuoteLimiter:
    """Bounds TPM quote work: a global rate, a per-source rate, and a cap on waiting quotes."""

    def __init__(self, rate: float = 200.0, per_source_rate: float = 20.0, max_waiting: int = 8):
        self._global = TokenBucket(rate, rate / 4)
        self._per_source_rate = per_source_rate
        self._sources: Dict[str, TokenBucket] = {}
        self._waiting = threading.BoundedSemaphore(max_waiting)
        self._lock = threading.Lock()

    def admit(self, source: str) -> bool:
        """Whether a quote for `source` may be queued now (release with `done`)."""
        with self._lock:
            if len(self._sources) > 4096:
                self._sources.clear()
            bucket = self._sources.setdefault(
                source, TokenBucket(self._per_source_rate, self._per_source_rate / 2))
            if not (bucket.take() and self._global.take()):
                return False
        return self._waiting.acquire(blocking=False)

    def done(self) -> None:
        self._waiting.release()


class AtlsServer:
    """The node's aTLS endpoint. With a verifier, clients that attest are verified (mutual
    aTLS between nodes); `require_mutual` refuses clients that do not."""

    def __init__(self, address: Tuple[str, int], attester: Attester, identity: TlsIdentity,
                 verifier: Optional[Verifier] = None, require_mutual: bool = False,
                 limiter: Optional[QuoteLimiter] = None,
                 handler: Optional[Callable[[AtlsConnection], None]] = None,
                 max_connections: int = 64, timeout: float = 10.0):
        self.attester, self.identity, self.verifier = attester, identity, verifier
        self.limiter = limiter or QuoteLimiter()
        self.handler = handler
        self.timeout = timeout
        if require_mutual and verifier is None:
            raise ValueError("mutual aTLS needs a verifier")
        self.require_mutual = require_mutual
        self.context = tls_context(identity, server=True, client_certificate=(
            "required" if require_mutual else "optional" if verifier else "none"))
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(address)
        self.socket.listen(128)
        self.address = self.socket.getsockname()[:2]
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stopping = threading.Event()

    def serve_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                client, peer = self.socket.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            if not self._slots.acquire(blocking=False):
                client.close()  # at capacity: refuse rather than queue unbounded work
                continue
            threading.Thread(target=self._serve, args=(client, peer[0]), daemon=True).start()

    def shutdown(self) -> None:
        self._stopping.set()
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.socket.close()

    def _serve(self, client: socket.socket, source: str) -> None:
        try:
            attested = self.handshake(client, source)
            if attested and self.handler:
                self.handler(attested)
            if attested:
                attested.close()
        except VerificationError as error:
            log.info("aTLS with %s refused: %s: %s", source, error.code, error)
        except Exception:  # one broken connection must not stop the endpoint
            log.exception("aTLS connection from %s failed", source)
        finally:
            client.close()
            self._slots.release()

    def handshake(self, client: socket.socket, source: str) -> Optional[AtlsConnection]:
        """Run the server side of the exchange; None when the quote was refused for load."""
        channel = _open(client, self.context, True, self.timeout)
        hello = channel.receive(HELLO)
        problem = None
        if len(hello) != 34 or hello[0] != VERSION or hello[1] & ~FLAG_MUTUAL:
            problem = "malformed or unsupported HELLO"
        elif self.require_mutual and not hello[1] & FLAG_MUTUAL:
            problem = "mutual aTLS required: attest too"
        elif self.verifier is None and hello[1] & FLAG_MUTUAL:
            problem = "this endpoint does not verify clients"
        if problem:
            channel.send(VERDICT, f"{ProtocolError.code}: {problem}".encode())
            raise ProtocolError(problem)
        if not self.limiter.admit(source):
            log.warning("aTLS from %s: quote refused, rate limit reached", source)
            channel.send(VERDICT, b"busy: the node's quote rate limit is reached, retry later")
            return None
        try:
            attesting = _Attesting(channel, self.attester, self.identity)
            mutual = self.verifier is not None and hello[1] & FLAG_MUTUAL
            verifying = _Verifying(channel, self.verifier) if mutual else None
            if verifying:
                channel.send(HELLO, verifying.nonce)
            attesting.send_evidence(hello[2:])
        finally:
            self.limiter.done()
        verdict = None
        if verifying:
            verifying.check_evidence(channel.receive(EVIDENCE))
        attesting.answer(channel.receive(CHALLENGE))
        if verifying:
            verdict = verifying.confirm()
        attesting.await_verdict()
        return AtlsConnection(channel.connection, client, verdict)
