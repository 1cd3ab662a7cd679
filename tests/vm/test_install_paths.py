"""The operator's own ways to install that need no SSH: cloud-init's user-data at first
boot, the hypervisor's guest agent, and a login at the machine's console. (SSH, tmux,
screen and the interruptions are in test_grace.py and test_lockdown.py.)

cloud-init's runcmd runs in cloud-final.service and guest-exec's command in
qemu-guest-agent.service, units of the remote-execution agents that the installation masks
and stops (statemesh.guarantees.agents): the installation must not stop the unit it runs
in, and that unit must still end, with everything it started, once the grace is over. A
console login runs in a getty the installation masks and stops the same way
(statemesh.guarantees.logins).
"""

from __future__ import annotations

import base64
import time
from typing import Callable

import pytest

from harness.vm.driver import Guest, SavedGuest
from tests.vm import terminal

SEED = "/var/lib/cloud/seed/nocloud"
# The operator's user-data: the package from the node's apt sources (apt: their own list
# kept), its outcome in cloud-init's output log, apt's exit status beside it; then a
# program left running, as a reverse shell would be: cloud-final.service stops with
# KillMode=process, which leaves it in the unit's cgroup. (The locale module is skipped: the
# test image generates no en_US.UTF-8, which cloud-init sets.)
# First, runcmd makes the unit's stop endless: cloud-final.service has TimeoutSec=0, and a
# tracer holds its main process (cloud-init) in a ptrace stop, where SIGTERM does nothing.
# Stopping it once the grace is over would wait forever, and the tamper listener with it.
LEFT_BEHIND = "sleep 1645"
HOLDER = "/root/hold-cloud-init.py"
HELD = "/root/cloud-init-held"
HOLD = f"""import ctypes, os, subprocess, time
pid = subprocess.check_output(["systemctl", "show", "-P", "MainPID", "cloud-final.service"])
if ctypes.CDLL(None, use_errno=True).ptrace(16, int(pid), None, None) != 0:  # PTRACE_ATTACH
    raise SystemExit(os.strerror(ctypes.get_errno()))
open({HELD!r}, "w").write(pid.decode())
time.sleep(1646)
"""
USER_DATA = (f"""#cloud-config
apt:
  preserve_sources_list: true
locale: false
write_files:
  - path: {HOLDER}
    encoding: b64
    content: """ + base64.b64encode(HOLD.encode()).decode() + f"""
runcmd:
  - [sh, -c, 'setsid python3 {HOLDER} < /dev/null > /dev/null 2>&1 & DEBIAN_FRONTEND=noninteractive apt-get install -y statemesh-node; echo $? > /root/install.rc; setsid {LEFT_BEHIND} < /dev/null > /dev/null 2>&1 &']
""").encode()
OUTPUT_LOG = "/var/log/cloud-init-output.log"
JOURNAL = "/var/lib/statemesh-node/journal.jsonl"


@pytest.mark.cost(180)
def test_cloud_init_runcmd_installs_at_first_boot_and_its_unit_ends(
        guest_factory: Callable[..., Guest], provisioned_node: SavedGuest, measured) -> None:
    guest = guest_factory(saved=provisioned_node)
    guest.run(f"mkdir -p {SEED}")
    guest.put(f"{SEED}/meta-data", b"instance-id: statemesh-first-boot\n")
    guest.put(f"{SEED}/user-data", USER_DATA)
    guest.run("sync")
    started = time.monotonic()
    guest.reboot()  # the image's first boot with a seed: cloud-init runs, runcmd with it

    guest.wait_for("test \"$(dpkg-query -W -f '${db:Status-Abbrev}' statemesh-node)\" = 'ii ' "
                   "&& ! pgrep -x apt-get", "runcmd's apt-get to install and return", 900)
    measured("first boot to apt-get's return (cloud-init)", f"{time.monotonic() - started:.0f} s")
    # Under DEBIAN_FRONTEND=noninteractive the package prints nothing of its own: apt's
    # output and exit status are the outcome, in cloud-init's output log.
    said = guest.run(f"cat {OUTPUT_LOG}").stdout
    assert "Setting up statemesh-node" in said and "\nE: " not in said, said[-1500:]
    # runcmd's shell writes apt's status unless cloud-final.service is stopped first.
    assert guest.run("cat /root/install.rc 2>/dev/null", check=False).stdout.strip() in ("", "0")
    # The agents' lock masked cloud-final.service and spared it while apt ran. Once the
    # grace was over, its stop was cut short: every process of it was killed, the holder
    # and cloud-init among them, and the unit has ended; it stays masked.
    locked = guest.run(f"grep '\"agents-locked\"' {JOURNAL}").stdout
    assert '"spared": ["cloud-final.service"]' in locked.splitlines()[0], locked
    held = guest.run(f"cat {HELD}").stdout.strip()
    guest.wait_for("systemctl show -P ActiveState cloud-final.service | grep -qx -e inactive "
                   "-e failed", "cloud-final.service's end", 120)
    guest.run("journalctl -u statemesh-harden.service --no-pager | grep -q "
              "'cloud-final.service did not stop within 30 s: killing every process of it'")
    assert guest.run(f"test -e /proc/{held}", check=False).returncode == 1
    # What runcmd left running is killed with it: it ran as root in no running unit.
    guest.wait_for(f"! pgrep -f '^{LEFT_BEHIND}'", "the end of what runcmd left running", 60)
    guest.wait_for("systemctl is-enabled cloud-final.service | grep -qx masked",
                   "cloud-final.service's mask", 30)
    how = guest.run("systemctl show -P Result cloud-final.service; "
                    f"grep -c '\"tamper-reasserted\", \"guarantee\": \"agents\"' {JOURNAL}; "
                    f"grep -c '\"killed\": {{\"' {JOURNAL}; "
                    "cloud-init status", check=False).stdout.split("\n")
    measured("cloud-final.service's end, the listener's re-asserts, its kills of what was "
             "left, cloud-init status",
             " / ".join(line.strip() for line in how if line.strip()))
    final = guest.run("statemesh-node status --json", check=False)
    assert final.returncode == 0, final.stdout


GUEST_AGENT = "qemu-guest-agent.service"


@pytest.mark.cost(110)
def test_install_through_the_hypervisors_guest_agent_then_the_agent_is_stopped(
        guest_factory: Callable[..., Guest], provisioned_node: SavedGuest, measured) -> None:
    """The VM's operator installs through qemu-guest-agent's guest-exec (Proxmox's `qm guest
    exec`, libvirt's), without SSH or a terminal. The agent is one of those the installation
    masks and stops, and stopping its unit kills what guest-exec started (its KillMode is
    the default): apt died half-way until the installer's own unit was spared while apt
    runs. Then the agent is stopped, and the hypervisor's way in is gone."""
    guest = guest_factory(saved=provisioned_node)
    started = time.monotonic()
    exit_code = guest.hypervisor_exec(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y statemesh-node "
        "> /root/qga-install.log 2>&1", timeout=900)
    measured("apt-get install through guest-exec", f"{time.monotonic() - started:.0f} s")
    # None: the agent was stopped after apt returned, before the exit status was read.
    assert exit_code in (0, None), guest.run("cat /root/qga-install.log").stdout[-1500:]
    guest.wait_for("! pgrep -x apt-get", "apt-get's end", 120)
    assert guest.run("dpkg-query -W -f '${db:Status-Abbrev}' statemesh-node").stdout.strip() \
        == "ii", guest.run("cat /root/qga-install.log").stdout[-1500:]
    locked = guest.run(f"grep '\"agents-locked\"' {JOURNAL}").stdout
    assert f'"spared": ["{GUEST_AGENT}"]' in locked.splitlines()[0], locked
    guest.wait_for(f"systemctl show -P ActiveState {GUEST_AGENT} | grep -qx -e inactive "
                   "-e failed", "the guest agent's end", 60)
    assert guest.hypervisor_exec("true", timeout=10) is None  # nobody answers any more
    final = guest.run("statemesh-node status --json", check=False)
    assert final.returncode == 0, final.stdout

# The machine's serial console has a getty, as a cloud's or a server's console does.
CONSOLE_GETTY = "serial-getty@ttyS1.service"
ROOT_PASSWORD = "statemesh"  # the test image's (harness.vm.image)
PROMPT = ":~# "


@pytest.mark.cost(100)
def test_install_from_a_console_login_then_the_console_is_closed(
        guest_factory: Callable[..., Guest], provisioned_node: SavedGuest, measured) -> None:
    """Root logs in at the serial console and installs there. The console's getty is masked
    with every other, but spared while apt runs; afterwards the login ends and no prompt
    comes back."""
    guest = guest_factory(saved=provisioned_node)
    console = terminal.Console(guest)
    guest.run(f"systemctl start {CONSOLE_GETTY}")
    console.expect("login: ", 60)
    console.type("root\n")
    console.expect("Password: ", 30)
    console.type(ROOT_PASSWORD + "\n")
    console.expect(PROMPT, 60)
    started = time.monotonic()
    # The status is marked so that the line's echo of what was typed cannot match it.
    console.type('apt-get install -y statemesh-node; echo "INSTALL""-RC=$?"\n')
    said = console.expect("INSTALL-RC=", 900)
    rc = console.expect("\n", 10).strip()
    measured("apt-get install at the console", f"{time.monotonic() - started:.0f} s")
    assert rc == "0", said[-3000:]
    assert "statemesh-node: installed; every guarantee holds" in said, said[-3000:]
    assert guest.run("dpkg-query -W -f '${db:Status-Abbrev}' statemesh-node").stdout.strip() \
        == "ii"

    # apt has returned: the grace is over, the login with it, and the getty stays down.
    guest.wait_for("! loginctl list-sessions --no-legend | grep -q ttyS1", "the login's end", 60)
    guest.wait_for(f"systemctl show -P ActiveState {CONSOLE_GETTY} | grep -qx -e inactive "
                   "-e failed", "the console getty's end", 60)
    console.type("\nroot\n")
    with pytest.raises(terminal.NotSeen):  # the line is open, and nobody answers on it
        console.expect("login: ", 20)
    console.close()
    final = guest.run("statemesh-node status --json", check=False)
    assert final.returncode == 0, final.stdout
