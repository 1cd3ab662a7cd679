"""The guest's ports as the host reaches them, for the firewall's assertions: from the
host, only the mesh port answers, and only while the host is in Zone-Peers.

QEMU's user networking (restrict=on) forwards 127.0.0.1 ports of the host to the guest;
inside the guest those connections come from 10.0.2.2, the host as the guest sees it. A
forwarded connection is always accepted by QEMU on the host side, so "answers" means the
guest's service sent its first bytes (the SSH banner, or our test listener's line).
Nothing is ever sent to an address other than 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Optional

from harness.vm.driver import Guest

MESH, SSH, OTHER = 7443, 22, 8080
PORTS = (MESH, SSH, OTHER)
HOST_AS_SEEN_BY_GUEST = "10.0.2.2/32"

LISTENER_PATH = "/usr/local/sbin/statemesh-test-listener"
# Test-only listener in the guest: greet every connection with a line naming the port.
LISTENER = b'''#!/usr/bin/python3
import socket, sys, threading

def serve(port):
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen(8)
    while True:
        connection, _ = server.accept()
        connection.sendall(b"statemesh-test %d\\n" % port)
        connection.close()

for port in sys.argv[1:]:
    threading.Thread(target=serve, args=(int(port),)).start()
'''

def node_conf(peers: str) -> bytes:
    """The provisioned node's configuration (a small volume) with these Zone-Peers."""
    return (f"Zone: test-zone\nMesh-Port: {MESH}\nZone-Peers: {peers}\n"
            "Storage-Size: 256M\n").encode()


def listening(guest: Guest) -> set:
    out = guest.run("ss -Hltn").stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def settle(guest: Guest) -> None:
    """Wait for the end of boot and for the network: the agent answers early in boot, and a
    probe must not miss for want of an address rather than because of the firewall."""
    guest.wait_until_booted(timeout=900)
    guest.run("/lib/systemd/systemd-networkd-wait-online --timeout=300", timeout=360)


def serve_all_ports(guest: Guest) -> None:
    """Make every port of PORTS listen in the guest (sshd may hold 22, or may be gone)."""
    settle(guest)
    missing = [port for port in PORTS if port not in listening(guest)]
    if missing:
        guest.put(LISTENER_PATH, LISTENER, mode=0o755)
        words = " ".join(map(str, missing))
        # Detached, in the test agent's cgroup: a unit started by hand would be refused by
        # preflight as left running.
        guest.run(f"setsid -f {LISTENER_PATH} {words} < /dev/null > /dev/null 2>&1")
        guest.run("for i in $(seq 100); do "
                  + " && ".join(f"ss -Hltn 'sport = :{p}' | grep -q ." for p in missing)
                  + " && exit 0; sleep 0.1; done; exit 1")
    assert set(PORTS) <= listening(guest)


def stop_serving(guest: Guest) -> None:
    """Stop the test's listeners (sshd, given back, must get port 22 again)."""
    running = f"pgrep -f '^/usr/bin/python3 {LISTENER_PATH}' > /dev/null"
    guest.run(f"pkill -f '^/usr/bin/python3 {LISTENER_PATH}'; "
              f"for i in $(seq 100); do {running} || exit 0; sleep 0.1; done; exit 1")


def ufw_state(guest: Guest) -> str:
    """The operator's firewall as purge must give it back: rules, settings, and whether
    ufw.service loads them at boot."""
    return guest.run("ufw show added && cat /etc/default/ufw /etc/ufw/ufw.conf && "
                     "systemctl is-enabled ufw.service || true").stdout


def first_bytes(host_port: int) -> bytes:
    """What the guest's service behind a 127.0.0.1 forward says first (b"" if nothing)."""
    try:
        with socket.create_connection(("127.0.0.1", host_port), timeout=15) as connection:
            return connection.recv(64)
    except OSError:  # refused, reset or timed out: the guest never answered
        return b""


def answers(host_port: int) -> bool:
    """Whether the guest's service behind a 127.0.0.1 forward says anything."""
    return bool(first_bytes(host_port))


def probe(guest: Guest) -> Dict[int, bool]:
    with ThreadPoolExecutor(len(PORTS)) as pool:
        results = pool.map(lambda port: answers(guest.host_port(port)), PORTS)
    return dict(zip(PORTS, results))


def firewall_finding(guest: Guest, report: Optional[dict] = None) -> dict:
    """status's firewall line: of `report` when the test has one that is still true (each
    status costs seconds in a guest), else of a new status."""
    if report is None:
        result = guest.run("statemesh-node status --json", check=False)
        assert result.stdout.startswith("{"), f"status failed: {result.stderr}"
        report = json.loads(result.stdout)
    return next(f for f in report["guarantees"] if f["name"] == "firewall")
