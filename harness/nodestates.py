"""The state an installed, locked-down node signs into its evidence, with status's own lines
(their names and details as long as a real node's), for the attestation tests and benchmarks:
evidence of a realistic size, without running status."""

from __future__ import annotations

import time

from statemesh.attest.evidence import NodeState, StateCheck

STATUS_LINES = (
    ("installation", "installed (version 0.1.0)"),
    ("tamper_listener", "statemesh-harden.service running (pid 412), re-asserts ssh, agents, "
                        "logins, rescue, memory when they are undone"),
    ("package_units", "6 units as the package shipped them, no drop-ins"),
    ("planted", "nothing planted for root's programs to load or run later"),
    ("ssh", "masked: ssh.service, ssh.socket, ssh@.service, sshd.service; not running"),
    ("agents", "remote-execution agents' units masked and stopped"),
    ("logins", "gettys and debug shell masked, root's password locked, loginuids immutable"),
    ("rescue", "masked: rescue.service, emergency.service, rescue.target, emergency.target"),
    ("memory", "no hibernation, core dumps to /bin/false, no crash kernel, kexec off, "
                "no swap but zram"),
    ("firewall", "ufw on, default deny; 7443/tcp only from: 10.0.0.0/8"),
    ("security_class", "TPM (EK certificate chains to a trusted CA)"),
    ("watchdog", "statemesh-watchdog.service running (pid 398), enabled at boot, 0 pty(s)"),
    ("storage", "/var/lib/statemesh: LUKS2 aes-xts-plain64 512-bit, 0 keyslots, 8.0G"),
)


def installed_node_state() -> NodeState:
    """Checked now, every line holding."""
    return NodeState(int(time.time()), True, "0.1.0",
                     tuple(StateCheck(name, True, detail) for name, detail in STATUS_LINES), ())
