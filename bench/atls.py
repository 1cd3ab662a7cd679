"""Benchmark of aTLS against plain TLS 1.3 on loopback, with a real swtpm, in one run.

    /usr/bin/python3 -m bench.atls [--n 300]

The node's endpoints run in a child process (its own GIL, like a real node): an aTLS
endpoint with a `tpm`-class swtpm whose EK chains to a private test CA, and a plain
TLS 1.3 endpoint on the same pyOpenSSL stack that answers one request (so the baseline has
the handshake plus one round trip of application data). The client connects N times to
each, sequentially. aTLS connections each cost one quote; the verifier's credential
activation is done at the first contact and remembered (the cached enrollment), its cost is
reported apart. The quote alone (TPM2_Quote + PCR read, on a copy of the node's swtpm) is
measured in the same loop: the three kinds alternate, so load from elsewhere on the machine
hits them alike. Last, the CPU time of Verifier.check per evidence. The last line is what the project's reports quote:
    atls handshake_ms=<a> plain_ms=<b> quote_ms=<q> overhead_ms=<a-b-q> verify_ms=<v> ratio=<a/b>
(p50 latencies; overhead is what aTLS adds beyond the TLS handshake and the TPM's quote;
ratio is the aTLS connection's cost in plain TLS connections).
"""

from __future__ import annotations

import argparse
import multiprocessing
import secrets
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, List, Tuple

from OpenSSL import SSL

from harness.nodestates import installed_node_state
from harness.swtpm import SwTpm, provision_with_ca
from statemesh.attest import atls
from statemesh.attest.attester import Attester
from statemesh.attest.tpm import open_tpm
from statemesh.attest.verifier import Expected, Policy, Verifier

PCRS = (0, 1, 2, 3, 4, 5, 6, 7)


def _plain_server(listener: socket.socket, identity: atls.TlsIdentity) -> None:
    context = atls.tls_context(identity, server=True)
    while True:
        client, _ = listener.accept()
        try:
            channel = atls._open(client, context, True, 10)  # same handshake code as aTLS
            channel.send(atls.ANSWER, channel.receive(atls.HELLO))
        except Exception:  # a benchmark endpoint: one bad connection must not end it
            pass
        finally:
            client.close()


def _serve(tcti: str, node_ca: Path, ports: "multiprocessing.Queue[Tuple[int, int]]") -> None:
    """The node: an aTLS endpoint and a plain TLS 1.3 endpoint."""
    attester = Attester(open_tpm(tcti), "tpm", "bench", PCRS, node_ca, node_state=installed_node_state)
    identity = atls.TlsIdentity.generate(attester.node_id)
    limiter = atls.QuoteLimiter(rate=1e6, per_source_rate=1e6, max_waiting=64)
    server = atls.AtlsServer(("127.0.0.1", 0), attester, identity, limiter=limiter)
    plain = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_plain_server, args=(plain, identity), daemon=True).start()
    ports.put((server.address[1], plain.getsockname()[1]))
    server.serve_forever()


def _plain_client(port: int, context: SSL.Context) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        channel = atls._open(sock, context, False, 10)
        channel.send(atls.HELLO, b"ping")
        channel.receive(atls.ANSWER)
    finally:
        sock.close()


def _timed(function: Callable[[], object], n: int) -> List[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        function()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def _percentile(samples: List[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _describe(name: str, samples: List[float]) -> str:
    per_second = 1000 * len(samples) / sum(samples)
    return (f"{name:<22} {per_second:8.1f}/s  p50 {_percentile(samples, 0.5):7.3f} ms  "
            f"p99 {_percentile(samples, 0.99):7.3f} ms  (n={len(samples)})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="connections per kind")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-atls-"))
    node_sw = quote_sw = None
    try:
        root = provision_with_ca(work / "node", work / "ca")
        ca_dir, node_ca = work / "ca.d", work / "node-ca.d"
        for directory in (ca_dir, node_ca):
            directory.mkdir()
            shutil.copy(root, directory)
        shutil.copy(root.parent / "issuercert.pem", node_ca)
        shutil.copytree(work / "node", work / "quote")  # a second swtpm for the quote alone
        node_sw, quote_sw = SwTpm(work / "node"), SwTpm(work / "quote")
        ports: "multiprocessing.Queue[Tuple[int, int]]" = multiprocessing.Queue()
        node = multiprocessing.Process(target=_serve, args=(node_sw.tcti, node_ca, ports), daemon=True)
        node.start()
        atls_port, plain_port = ports.get(timeout=60)
        verifier = Verifier(Policy(frozenset({"tpm"}), None, ca_dir))
        client = atls.TlsIdentity.generate("bench-client")
        plain_context = atls.tls_context(client, server=False)

        def attested() -> None:
            atls.connect(("127.0.0.1", atls_port), verifier, client).close()

        first_contact = _timed(attested, 1)[0]  # includes credential activation
        atls_ms: List[float] = []
        plain_ms: List[float] = []
        quote_ms: List[float] = []
        with open_tpm(quote_sw.tcti) as tpm:
            for _ in range(args.n):  # interleaved, so that load from elsewhere hits all alike
                atls_ms += _timed(attested, 1)
                plain_ms += _timed(lambda: _plain_client(plain_port, plain_context), 1)
                quote_ms += _timed(lambda: tpm.quote(PCRS, secrets.token_bytes(32)), 1)
            attester = Attester(tpm, "tpm", "bench", PCRS, node_ca, node_state=installed_node_state)
            want = Expected(*(secrets.token_bytes(32) for _ in range(3)))
            data = attester.evidence(want.nonce, want.tls_spki_sha256, want.session_binding)
        start = time.process_time()
        for _ in range(args.n):
            verifier.check(data, want)
        verify_ms = (time.process_time() - start) * 1000 / args.n
        node.terminate()
        print(_describe("aTLS (1 quote/conn)", atls_ms))
        print(_describe("plain TLS 1.3 + 1 RTT", plain_ms))
        print(_describe("quote alone", quote_ms))
        print(f"first contact with credential activation: {first_contact:.3f} ms")
        print(f"verify CPU per evidence: {verify_ms:.3f} ms")
        a, b, q = (statistics.median(s) for s in (atls_ms, plain_ms, quote_ms))
        print(f"atls handshake_ms={a:.3f} plain_ms={b:.3f} quote_ms={q:.3f} "
              f"overhead_ms={a - b - q:.3f} verify_ms={verify_ms:.3f} ratio={a / b:.2f}")
    finally:
        for sw in (node_sw, quote_sw):
            if sw:
                sw.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
