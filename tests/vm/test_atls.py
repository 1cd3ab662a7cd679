"""Security class and aTLS in real guests, verified from the host through a forwarded port.

Both run restored from saved installed nodes (harness/vm/snapshot.py). A guest whose TPM is
a swtpm with an EK certificate from a private CA (kept with its saved node) is `tpm` once
the node trusts that CA; a guest without a TPM is `weak` and runs the vTPM.
The verifier runs on the host, with only the CA's root certificate: the node sends its
EK certificate and the issuing CA inside the evidence.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path
from typing import Callable, Optional

import pytest

from statemesh import cli
from statemesh.attest import atls, stateservice
from statemesh.attest.refusals import AkNotBound, ClassRefused
from statemesh.attest.tpmdevices import VTPM_TCTI
from statemesh.attest.verifier import Challenge, Policy, Verdict, Verifier
from harness.vm import snapshot, vtpm
from harness.vm.driver import Guest, SavedGuest
from tests.vm.reports import failing_lines, guarantee_finding

MESH = snapshot.MESH_PORT
# A tenant's workload (any local user but root) reaching for the weak node's vTPM, on the
# TCP ports swtpm once served and on its sockets, command channel and control channel.
# The control channel answers at once, whoever holds the command channel (the endpoint
# does): CMD_GET_CAPABILITY (1) is harmless; CMD_INIT (2) would reset the vTPM under the
# endpoint, CMD_SHUTDOWN (3) stop it. (On the command channel the 4 bytes are a short TPM
# command, answered with an error, or not at all while the endpoint holds it.)
REACH_THE_VTPM = """
import socket, struct
def attempt(family, address):
    try:
        with socket.socket(family, socket.SOCK_STREAM) as channel:
            channel.settimeout(5)
            channel.connect(address)
            channel.sendall(struct.pack(">I", 1))
            return "answered" if channel.recv(64) else "closed"
    except OSError as error:
        return type(error).__name__
print(attempt(socket.AF_INET, ("127.0.0.1", 2321)), attempt(socket.AF_INET, ("127.0.0.1", 2322)),
      attempt(socket.AF_UNIX, "/run/statemesh-node/vtpm/tpm.sock"),
      attempt(socket.AF_UNIX, "/run/statemesh-node/vtpm/tpm.sock.ctrl"))
"""


# A local process asking the state service for the node's state: the bytes it received,
# or why it could not connect.
ASK_THE_STATE = """
import socket
with socket.socket(socket.AF_UNIX) as channel:
    channel.settimeout(150)
    try:
        channel.connect("/run/statemesh-node/state/state.sock")
    except OSError as error:
        raise SystemExit(print(type(error).__name__))
    received = b""
    while True:
        chunk = channel.recv(65536)
        if not chunk:
            break
        received += chunk
print(len(received))
"""


# In a guest: the node's own D-Bus client subscribes to UnitFilesChanged, unmasks ssh, and
# says which library it used and what it heard.
HEAR_SYSTEMD = """
import asyncio
from statemesh import systemd
async def main():
    async with systemd.manager() as manager:
        heard = asyncio.Event()
        await manager.on_unit_files_changed(heard.set)
        print(manager.bus.library)
        unmask = await asyncio.create_subprocess_exec("systemctl", "unmask", "ssh.service")
        await unmask.wait()
        await asyncio.wait_for(heard.wait(), 60)
        print("UnitFilesChanged")
asyncio.run(main())
"""


def _serving(guest: Guest) -> None:
    """Wait for the mesh port (a restored node may be a moment from accepting)."""
    guest.run(f"for i in $(seq 300); do ss -Hltn 'sport = :{MESH}' | grep -q . && exit 0; "
              "sleep 0.2; done; journalctl -u statemesh-atls --no-pager; exit 1", timeout=120)


def _security_class(guest: Guest) -> dict:
    return json.loads(guest.run("statemesh-node security-class --json").stdout)


def _verify(guest: Guest, verifier: Verifier) -> atls.AtlsConnection:
    return atls.connect(("127.0.0.1", guest.host_port(MESH)), verifier,
                        atls.TlsIdentity.generate("host-verifier"), timeout=60)


def _root_only(tpm_ca: vtpm.LocalCa, directory: Path) -> Path:
    """The host verifier's CA directory: the test CA's self-signed root and nothing else
    (the CA exists once a guest with a TPM has been made)."""
    directory.mkdir()
    for path in tpm_ca.ca_certificates():
        if "rootca" in path.name:
            shutil.copy(path, directory)
    assert list(directory.iterdir()), "the test CA has no root certificate"
    return directory


@pytest.mark.cost(60)
def test_guest_with_a_trusted_tpm_is_tpm_class(guest_factory: Callable[..., Guest],
                                              installed_tpm_node: SavedGuest,
                                              tmp_path: Path) -> None:
    """Also the proof that a restored guest's TPM answers: the quote in the evidence is made
    after the restore, over the verifier's fresh nonce, and verifies. Then the same node
    with Ubuntu 22.04's libraries, which has neither python3-tpm2-pytss (a Recommends) nor
    python3-dbus-next (python3-jeepney is its alternative): the endpoint speaks to
    /dev/tpmrm0 with the pure-Python backend and has the same identity; the lockdown, its
    listener and status speak D-Bus through jeepney; and the node still verifies as ready."""
    guest = guest_factory(saved=installed_tpm_node, forward_ports=(MESH,))
    root_only = _root_only(installed_tpm_node.tpm_ca, tmp_path / "host-ca.d")
    assert guest.run("test -c /dev/tpmrm0", check=False).returncode == 0
    _serving(guest)
    found = _security_class(guest)
    assert found["class"] == "tpm", found["reason"]
    vtpm = guest.run("systemctl is-active statemesh-vtpm", check=False).stdout.strip()
    assert vtpm != "active", guest.run("date -u; journalctl -b -u statemesh-vtpm -u statemesh-atls "
                                       "--no-pager", check=False).stdout
    status = json.loads(guest.run("statemesh-node status --json", check=False).stdout)
    finding = next(f for f in status["guarantees"] if f["name"] == "security_class")
    assert finding["holds"] and finding["facts"]["class"] == "tpm"

    connection = _verify(guest, Verifier(Policy(frozenset({"tpm"}), frozenset({"test-zone"}),
                                                root_only)))
    assert connection.peer is not None
    evidence = connection.peer.evidence
    assert (evidence.security_class, evidence.zone) == ("tpm", "test-zone")
    assert len(evidence.ek_chain) == 2  # the EK certificate and the issuing CA
    # The node's state, signed with the claims: status's own lines, every one holding.
    state = evidence.node_state
    assert state.ready and state.installed, state.failing()
    assert [c.name for c in state.checks] == [
        "installation", "tamper_listener", "package_units", "planted",
        *(f["name"] for f in status["guarantees"])]
    # SeaBIOS and QEMU load this guest's kernel themselves (no GRUB measuring its command
    # line): PCRs 8 and 9, quoted by default, were never extended, and the verifier says
    # so (a kernel argument added here would show nowhere; README: which platforms
    # measure it).
    assert [i for i, _ in evidence.pcr_values] == list(range(10))
    boot_loader = [w for w in connection.peer.warnings if w.startswith(("PCR 8 ", "PCR 9 "))]
    assert [w.split(")", 1)[1] for w in boot_loader] == [
        " is not measured on this node: nothing extended it in this boot"] * 2, boot_loader
    connection.close()
    _backend_is(guest, "esapi")

    guest.run("dpkg --remove python3-tpm2-pytss python3-dbus-next && "
              "systemctl restart statemesh-harden statemesh-atls", timeout=300)
    assert guest.run("python3 -c 'import dbus_next'", check=False).returncode != 0
    _serving(guest)
    _backend_is(guest, "direct")
    assert _security_class(guest)["class"] == "tpm"
    # The node's D-Bus client hears systemd's signals through jeepney (the tamper: ssh
    # unmasked), and the restarted listener undoes the tamper.
    guest.run(f"cat > /tmp/hear-systemd.py <<'EOF'\n{HEAR_SYSTEMD}EOF")
    heard = guest.run("python3 /tmp/hear-systemd.py", timeout=120).stdout.split()
    assert heard == ["jeepney", "UnitFilesChanged"], heard
    guest.wait_for("test \"$(systemctl is-enabled ssh.service)\" = masked",
                   "the re-mask by the listener on jeepney", 60)
    status = json.loads(guest.run("statemesh-node status --json", check=False).stdout)
    assert status["holds"], failing_lines(status)
    connection = _verify(guest, Verifier(Policy(frozenset({"tpm"}), frozenset({"test-zone"}),
                                                root_only)))
    assert connection.peer is not None
    assert connection.peer.evidence.node_id == evidence.node_id
    assert connection.peer.evidence.node_state.ready, connection.peer.evidence.node_state.failing()
    connection.close()


def _kill_the_endpoint(guest: Guest) -> None:
    """SIGKILL the endpoint and wait for the one systemd starts next to serve."""
    killed = guest.run("systemctl show -P MainPID statemesh-atls").stdout.strip()
    guest.run(f"kill -KILL {killed}")
    guest.wait_for(f"pid=$(systemctl show -P MainPID statemesh-atls); "
                   f"[ \"$pid\" != 0 ] && [ \"$pid\" != {killed} ]", "the restarted endpoint", 60)
    _serving(guest)


def _backend_is(guest: Guest, backend: str, tcti: str = "device:/dev/tpmrm0") -> None:
    """The running endpoint's TPM backend, as it logged it."""
    pid = guest.run("systemctl show -P MainPID statemesh-atls").stdout.strip()
    said = guest.run(f"journalctl -b _PID={pid} --no-pager -o cat -g 'backend'", check=False).stdout
    assert f"TPM {tcti} through the {backend} backend" in said, said


class OversizedChallenges(Verifier):
    """A hostile aTLS client: its credential challenge is longer than any TPM takes (swtpm
    answers a command over 4096 bytes twice, which desynchronised the direct backend and
    left a policy session behind at each activation until the vTPM had none)."""

    def challenge(self, verdict: Verdict) -> Optional[Challenge]:
        honest = super().challenge(verdict)
        assert honest is not None
        oversized = struct.pack(">H", 4998) + bytes(4998)
        return dataclasses.replace(honest, blob=oversized)


def _oversized_challenges_leave_the_endpoint_attesting(guest: Guest, policy: Policy) -> None:
    """More hostile challenges than the vTPM has session slots (3), each refused: the node
    answers nothing; then an honest verifier is answered."""
    for _attempt in range(4):
        with pytest.raises(AkNotBound):
            _verify(guest, OversizedChallenges(policy))
    connection = _verify(guest, Verifier(policy))
    assert connection.peer is not None and connection.peer.evidence.node_state.ready
    connection.close()


@pytest.mark.every_release
# 111/113 s (bookworm/trixie): 30 s of it on Ubuntu 22.04's libraries, 20 s the privileges
@pytest.mark.cost(110)
def test_guest_without_tpm_is_weak_and_runs_the_vtpm(guest_factory: Callable[..., Guest],
                                                     installed_node: SavedGuest,
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """No CA is needed to accept a weak node: its vTPM's EK proves nothing anyway; a
    customer's `statemesh-node verify` refuses it unless told --allow-weak. A hostile
    client's oversized credential challenges are refused and leave the endpoint attesting,
    on tpm2-pytss and, once it is removed as on Ubuntu 22.04, on the pure-Python backend."""
    guest = guest_factory(saved=installed_node, forward_ports=(MESH,))
    no_cas = tmp_path
    _serving(guest)
    found = _security_class(guest)
    assert found["class"] == "weak" and "no TPM device" in found["reason"]
    assert guest.run("systemctl is-active statemesh-vtpm").stdout.strip() == "active"
    finding = guarantee_finding(guest, "security_class")
    assert finding["holds"] and "WEAK" in finding["detail"]
    # A local user that is not root reaches neither of the vTPM's channels.
    guest.run(f"cat > /tmp/reach-the-vtpm.py <<'EOF'\n{REACH_THE_VTPM}EOF")
    reached = guest.run("setpriv --reuid=nobody --regid=nogroup --clear-groups "
                        "python3 /tmp/reach-the-vtpm.py").stdout.split()
    assert reached == ["ConnectionRefusedError"] * 2 + ["PermissionError"] * 2, reached
    # The endpoint runs as the system user it shares with swtpm, with no capability but to
    # bind a low port; the
    # state service (root) answers it alone: another local user cannot connect, and a
    # process of the endpoint's user outside its unit (swtpm, say) is answered nothing.
    endpoint = guest.run("grep -E '^(Uid|CapEff):' /proc/$(systemctl show -P MainPID "
                         "statemesh-atls)/status").stdout.split()
    assert endpoint[1] != "0" and int(endpoint[-1], 16) == 1 << 10, endpoint  # NET_BIND_SERVICE
    assert guest.run("stat -c %U /run/statemesh-node/vtpm/tpm.sock").stdout.strip() == \
        "statemesh-atls"
    # The state service starts at the first request (the socket is systemd's, root's and the
    # endpoint group's), not at boot: nobody has asked yet.
    assert guest.run("systemctl is-active statemesh-state.service",
                     check=False).stdout.strip() == "inactive"
    assert guest.run(f"stat -c '%a %U %G' {stateservice.SOCKET}").stdout.split() == [
        "660", "root", "statemesh-atls"]
    guest.run(f"cat > /tmp/ask-the-state.py <<'EOF'\n{ASK_THE_STATE}EOF")
    asked = [guest.run(f"setpriv --reuid={user} --regid={group} --clear-groups "
                       "python3 /tmp/ask-the-state.py").stdout.strip()
             for user, group in (("nobody", "nogroup"), ("statemesh-atls", "statemesh-atls"))]
    assert asked == ["PermissionError", "0"], asked
    assert int(guest.run("python3 /tmp/ask-the-state.py").stdout) > 1000  # root: a report

    connection = _verify(guest, Verifier(Policy(frozenset({"tpm", "weak"}), None, no_cas)))
    assert connection.peer is not None and connection.peer.evidence.security_class == "weak"
    connection.close()
    with pytest.raises(ClassRefused):
        _verify(guest, Verifier(Policy(frozenset({"tpm"}), None, no_cas)))

    # The customer's command: refused by the built-in policy, accepted and flagged when
    # weak nodes are allowed.
    target = f"127.0.0.1:{guest.host_port(MESH)}"
    assert cli.main(["--config", str(tmp_path / "none.conf"), "verify", target]) == 1
    assert "REFUSED (class-refused)" in capsys.readouterr().out
    assert cli.main(["--config", str(tmp_path / "none.conf"), "verify", target,
                     "--allow-weak"]) == 0
    out = capsys.readouterr().out
    assert "class     weak  (software vTPM" in out and "verdict   ACCEPTED" in out, out
    assert "state     ready: installed 0.1.0, all 13 checks of status hold" in out, out

    # An endpoint killed after a handshake leaves its two keys in the vTPM, which has no
    # resource manager and holds three objects: the endpoint systemd starts next empties it
    # (unemptied, the second restart's attestation key no longer fits).
    for _kill in range(2):
        _kill_the_endpoint(guest)
        connection = _verify(guest, Verifier(Policy(frozenset({"tpm", "weak"}), None, no_cas)))
        assert connection.peer is not None and connection.peer.evidence.node_state.ready
        connection.close()
    flushed = guest.run("journalctl -b -u statemesh-atls --no-pager -g 'flushed 2 transient'",
                        check=False).stdout
    assert flushed.count("an earlier endpoint left in the vTPM") >= 2, flushed

    # Any client can send the challenge the node activates: oversized ones, then the same
    # on Ubuntu 22.04's libraries (no tpm2-pytss: the pure-Python backend on the vTPM's
    # socket), where an endpoint killed after a handshake is emptied out by the next too.
    weak_allowed = Policy(frozenset({"tpm", "weak"}), None, no_cas)
    _backend_is(guest, "esapi", VTPM_TCTI)
    _oversized_challenges_leave_the_endpoint_attesting(guest, weak_allowed)
    guest.run("dpkg --remove python3-tpm2-pytss", timeout=300)
    for _kill in range(2):
        _kill_the_endpoint(guest)
        _backend_is(guest, "direct", VTPM_TCTI)
        _oversized_challenges_leave_the_endpoint_attesting(guest, weak_allowed)
    flushed = guest.run("journalctl -b -u statemesh-atls --no-pager -g 'flushed 2 transient'",
                        check=False).stdout
    assert flushed.count("an earlier endpoint left in the vTPM") >= 4, flushed


# A daemon of root's the operator prepared before installing, which later takes the state
# service's place: it removes systemd's socket and listens at its path itself, answering
# every request with a report whose every check holds (one the state service gave earlier).
PLANTED_STATE_LISTENER = """
import os, socket
path = "/run/statemesh-node/state/state.sock"
with open("/root/forged.json", "rb") as forged_file:
    forged = forged_file.read()
os.unlink(path)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
os.chmod(path, 0o666)
server.listen()
with open("/root/planted.pid.new", "w") as pid_file:
    pid_file.write(str(os.getpid()))
os.rename("/root/planted.pid.new", "/root/planted.pid")  # whole, once listening
while True:
    connection, _ = server.accept()
    with connection:
        connection.sendall(forged)
"""
# What root asks the state service for the report the planted listener then serves.
SAVE_THE_STATE = ASK_THE_STATE.replace("print(len(received))",
                                       "open('/root/forged.json', 'wb').write(received)")


def _fresh_endpoint_verdict(guest: Guest, tmp_path: Path,
                            capsys: pytest.CaptureFixture) -> dict:
    """A customer's `verify --allow-weak --json` from the host, against an endpoint started
    anew (it asks for the node's state at its first handshake, not from what it kept)."""
    guest.run("systemctl restart statemesh-atls")
    _serving(guest)
    capsys.readouterr()
    cli.main(["--config", str(tmp_path / "none.conf"), "verify",
              f"127.0.0.1:{guest.host_port(MESH)}", "--allow-weak", "--json"])
    return json.loads(capsys.readouterr().out)


# 28 s (bookworm, full run): the state service's one status, two endpoints started anew
@pytest.mark.cost(30)
def test_a_listener_in_the_state_services_place_and_a_writable_socket_directory_are_not_believed(
        guest_factory: Callable[..., Guest], installed_node: SavedGuest, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    """The endpoint believes only the socket systemd listens on, in directories only root
    may write: a root daemon's listener at its path, serving a report whose every check
    holds, and a socket directory made writable (where anyone could put such a listener)
    each make the node not ready, named; believed, either would make it ready."""
    guest = guest_factory(saved=installed_node, forward_ports=(MESH,))
    guest.run(f"cat > /tmp/save-the-state.py <<'EOF'\n{SAVE_THE_STATE}EOF")
    guest.run("python3 /tmp/save-the-state.py")
    assert json.loads(guest.get("/root/forged.json"))["holds"]
    guest.run(f"cat > /tmp/planted.py <<'EOF'\n{PLANTED_STATE_LISTENER}EOF")
    guest.run("setsid -f python3 /tmp/planted.py < /dev/null > /dev/null 2>&1")
    planted = guest.wait_for("cat /root/planted.pid", "the planted listener", 60).strip()
    verdict = _fresh_endpoint_verdict(guest, tmp_path, capsys)
    assert (verdict["verdict"], verdict["code"]) == ("refused", "not-ready"), verdict
    assert f"its listener is pid {planted} (uid 0), not systemd's socket" in verdict["reason"], \
        verdict

    # systemd's socket again, in a directory anyone may write to.
    guest.run(f"kill {planted} && systemctl restart statemesh-state.socket && "
              f"chmod 0777 {stateservice.SOCKET.parent}")
    verdict = _fresh_endpoint_verdict(guest, tmp_path, capsys)
    assert (verdict["verdict"], verdict["code"]) == ("refused", "not-ready"), verdict
    assert (f"{stateservice.SOCKET.parent} is not a directory only root may write to "
            "(mode drwxrwxrwx, uid 0)") in verdict["reason"], verdict
