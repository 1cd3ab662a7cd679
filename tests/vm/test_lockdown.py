"""The lockdown end to end on a real Debian guest: apt-get install takes SSH, every login
and every single-user shell away, in one transaction that is never half-done, and purge
gives them back and leaves nothing behind. An installation cut short (killed, power lost)
is finished by the next boot with nobody logged in; one that fails is given back at the
next boot."""

from __future__ import annotations

import json
import re
import time
from typing import Callable, Dict, List

import pytest

from harness.vm import driver, snapshot
from harness.vm.driver import Guest, SavedGuest
from tests.vm import package, ports, terminal
from tests.vm.reports import failing_lines

ENV = {"DEBIAN_FRONTEND": "noninteractive"}
SSH_UNITS = ("ssh.service", "ssh.socket", "sshd.service", "ssh@.service")
GETTYS = ("getty@.service", "serial-getty@.service", "autovt@.service", "console-getty.service",
          "container-getty@.service", "debug-shell.service")
RESCUE = ("rescue.service", "emergency.service", "rescue.target", "emergency.target")
STATE = "/var/lib/statemesh-node/state.json"
MESH = snapshot.MESH_PORT
JOURNAL = "/var/lib/statemesh-node/journal.jsonl"
# Planted by the spared session once preflight has passed (the end-to-end test).
LATE_CRON_JOB = "/etc/cron.d/after-preflight"
USER_RULES = "/etc/ufw/user.rules"
LATE_USER_RULE = "-A ufw-before-input -p tcp --dport 2223 -j ACCEPT"
# The mesh rule negated: every TCP port but the mesh port open to all but the zone's peer.
NEGATED_RULE = f"! -s {ports.HOST_AS_SEEN_BY_GUEST} -p tcp ! --dport {ports.MESH} -j ACCEPT"
NEGATED_RULE_SHOWN = (f"! -s {ports.HOST_AS_SEEN_BY_GUEST} -p tcp -m tcp ! --dport {ports.MESH} "
                      "-j ACCEPT")
# What the spared session leaves running in a unit of its own, root after the grace.
LEFT_BEHIND = "/root/left-behind.sh"
LEFT_BEHIND_SCRIPT = f"""until grep -qF '"event": "state-installed"' {JOURNAL}; do sleep 0.2; done
sed -i 's/^### END RULES ###/{LATE_USER_RULE}\\n&/' {USER_RULES}
iptables -I ufw-user-input 1 {NEGATED_RULE}
exec /usr/bin/sleep 1644
"""
CORE_PATTERN = "/proc/sys/kernel/core_pattern"
GUEST_AGENT = "qemu-guest-agent.service"


@pytest.fixture
def node(guest_factory: Callable[..., Guest], provisioned_node: SavedGuest) -> Guest:
    """A guest provisioned for the node, sshd running and enabled, nothing installed yet
    (restored: the boots these tests prove something across are their own)."""
    return guest_factory(saved=provisioned_node)


def enabled(guest: Guest, *units: str) -> Dict[str, str]:
    result = guest.run(f"systemctl is-enabled {' '.join(units)}", check=False)
    return dict(zip(units, result.stdout.split()))


def active(guest: Guest, unit: str) -> str:
    return guest.run(f"systemctl is-active {unit}", check=False).stdout.strip()


def install_state(guest: Guest) -> str:
    result = guest.run(f"cat {STATE}", check=False)
    return json.loads(result.stdout)["state"] if result.returncode == 0 else "absent"


def package_status(guest: Guest) -> str:
    return guest.run("dpkg-query -W -f '${db:Status-Abbrev}' statemesh-node",
                     check=False).stdout.strip()


def events(guest: Guest) -> List[dict]:
    text = guest.run(f"cat {JOURNAL}", check=False).stdout
    return [json.loads(line) for line in text.splitlines()]


def root_password_status(guest: Guest) -> str:
    return guest.run("passwd -S root").stdout.split()[1]


def assert_locked_down(guest: Guest) -> None:
    assert set(enabled(guest, *SSH_UNITS, *GETTYS, *RESCUE).values()) == {"masked"}
    assert active(guest, "ssh.service") != "active"
    assert active(guest, "ssh.socket") != "active"
    assert guest.run("pgrep -x sshd", check=False).returncode == 1
    assert guest.run("systemctl list-units --no-legend --state=active 'getty@*' "
                     "'serial-getty@*'").stdout.strip() == ""
    assert root_password_status(guest) == "L"
    assert install_state(guest) == "installed"


def assert_untouched(guest: Guest, root_status: str) -> None:
    assert enabled(guest, "ssh.service")["ssh.service"] == "enabled"
    assert active(guest, "ssh.service") == "active"
    assert "masked" not in enabled(guest, *GETTYS, *RESCUE).values()
    assert root_password_status(guest) == root_status


def start_in_background(guest: Guest, unit: str, command: str) -> None:
    """Run a command outside the agent's process tree (as an operator's apt would run)."""
    guest.run(f"systemd-run --unit={unit} --setenv=DEBIAN_FRONTEND=noninteractive "
              f"sh -c {driver.quote(command)}")


def begin_install_and_wait_midway(guest: Guest) -> None:
    """Start apt-get install in the background and return once the transaction is under way."""
    start_in_background(guest, "bg-install",
                        "apt-get install -y statemesh-node > /root/install.log 2>&1; "
                        "echo $? > /root/install.rc")
    guest.wait_for(f"grep -q '\"event\": \"applied\"' {JOURNAL}", "the first applied guarantee",
                   promptly=True)


# The single-user target each release boots into, refused: both are masked alike, and each
# refused boot costs half a minute; rescue on Debian 12, emergency on the others.
SINGLE_USER_TARGET = {"bookworm": "rescue.target"}
# Refused by the terminal filter while installed (EPERM), a pty again once purged.
OPENPTY = "python3 -c 'import os; os.openpty()'"


@pytest.mark.every_release
@pytest.mark.cost(600)
def test_install_locks_down_holds_after_reboot_and_purge_gives_back(
        guest_factory: Callable[..., Guest], provisioned_node: SavedGuest, measured,
        suite: str) -> None:
    """The whole life of a node: the operator's machine (sshd, gettys, a ufw of its own, every
    port answering, qemu-guest-agent running commands for the hypervisor's operator),
    installed as operators do (over SSH, inside tmux or screen, the connection dropped:
    the pane finishes apt and prints the outcome; a unit the spared session started by
    hand is named by status), locked down (the agent silent; only the
    mesh port answers, and only its zone's peer, the host), tampered with, booted into
    a single-user target, rebooted into a zone without the host (nothing answers it), purged
    (everything given back, nothing left)."""
    guest = guest_factory(forward_ports=ports.PORTS, saved=provisioned_node)
    assert enabled(guest, "ssh.service")["ssh.service"] == "enabled"
    assert active(guest, "ssh.service") == "active"
    assert guest.run("systemctl is-active multi-user.target").stdout.strip() == "active"
    assert "/dev/tpm0" not in guest.run("ls /dev/tpm* || true").stdout  # a weak node
    ports.serve_all_ports(guest)
    assert ports.probe(guest) == {ports.MESH: True, ports.SSH: True, ports.OTHER: True}
    guest.run("ufw allow 22/tcp && ufw limit 8080/tcp && ufw --force enable", timeout=600)
    # Prepared: 8080 accepted by hand in one of ufw's own chains (not one check reads),
    # ufw.conf saying disabled, so that `ufw enable` loads nothing while ufw's chains stay,
    # and ufw.service masked, so that no boot loads ufw's rules before the network is up.
    guest.run("iptables -I ufw-before-input -p tcp --dport 8080 -j ACCEPT && "
              "sed -i 's/^ENABLED=yes/ENABLED=no/' /etc/ufw/ufw.conf && "
              "systemctl mask ufw.service")
    assert guest.hypervisor_exec("touch /root/guest-exec-before") == 0  # root, no SSH
    guest.run("test -e /root/guest-exec-before && rm /root/guest-exec-before")
    ufw_before = ports.ufw_state(guest)
    guest.provision(ports.node_conf(f"{ports.HOST_AS_SEEN_BY_GUEST} 192.0.2.0/24"))
    root_before = root_password_status(guest)
    terminal.authorize_a_key(guest)
    paths_before = package.system_paths(guest)
    core_pattern_before = guest.run(f"cat {CORE_PATTERN}").stdout
    started = time.monotonic()
    # tmux on Debian 12, screen on 13: both, for the price of one installation each.
    multiplexer = terminal.SCREEN if suite == "trixie" else terminal.TMUX
    terminal.run_in_multiplexer_over_ssh(guest, multiplexer, "apt-get install -y statemesh-node")
    guest.wait_for("pgrep -x apt-get && loginctl list-sessions --no-legend | grep -q .",
                   f"apt-get in {multiplexer.name}, in the operator's logind session", 120)
    terminal.drop_the_connection(guest)
    # Once preflight has passed (started before, it is refused: the preflight test), the
    # spared session starts a unit by hand from another window: it outlives the session,
    # so status must say so.
    guest.wait_for(f"grep -q '\"event\": \"apply\"' {JOURNAL}", "the transaction's first step",
                   300)
    # The unit, once the transaction has ended (installed: its last check passed), adds an
    # accept to ufw's user rules for a chain the check does not read (ufw.service loads it
    # at every boot) and to the kernel's user chain a negated rule that opens every port
    # but the mesh port, then lives on.
    guest.put(LEFT_BEHIND, LEFT_BEHIND_SCRIPT.encode())
    terminal.open_window(guest, multiplexer, (
        f"systemd-run --unit=left-behind sh {LEFT_BEHIND}; mkdir -p /etc/cron.d; "
        f"echo '* * * * * root /root/way-in' > {LATE_CRON_JOB}; loginctl enable-linger root"))
    guest.wait_for("! pgrep -x apt-get", f"apt-get's end in the {multiplexer.name} window", 900)
    install_seconds = time.monotonic() - started
    said = guest.run(f"cat {terminal.OUTPUT}").stdout
    assert "statemesh-node: installed; every guarantee holds" in said, said
    assert "\nE: " not in said, said
    # The pane's shell may be ended before it writes apt's status; if it wrote one, success.
    assert guest.run(f"cat {terminal.STATUS} 2>/dev/null", check=False).stdout.strip() in ("", "0")
    package.assert_installed_from_the_local_repository(guest, said)
    assert package_status(guest) == "ii"
    # apt has returned: the grace is over, the session with it, the multiplexer and its
    # windows too. (The lingering root's service manager keeps a session of class "manager"
    # (root's: "manager-early") on systemd 256 and later: no terminal, no login.)
    guest.wait_for(f"! pgrep {multiplexer.processes} && "
                   "! loginctl list-sessions --no-legend | grep -v manager | grep -q .",
                   "the installing session's end", 60)
    report = status(guest)
    installation = report["installation"]
    assert not installation["holds"], installation
    assert re.search(r"but programs left running by hand keep running as root: left-behind"
                     r"\.service \(started by hand\): pid [0-9]+ \(/usr/bin/sleep 1644\)",
                     installation["detail"]), installation
    # So does what it planted after preflight had passed: a cron job, a lingering root.
    planted = report["planted"]
    assert not planted["holds"], planted
    assert LATE_CRON_JOB in planted["detail"], planted
    assert "service manager starts at boot without a login: root" in planted["detail"], planted
    firewall = ports.firewall_finding(guest, report)
    assert not firewall["holds"], firewall
    assert (f"{USER_RULES} holds lines ufw does not write there: '{LATE_USER_RULE}'"
            in firewall["detail"]), firewall
    assert f"IPv4 rule not ours: -A ufw-user-input {NEGATED_RULE_SHOWN}" in firewall["detail"]
    guest.run("systemctl stop left-behind.service")  # on a node, the next boot ends it
    guest.run(f"rm {LATE_CRON_JOB} && loginctl disable-linger root && "
              f"sed -i '/^{LATE_USER_RULE}$/d' {USER_RULES} && "
              f"iptables -D ufw-user-input {NEGATED_RULE}")
    # logind stops root's service manager a moment later (UserStopDelaySec).
    guest.wait_for("test \"$(systemctl show -P ActiveState user@0.service)\" = inactive",
                   "the lingering manager's stop", 60)
    report = status(guest)
    assert report["holds"], failing_lines(report)
    assert_locked_down(guest)
    steps = {e["event"]: e["time"] for e in events(guest)}
    measured(f"apt-get install ({multiplexer.name} over ssh, connection dropped)",
             f"{install_seconds:.1f} s wall, transaction in the guest "
             f"{steps['state-installed'] - steps['state-installing']:.1f} s")
    # The hypervisor's operator's way in is gone with sshd: the agent is masked and stopped.
    assert enabled(guest, GUEST_AGENT)[GUEST_AGENT] == "masked"
    assert active(guest, GUEST_AGENT) != "active"
    assert guest.hypervisor_exec("touch /root/guest-exec-after", timeout=20) is None
    assert guest.run("test -e /root/guest-exec-after", check=False).returncode == 1
    ports.serve_all_ports(guest)  # sshd is gone: a listener takes port 22
    assert ports.probe(guest) == {ports.MESH: True, ports.SSH: False, ports.OTHER: False}
    finding = ports.firewall_finding(guest, report)  # nothing changed the firewall since
    assert finding["holds"], finding["detail"]
    assert finding["facts"]["allowed_peers"] == [ports.HOST_AS_SEEN_BY_GUEST, "192.0.2.0/24"]
    assert "Status: active" in guest.run("ufw status").stdout
    assert "ufw allow 22/tcp" not in guest.run("ufw show added").stdout
    assert enabled(guest, "ufw.service")["ufw.service"] == "enabled"

    # Tamper: unmasking ssh is undone by the listener, and logged.
    guest.run("systemctl unmask ssh.service")
    unmasked_at = time.monotonic()
    guest.wait_for("test \"$(systemctl is-enabled ssh.service)\" = masked", "the re-mask", 60,
                   promptly=True)
    measured("tamper re-mask seen by the host after", f"{time.monotonic() - unmasked_at:.2f} s")
    # The listener journals the re-assert once its read-back has confirmed it.
    guest.wait_for(f"grep -q '\"event\": \"tamper-reasserted\", \"guarantee\": \"ssh\"' "
             f"{JOURNAL}", "the tamper-reasserted journal entry", 60)

    # A zone without the host, re-asserted at the boot below from node.conf: the mesh port
    # goes dark too.
    guest.put("/etc/statemesh/node.conf", ports.node_conf("192.0.2.0/24 fd00:77::/64"))
    # A single-user boot gives no shell: PID 1 refuses the masked target and freezes.
    guest.shutdown()
    target = SINGLE_USER_TARGET.get(suite, "emergency.target")
    console = guest.boot_refused(kernel_args=f"systemd.unit={target}")
    assert "masked" in console, console[-3000:]
    for shell_prompt in ("Give root password", "Press Enter for maintenance",
                         "maintenance mode", "login:"):
        assert shell_prompt not in console, console[-3000:]
    guest.power_off_hard()
    # The lockdown holds after a reboot, re-asserted by the boot (one boot proves both this
    # and the single-user refusal above: it did not reach the harden unit).
    guest.boot(kernel_args="")
    guest.wait_until_booted()
    assert_locked_down(guest)
    assert active(guest, "statemesh-harden.service") == "active"
    assert active(guest, "ufw.service") == "active"  # loaded ufw's rules before the network
    this_boot = [e for e in events(guest) if e["boot_id"] == guest.boot_id]
    reasserted = [e for e in this_boot if e["event"] == "lockdown-reasserted"]
    # A boot resets the kernel's loginuid switch, nothing else: set again, no mask made anew.
    assert reasserted and reasserted[-1]["applied"] == ["logins"], this_boot
    assert not any(e["event"] == "logins-locked" for e in this_boot), this_boot
    assert "Operation not permitted" in guest.run(OPENPTY, check=False).stderr  # at boot too
    ports.serve_all_ports(guest)
    assert ports.probe(guest) == {ports.MESH: False, ports.SSH: False, ports.OTHER: False}
    finding = ports.firewall_finding(guest)
    assert finding["holds"], finding["detail"]
    assert finding["facts"]["allowed_peers"] == ["192.0.2.0/24", "fd00:77::/64"]

    ports.stop_serving(guest)
    purge_started = time.monotonic()
    guest.run("apt-get purge -y statemesh-node", env=ENV, timeout=900)
    measured("apt-get purge", f"{time.monotonic() - purge_started:.1f} s wall")
    assert_untouched(guest, root_before)
    assert guest.run("pgrep -x sshd", check=False).returncode == 0
    assert ports.ufw_state(guest) == ufw_before  # ufw.conf says disabled, as it was left
    assert guest.run("ufw status").stdout.strip() == "Status: inactive"
    # sshd is back, with nothing of ours in its way: its banner answers the host.
    assert ports.first_bytes(guest.host_port(ports.SSH)).startswith(b"SSH-")
    assert active(guest, GUEST_AGENT) == "active"  # and the hypervisor's agent
    assert guest.hypervisor_exec("true") == 0
    assert guest.run("test -e /var/lib/statemesh-node", check=False).returncode == 1
    assert sorted(set(package.system_paths(guest)) - set(paths_before)) == []
    assert guest.run(f"cat {CORE_PATTERN}").stdout == core_pattern_before
    # the terminal filter detached and unpinned: terminals open again
    assert guest.run(OPENPTY).returncode == 0
    assert guest.run("ls /sys/fs/bpf").stdout.split() == []


LOGIND_PROCS = "/sys/fs/cgroup/system.slice/systemd-logind.service/cgroup.procs"
PTY_HOLDER = "import os, time; os.openpty(); time.sleep(1641)"
# Prepared before installing: every unit whose name starts with statemesh- runs this instead.
PREFIX_DROPIN = "/etc/systemd/system/statemesh-.service.d/50-planted.conf"


# Planted for root's programs to load or run later: preflight names each; and the .pth, which
# every Python started without -S runs, records who ran it: never one of the package's
# processes.
PRELOADED = "/usr/lib/x86_64-linux-gnu/libm.so.6"  # harmless: every Python loads it anyway
LOCAL_PTH = "/usr/local/lib/python3.{minor}/dist-packages/zz-planted.pth"
SYSTEM_PTH = "/usr/lib/python3/dist-packages/zz-planted.pth"
RAN = "/root/planted-pth-ran"
PTH = (f"import os; open({RAN!r}, 'a').write(open('/proc/self/cmdline').read()"
       ".replace(chr(0), ' ') + chr(10))\n")
# Every service inherits the manager's environment: the node's own switches (a library of
# the operator's choosing) and a system bus of root's. Set last: services started after it
# (systemd-nspawn's, registering with machined) would look for that bus.
PLANTED_VARIABLES = ("STATEMESH_TPM_BACKEND=direct",
                     "DBUS_SYSTEM_BUS_ADDRESS=unix:path=/root/system_bus_socket")


def plant_code_for_roots_programs(guest: Guest) -> None:
    minor = guest.run("python3 -c 'import sys; print(sys.version_info[1])'").stdout.strip()
    local_pth = LOCAL_PTH.format(minor=minor)
    guest.run(f"mkdir -p {local_pth.rsplit('/', 1)[0]}")
    for path in (local_pth, SYSTEM_PTH):
        guest.put(path, PTH.encode())
    guest.put("/etc/ld.so.preload", f"{PRELOADED}\n".encode())
    guest.run("systemctl set-environment PYTHONSTARTUP=/root/startup.py")
    guest.run(f"rm -f {RAN} && python3 -c pass && grep -q 'python3 -c pass' {RAN}")  # it runs


# Programs the kernel itself runs as root when anyone asks: a module loader of root's (which
# loads the module as the real one would, so that nothing else changes), a power-off command
# (a hypervisor's shutdown request), an interpreter registered with binfmt_misc, a
# request-key program (keyutils is not installed) and request-key's configuration, and
# what would set them again at every boot.
MODULE_LOADER = "/root/way-in-modprobe"
SYSCTL_WAY_IN = "/etc/sysctl.d/99-way-in.conf"
BINFMT_WAY_IN = "/etc/binfmt.d/way-in.conf"
REQUEST_KEY_WAY_IN = "/etc/request-key.d/way-in.conf"
REQUEST_KEY = "/sbin/request-key"


def plant_kernel_helpers(guest: Guest) -> None:
    """Last before the installation: the module loader serves every module request after it."""
    guest.run(f"mkdir -p {SYSCTL_WAY_IN.rsplit('/', 1)[0]} {BINFMT_WAY_IN.rsplit('/', 1)[0]} "
              f"{REQUEST_KEY_WAY_IN.rsplit('/', 1)[0]}")
    guest.put(SYSCTL_WAY_IN, b"kernel.core_pattern = |/root/way-in\n")
    guest.put(BINFMT_WAY_IN, b":way-in-later:E::wayinlater::/root/way-in:\n")
    guest.put(REQUEST_KEY_WAY_IN, b"create user way-in:* * /root/way-in %k\n")
    guest.run("echo ':way-in:E::wayin::/root/way-in:OC' > /proc/sys/fs/binfmt_misc/register")
    guest.put(REQUEST_KEY, b"#!/bin/sh\n/root/way-in\n", mode=0o755)
    guest.run("sysctl -q -w kernel.poweroff_cmd=/root/way-in")
    guest.put(MODULE_LOADER, b"#!/bin/sh\nexec /sbin/modprobe \"$@\"\n", mode=0o755)
    guest.run(f"sysctl -q -w kernel.modprobe={MODULE_LOADER}")


# Kernel code of root's: a packaged module loaded with its signature cut off (what any module
# root builds is: unsigned), and a module file no package installed, for modprobe to load at
# a request or a boot.
UNSIGNED_MODULE = "dummy"
PLANTED_MODULE = "/lib/modules/{release}/updates/way-in.ko"
# A signed module ends in its signature, 12 bytes saying how long it is, and this marker.
CUT_SIGNATURE = """import sys
data = open(sys.argv[1], "rb").read()
marker = b"~Module signature appended~\\n"
assert data.endswith(marker), "not signed"
length = int.from_bytes(data[-len(marker) - 4:-len(marker)], "big")
open(sys.argv[2], "wb").write(data[:-len(marker) - 12 - length])
"""


def plant_kernel_modules(guest: Guest) -> str:
    """Load an unsigned module and leave a module file behind; returns the file's path."""
    planted = PLANTED_MODULE.format(release=guest.run("uname -r").stdout.strip())
    guest.put("/root/cut-signature.py", CUT_SIGNATURE.encode())
    guest.run(f"f=$(modinfo -n {UNSIGNED_MODULE}) && case $f in *.xz) xz -dc $f;; *) cat $f;; "
              "esac > /root/signed.ko && "
              "python3 /root/cut-signature.py /root/signed.ko /root/unsigned.ko && "
              "insmod /root/unsigned.ko numdummies=0 && "
              f"mkdir -p {planted.rsplit('/', 1)[0]} && cp /root/signed.ko {planted}")
    return planted


# A container of root's, systemd-container's packaged unit started by hand: it runs what its
# settings say (a sleep here; a reverse shell as easily) as root until the next boot, and
# nothing the boot starts pulls it in. Its tree borrows the machine's /usr.
CONTAINER = "systemd-nspawn@box.service"
CONTAINER_SETTINGS = (b"[Exec]\nBoot=no\nParameters=/usr/bin/sleep 1648\nPrivateUsers=no\n"
                      b"[Files]\nBindReadOnly=/usr\n[Network]\nVirtualEthernet=no\n")


def start_a_container_by_hand(guest: Guest) -> None:
    tree = "/var/lib/machines/box"
    guest.run(f"mkdir -p {tree}/etc {tree}/usr /etc/systemd/nspawn && "
              f"cp -L /etc/os-release {tree}/etc/ && "
              f"for d in bin sbin lib lib64; do ln -sfn usr/$d {tree}/$d; done")
    guest.put("/etc/systemd/nspawn/box.nspawn", CONTAINER_SETTINGS)
    guest.run(f"systemctl start {CONTAINER}")


WAY_BACK_DROPIN = "/etc/systemd/system/unattended-upgrades.service.d/50-way-back.conf"
FORGED_PURGE_DROPIN = "/run/systemd/system/statemesh-watchdog.service.d/50-statemesh-purge.conf"
TMPFILES_WAY_IN = "/etc/tmpfiles.d/zz-way-in.conf"
SYSUSERS_WAY_IN = "/etc/sysusers.d/zz-way-in.conf"
APT_HOOK = "/etc/apt/apt.conf.d/99way-back"
DPKG_HOOK = "/etc/dpkg/dpkg.cfg.d/way-back"
APT_LATER, APT_LATER_TARGET = "/etc/apt/apt.conf.d/99later", "/tmp/statemesh-later"
KERNEL_HOOK = "/etc/kernel/postinst.d/zz-way-in"
UDEV_RULE = "/etc/udev/rules.d/99-way-in.rules"
# Commands the network's programs run as root: ifupdown's at every boot, wg-quick's and
# OpenVPN's when their interface comes up (their units enabled before, or pulled in later).
IFUPDOWN_WAY_IN = "/etc/network/interfaces.d/way-in"
WIREGUARD_WAY_IN = "/etc/wireguard/wg-way-in.conf"
OPENVPN_WAY_IN = "/etc/openvpn/client/way-in.conf"
# GRUB's settings are shell that update-grub sources as root: a command is planted, an
# operator's console setting is not.
GRUB_HOOK = "/etc/default/grub.d/99-way-in.cfg"
GRUB_CONSOLE = "/etc/default/grub.d/50-console.cfg"
# What ufw.service runs, sources and loads as root at every boot: an init script made
# executable, a command in a settings file, a port opened in ufw's own chain.
UFW_INIT_WAY_IN = "/etc/ufw/before.init"
UFW_CONF = "/etc/ufw/ufw.conf"
UFW_BEFORE_RULES = "/etc/ufw/before.rules"
# Read by GRUB itself at every boot (41_custom), never rewritten by update-grub: an entry
# of root's own, booted next (grub-reboot) or by default.
GRUB_CUSTOM = "/boot/grub/custom.cfg"


def plant_jobs_for_later(guest: Guest) -> None:
    """Root's jobs for after the lockdown: cron (a crontab and a system table), at, a timer,
    a service and a drop-in, boot scripts, apt's and dpkg's hooks, a kernel hook and a udev
    rule, commands in the network's configuration and in ufw's boot-time files, GRUB's
    settings and entries."""
    guest.run("mkdir -p /var/spool/cron/crontabs /var/spool/cron/atjobs /etc/cron.d")
    guest.put("/var/spool/cron/crontabs/root", b"@reboot /root/way-in\n", mode=0o600)
    guest.put("/var/spool/cron/atjobs/a00001019a2b3c", b"#!/bin/sh\n/root/way-in\n", mode=0o700)
    guest.put("/etc/cron.d/way-in", b"* * * * * root /root/way-in\n")
    guest.run("systemd-run --unit=way-in --on-calendar=hourly /bin/true")
    # Started by hand and left running: it would dial out and hand over a shell (here it
    # only sleeps); gone at the next boot, but nothing of the lockdown ends it before. Its
    # file deleted and systemd reloaded, it runs on, still transient to systemd.
    guest.run("systemd-run --unit=dial-out sleep 1642 && rm /run/systemd/transient/dial-out.service"
              " && systemctl daemon-reload")
    # A service that would dial out and hand over a shell (here it only sleeps), linked in
    # from root's home and enabled; and a drop-in adding a command to a packaged service.
    guest.put("/root/way-back.service", b"[Service]\nExecStart=/bin/sleep infinity\n"
              b"[Install]\nWantedBy=multi-user.target\n")
    guest.run("systemctl enable /root/way-back.service")
    for dropin in (WAY_BACK_DROPIN, FORGED_PURGE_DROPIN):
        guest.run(f"mkdir -p {dropin.rsplit('/', 1)[0]}")
    guest.put(WAY_BACK_DROPIN, b"[Service]\nExecStartPost=/bin/sleep 1\n")
    # The package's own purge drop-in, by name, saying more than it ever does.
    guest.put(FORGED_PURGE_DROPIN, b"[Unit]\nRefuseManualStop=no\n[Service]\n"
              b"ExecStartPre=/bin/true\n")
    # What runs at boot with no unit file: an init script, rc.local, a lingering user.
    guest.put("/etc/init.d/way-back", b"#!/bin/sh\n/bin/true\n", mode=0o755)
    guest.put("/etc/rc.local", b"#!/bin/sh\n/bin/true\n", mode=0o755)
    guest.run("loginctl enable-linger root")
    # What systemd-tmpfiles and systemd-sysusers apply at every boot: a library preloaded
    # into every program, and a tenant's user given the TPM again after preflight.
    guest.run("mkdir -p /etc/tmpfiles.d /etc/sysusers.d")
    guest.put(TMPFILES_WAY_IN, b"w+ /etc/ld.so.preload - - - - /root/way-in.so\n")
    guest.put(SYSUSERS_WAY_IN, b"m nobody tss\n")
    # Commands apt and dpkg run as root at every run (unattended upgrades): harmless here,
    # since they run during this test's own apt-get.
    guest.put(APT_HOOK, b'DPkg::Post-Invoke {"/bin/true";};\n')
    guest.put(DPKG_HOOK, b"post-invoke=/bin/true\n")
    # A part that is a link to a name in /tmp: nothing today, anyone's after the next boot.
    guest.run(f"ln -s {APT_LATER_TARGET} {APT_LATER}")
    # Hooks of packaged programs: a kernel update's, and udev's at every device event.
    guest.run(f"mkdir -p {KERNEL_HOOK.rsplit('/', 1)[0]} {UDEV_RULE.rsplit('/', 1)[0]}")
    guest.put(KERNEL_HOOK, b"#!/bin/sh\n/root/way-in\n", mode=0o755)
    guest.put(UDEV_RULE, b'ACTION=="add", RUN+="/root/way-in"\n')
    for planted in (IFUPDOWN_WAY_IN, WIREGUARD_WAY_IN, OPENVPN_WAY_IN):
        guest.run(f"mkdir -p {planted.rsplit('/', 1)[0]}")
    guest.run("echo 'source /etc/network/interfaces.d/*' >> /etc/network/interfaces")
    guest.put(IFUPDOWN_WAY_IN, b"iface lo inet loopback\n    post-up /root/way-in\n")
    guest.put(WIREGUARD_WAY_IN, b"[Interface]\nPrivateKey = x\nPostUp = /root/way-in\n")
    guest.put(OPENVPN_WAY_IN, b"client\nup /root/way-in\n")
    guest.run(f"mkdir -p {GRUB_HOOK.rsplit('/', 1)[0]}")
    guest.put(GRUB_HOOK, b'GRUB_CMDLINE_LINUX="$(/root/way-in)"\n')
    guest.put(GRUB_CONSOLE, b'GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT '
              b'console=ttyS0,115200"\nGRUB_TIMEOUT=1\n')
    guest.put(UFW_INIT_WAY_IN, b"#!/bin/sh\n/root/way-in &\n", mode=0o755)
    guest.run(f"echo '/root/way-in &' >> {UFW_CONF} && "
              f"sed -i 's/^COMMIT$/-A ufw-before-input -p tcp --dport 2222 -j ACCEPT\\nCOMMIT/' "
              f"{UFW_BEFORE_RULES}")
    guest.run("mkdir -p /boot/grub")
    guest.put(GRUB_CUSTOM, b"menuentry 'way in' --unrestricted {\n"
              b"\tlinux /vmlinuz root=/dev/vda1 init=/bin/sh\n\tinitrd /initrd.img\n}\n")


@pytest.mark.cost(50)
def test_a_second_session_and_planted_code_make_preflight_refuse_and_nothing_changes(
        node: Guest) -> None:
    guest = node
    root_before = root_password_status(guest)
    plant_code_for_roots_programs(guest)
    plant_jobs_for_later(guest)
    guest.run(f"mkdir -p {PREFIX_DROPIN.rsplit('/', 1)[0]}")
    guest.put(PREFIX_DROPIN, b"[Service]\nExecStart=\nExecStart=/bin/sleep infinity\n")
    guest.run("fallocate -l 32M /root/swapfile && chmod 600 /root/swapfile && "
              "mkswap -q /root/swapfile && swapon /root/swapfile")
    # A real login on a pseudo-terminal (what `w` shows), kept open by a detached service.
    start_in_background(guest, "second-login", "exec /usr/bin/python3 -c 'import os, pty, time\n"
                        "pid, fd = pty.fork()\n"
                        "if pid == 0: os.execv(\"/bin/login\", [\"login\", \"-f\", \"root\"])\n"
                        "time.sleep(3600)'")
    guest.wait_for("loginctl list-sessions --no-legend | grep -q pts", "the second session", 60)
    # A shell kept aside: no loginuid, writing itself into logind's cgroup (which the
    # watchdog exempts), holding a pty: preflight names it, wherever it ended up.
    start_in_background(guest, "kept-aside", "echo 4294967295 > /proc/self/loginuid; "
                        f"echo $$ > {LOGIND_PROCS}; exec python3 -c {driver.quote(PTY_HOLDER)}")
    guest.wait_for("pgrep -f '[s]leep.1641'", "the kept-aside shell", 60)
    start_a_container_by_hand(guest)
    guest.run(f"systemctl set-environment {' '.join(PLANTED_VARIABLES)}")
    # A tenant's user given the TPM: it could make the node's attestation key quote anything.
    guest.run("usermod -aG tss nobody")
    plant_kernel_helpers(guest)
    planted_module = plant_kernel_modules(guest)
    refused = guest.run("apt-get install -y statemesh-node", env=ENV, check=False, timeout=900)
    said = refused.stdout + refused.stderr  # dpkg runs maintainer scripts on a pty
    assert refused.returncode != 0
    assert "refusing to install" in said and "interactive session" in said, said
    assert f"statemesh-harden.service has drop-ins: {PREFIX_DROPIN}" in said, said
    watchdog_line = next(line for line in said.splitlines()
                         if "statemesh-watchdog.service has drop-ins: " in line)
    assert PREFIX_DROPIN in watchdog_line and FORGED_PURGE_DROPIN in watchdog_line, said
    assert "swap on /root/swapfile is not compressed RAM" in said, said
    assert "time.sleep(1641)) holds a pty outside the installing session" in said, said
    for planted in (f"/etc/ld.so.preload loads {PRELOADED} into every program",
                    "the service manager's environment sets PYTHONSTARTUP",
                    "the service manager's environment sets STATEMESH_TPM_BACKEND",
                    "the service manager's environment sets DBUS_SYSTEM_BUS_ADDRESS",
                    "accounts that reach the node's TPM or its aTLS endpoint hold others: "
                    "group tss has members: nobody",
                    "/dist-packages/zz-planted.pth (remove them)",  # /usr/local's
                    "interpreter startup hooks not as a package installed them", SYSTEM_PTH,
                    "crontabs of root in /var/spool/cron/crontabs",
                    "at jobs pending in /var/spool/cron/atjobs: "
                    "/var/spool/cron/atjobs/a00001019a2b3c",
                    "cron jobs not as a package installed them: /etc/cron.d/way-in",
                    "systemd timers no package installed: /run/systemd/transient/way-in.timer",
                    "programs left running by hand, which would keep running as root after "
                    "the lockdown: dial-out.service (started by hand): pid ",
                    "systemd units no package installed, which would run as root: "
                    "/etc/systemd/system/way-back.service (",
                    "systemd drop-ins no package installed, which change what a unit runs: "
                    f"{PREFIX_DROPIN}, {WAY_BACK_DROPIN}, {FORGED_PURGE_DROPIN} (",
                    "init scripts no package installed, which systemd runs as services: "
                    "/etc/init.d/way-back (",
                    "/etc/rc.local is executable: rc-local.service runs it at every boot",
                    "systemd-tmpfiles and systemd-sysusers configuration not as a package "
                    "installed it, applied as root at every boot (files written, links made, "
                    f"accounts and group members added): {SYSUSERS_WAY_IN}, {TMPFILES_WAY_IN} (",
                    "users whose service manager starts at boot without a login: root (",
                    f"apt configuration {APT_HOOK} runs commands as root at every apt run and "
                    "no package installed it so: DPkg::Post-Invoke (",
                    f"dpkg configuration {DPKG_HOOK} runs commands as root at every dpkg run "
                    "and no package installed it so: post-invoke (",
                    f"apt or dpkg configuration: {APT_LATER} is a link to {APT_LATER_TARGET}, "
                    "and /tmp is writable by others than root (",
                    "network configuration names commands ifupdown runs as root whenever an "
                    "interface goes up or down, at every boot: "
                    f"{IFUPDOWN_WAY_IN}: post-up (line 2) (",
                    "network configuration names commands wg-quick runs as root whenever its "
                    f"interface goes up or down: {WIREGUARD_WAY_IN}: PostUp (line 3) (",
                    "network configuration names commands OpenVPN runs or loads as root at its "
                    f"connections: {OPENVPN_WAY_IN}: up (line 2) (",
                    "hooks of packaged programs not as a package installed them, run as root "
                    "later (kernel and initramfs updates, the initramfs at boot, needrestart, "
                    "logrotate, udev, modprobe, network events, key requests, log messages, "
                    "sysfs at boot): "
                    f"{GRUB_HOOK}, {KERNEL_HOOK}, {REQUEST_KEY_WAY_IN} and 1 more (",
                    f"/proc/sys/kernel/modprobe is '{MODULE_LOADER}', which the kernel runs as "
                    "root at every module request",
                    "/proc/sys/kernel/poweroff_cmd is '/root/way-in', which the kernel runs as "
                    "root at an orderly power-off",
                    f"the kernel runs {REQUEST_KEY} as root whenever any user asks for a key it "
                    f"does not hold: {REQUEST_KEY} is not a program as a package installed it",
                    "binfmt_misc registrations whose interpreter the kernel runs whenever a "
                    "matching file is executed (as root for root's programs, and with flag C "
                    "for a setuid file): way-in (flags OC): /root/way-in",
                    "sysctl files not as a package installed them set a program the kernel runs "
                    "as root (kernel.modprobe at module requests, kernel.hotplug at device "
                    "events, kernel.core_pattern at crashes) at every boot: "
                    f"{SYSCTL_WAY_IN} (kernel.core_pattern) (",
                    "binfmt.d files not as a package installed them, registered at every boot: "
                    "the kernel runs their interpreters whenever a matching file is executed: "
                    f"{BINFMT_WAY_IN} (",
                    "kernel modules loaded that the distribution's kernel does not vouch for, "
                    "running in the kernel with no check seeing what they do: "
                    f"{UNSIGNED_MODULE} (E: not signed by a key the kernel trusts) (",
                    "kernel module files no package installed, which modprobe loads as kernel "
                    f"code at a request or at boot: {planted_module} ("):
        assert planted in said, said
    for planted in (f"{UFW_INIT_WAY_IN} is executable and differs from the ufw package's "
                    "/usr/share/ufw/before.init: ufw.service runs it as root at every boot",
                    f"{UFW_CONF} holds more than ufw's settings with literal values: "
                    "ufw.service sources it as shell, as root, at every boot",
                    f"{UFW_BEFORE_RULES} differs from the ufw package's "
                    "/usr/share/ufw/iptables/before.rules: ufw.service loads it into the kernel "
                    "at every boot"):
        assert planted in said, said
    assert GRUB_CONSOLE not in said, said
    assert f"{GRUB_CUSTOM} holds commands, which GRUB runs at every boot" in said, said
    assert re.search(r"dial-out\.service \(started by hand\): pid [0-9]+ "
                     r"\(/usr/bin/sleep 1642\)", said), said
    assert re.search(rf"{re.escape(CONTAINER)} \(started on request: nothing the boot starts "
                     r"pulls it in or triggers it\): pid [0-9]+ \(systemd-nspawn .*"
                     r"pid [0-9]+ \(/usr/bin/sleep 1648\)", said), said
    # Root's other Python programs ran it (dpkg's py3compile among them); the package's
    # own processes, /usr/bin/statemesh-node, did not.
    ran = guest.run(f"cat {RAN}").stdout
    assert "py3compile" in ran and "/usr/bin/statemesh-node" not in ran, ran
    assert_untouched(guest, root_before)
    assert guest.run("test -e /var/lib/statemesh-node/restore.json", check=False).returncode == 1
    assert package_status(guest) != "ii"
    assert active(guest, "statemesh-watchdog.service") != "active"


# Root's command at every boot, run by kernel-command-line.service (which the boot wants,
# so nothing tells it from the machine's own); `true` stands for a reverse shell. Without
# systemd.unit=, systemd.run= boots into kernel-command-line.target alone (no D-Bus). GRUB's
# settings would keep it there (the host tests read those).
BOOT_COMMAND = "systemd.run=/usr/bin/true systemd.run_success_action=none"


@pytest.mark.cost(100)
def test_a_command_on_the_kernel_command_line_makes_preflight_refuse(node: Guest) -> None:
    guest = node
    guest.reboot(kernel_args=f"{BOOT_COMMAND} systemd.unit=multi-user.target")
    guest.wait_until_booted()
    assert guest.run("systemctl show -P Result kernel-command-line.service").stdout.strip() \
        == "success"  # it ran, as root
    refused = guest.run("apt-get install -y statemesh-node", env=ENV, check=False, timeout=900)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert (f"this boot's kernel command line has {BOOT_COMMAND}, which runs something as "
            "root at boot or keeps the node's units from running") in said, said
    assert package_status(guest) != "ii"
    assert active(guest, "ssh.service") == "active"


def status(guest: Guest) -> dict:
    return json.loads(guest.run("statemesh-node status --json", check=False).stdout)


def assert_installed_at_boot_without_anyone(guest: Guest, interrupted_in: str,
                                             converge: bool = True) -> None:
    """The boot after the interruption ran the transaction again, by itself, to the end:
    every guarantee holds; dpkg catches up by the normal path (dpkg --configure -a here),
    and the postinst finds the node installed (`converge`: the catch-up is the same
    whichever step the interruption cut, once the boot has installed the node)."""
    old_boot = [e for e in events(guest) if e["boot_id"] != guest.boot_id]
    assert {"event": "apply", "guarantee": interrupted_in} in [
        {k: e.get(k) for k in ("event", "guarantee")} for e in old_boot]
    assert "state-installed" not in [e["event"] for e in old_boot]
    state = json.loads(guest.run(f"cat {STATE}").stdout)
    assert (state["state"], state["attempt"], state["boot_id"]) == ("installed", 2, guest.boot_id)
    report = status(guest)
    assert report["holds"], failing_lines(report)
    assert package_status(guest) != "ii"
    assert "dpkg still has the package" in report["installation"]["detail"]
    assert_locked_down(guest)
    if not converge:
        return
    guest.run("dpkg --configure -a", env=ENV, timeout=900)
    assert package_status(guest) == "ii"
    assert status(guest)["holds"]


@pytest.mark.cost(215)
def test_sigkill_of_the_hardening_means_reboot_required_then_the_boot_finishes_it(
        node: Guest) -> None:
    guest = node
    begin_install_and_wait_midway(guest)
    guest.run("kill -KILL $(systemctl show -p MainPID --value statemesh-harden.service)")
    rc = guest.wait_for("cat /root/install.rc", "apt-get to finish")
    assert int(rc) != 0
    assert install_state(guest) == "installing"
    assert package_status(guest) != "ii"
    again = guest.run("statemesh-node install", check=False)
    assert again.returncode == 1 and "reboot required" in again.stderr
    # The harden unit does not touch a node whose installation was interrupted in this boot.
    untouched = guest.run("statemesh-node harden --no-listen")
    assert "nothing to do until the installation is retried" in untouched.stdout
    assert "reboot required" in status(guest)["installation"]["detail"]

    guest.reboot()
    guest.wait_until_booted()
    assert_installed_at_boot_without_anyone(guest, interrupted_in="ssh")


def count(guest: Guest, pattern: str) -> int:
    """How many lines of the installation's journal contain `pattern`."""
    found = guest.run(f"grep -cF {driver.quote(pattern)} {JOURNAL} || true").stdout.strip()
    return int(found or 0)  # no journal yet: nothing was ever installed


HELPER = "[s]tatemesh-node install"  # the postinst's waiting helper (bracketed: not pgrep's sh)
INSTALLED = '"event": "state-installed"'


def interrupt_in_step(guest: Guest, command: str, step: str, signal: str) -> str:
    """Run `command` as a shell runs a job, in a process group of its own (`setsid -w`,
    the waiting shell outside it; no terminal, so apt gives dpkg none either) and with
    apt's default frontend (the postinst's helper then reports the outcome); once the
    transaction's `step` has begun, the helper still waiting, send `signal` to that whole
    group, as Ctrl-C, `kill` or `kill -9` of the job does; wait until the transaction has
    ended and the helper is gone. Returns what the job printed."""
    applying = f'"event": "apply", "guarantee": "{step}"'
    before = (count(guest, applying), count(guest, INSTALLED))
    job = (f"setsid -w {command} > /root/job.log 2>&1; echo $? > /root/job.rc; "
           "exec sleep infinity")
    guest.run("rm -f /root/job.rc /root/job.log && "
              f"systemd-run --unit=job-{signal.lower()} sh -c {driver.quote(job)}")
    guest.wait_for(f"test $(grep -cF {driver.quote(applying)} {JOURNAL}) -gt {before[0]}",
                   f"the {step} step", promptly=True)
    guest.run(f"pgrep -f '{HELPER}'")  # the outcome is not out yet
    guest.run(f"python3 -c 'import os, signal, sys; os.killpg(int(sys.argv[1]), "
              f"signal.SIG{signal})' $(pgrep -o -x {command.split()[0]})")
    guest.wait_for(f"test $(grep -cF {driver.quote(INSTALLED)} {JOURNAL}) -gt {before[1]} "
                   f"&& test -e /root/job.rc && ! pgrep -f '{HELPER}'", "the transaction's end",
                   600)
    guest.run(f"systemctl stop job-{signal.lower()}")  # the terminal the job ran in, closed
    return guest.run("cat /root/job.log").stdout


def retry_command(guest: Guest) -> str:
    """What an operator types next: dpkg's own catch-up when it is behind, else a reinstall
    (apt refuses to install anything while dpkg is behind)."""
    if package_status(guest) == "ii":
        return "apt-get install -y --reinstall statemesh-node"
    return "dpkg --configure -a"


def assert_hardened_and_status_tells_dpkgs_story(guest: Guest) -> str:
    """Locked down, status holds, and says dpkg is behind exactly when dpkg is; dpkg's state."""
    assert_locked_down(guest)
    dpkg = package_status(guest)
    report = status(guest)
    assert report["holds"], failing_lines(report)
    behind = "dpkg still has the package" in report["installation"]["detail"]
    assert behind == (dpkg != "ii"), (dpkg, report["installation"])
    return dpkg


OUTCOME = "statemesh-node: installed; every guarantee holds"


@pytest.mark.cost(440)
def test_ctrl_c_hangup_kill_and_kill_9_of_apt_end_hardened_and_a_plain_retry_converges(
        node: Guest, measured) -> None:
    """The operator interrupts apt's job four ways, each during another of the
    transaction's steps: the first installation, then each retry an operator would type.
    The transaction runs in its unit and always ends installed; the helper outlives Ctrl-C,
    a closed terminal and `kill`; dpkg's state and status tell one story; a plain retry
    converges."""
    guest = node
    said = interrupt_in_step(guest, "apt-get install -y statemesh-node", "ssh", "INT")
    assert OUTCOME in said, said
    measured("dpkg after Ctrl-C of apt-get install",
             assert_hardened_and_status_tells_dpkgs_story(guest))

    said = interrupt_in_step(guest, retry_command(guest), "firewall", "TERM")
    assert OUTCOME in said, said  # dpkg dies of SIGTERM; the helper outlives it
    assert assert_hardened_and_status_tells_dpkgs_story(guest) != "ii"

    # The terminal closed (a dropped connection without tmux): SIGHUP to the job, here the
    # retry `dpkg --configure -a` (dpkg is behind since the `kill` above).
    said = interrupt_in_step(guest, retry_command(guest), "watchdog", "HUP")
    assert OUTCOME in said, said  # dpkg dies of SIGHUP; the helper outlives it
    assert assert_hardened_and_status_tells_dpkgs_story(guest) != "ii"

    said = interrupt_in_step(guest, retry_command(guest), "storage", "KILL")
    assert OUTCOME not in said, said  # nothing outlives SIGKILL
    assert assert_hardened_and_status_tells_dpkgs_story(guest) != "ii"

    guest.run(retry_command(guest), env=ENV, timeout=900)  # the plain retry, once more
    assert assert_hardened_and_status_tells_dpkgs_story(guest) == "ii"


# Where the power goes: during one of the lockdown's first steps and during the last, the
# storage's (the guarantees' order: ssh, agents, logins, rescue, memory, firewall, class,
# watchdog, storage). The steps between are interrupted by signals in the Ctrl-C test (the
# firewall's, the watchdog's) and, for a power cut in the watchdog's, were until stop 46
# (three minutes of the suite's time each).
CUT_POINTS = ("logins", "storage")


@pytest.mark.cost(250)
@pytest.mark.parametrize("step", CUT_POINTS)
def test_power_loss_midway_ends_installed_at_the_next_boot_with_nobody_logged_in(
        node: Guest, step: str) -> None:
    guest = node
    start_in_background(guest, "bg-install", "apt-get install -y statemesh-node")
    guest.wait_for(f"grep -q '\"event\": \"apply\", \"guarantee\": \"{step}\"' {JOURNAL}",
                   f"the {step} step", promptly=True)
    guest.power_off_hard()
    guest.boot()
    guest.wait_until_booted()
    # dpkg's catch-up after the boot (the node installed, dpkg half-configured) is the same
    # whichever step was cut: run once, after the last (a minute and a half each).
    assert_installed_at_boot_without_anyone(guest, interrupted_in=step,
                                            converge=step == CUT_POINTS[-1])


# ufw as broken as it can be for the transaction: `ufw enable` fails, every time.
BROKEN_UFW = """#!/bin/sh
case " $* " in *" enable "*) echo "ufw: broken on purpose by the test" >&2; exit 1;; esac
exec /usr/sbin/ufw.real "$@"
"""


@pytest.mark.cost(150)
def test_a_step_that_always_fails_gives_the_machine_back_at_the_next_boot(
        node: Guest) -> None:
    guest = node
    root_before = root_password_status(guest)
    getty = "serial-getty@ttyS0.service"
    assert active(guest, getty) == "active"
    guest.run("mv /usr/sbin/ufw /usr/sbin/ufw.real")
    guest.put("/usr/sbin/ufw", BROKEN_UFW.encode(), mode=0o755)
    failed = guest.run("apt-get install -y statemesh-node", env=ENV, check=False, timeout=900)
    assert failed.returncode != 0
    assert "firewall failed" in failed.stdout + failed.stderr
    assert install_state(guest) == "failed"
    assert enabled(guest, "ssh.service")["ssh.service"] == "masked"  # half-applied until...
    # Its aTLS endpoint, started with the package's other units, answers a customer all the
    # same: not ready, under its TPM's signature, naming why.
    guest.run(f"for i in $(seq 300); do ss -Hltn 'sport = :{MESH}' | grep -q . && exit 0; "
              "sleep 0.2; done; journalctl -u statemesh-atls --no-pager; exit 1", timeout=110)
    report = json.loads(guest.run(f"statemesh-node verify --allow-weak --json 127.0.0.1:{MESH}",
                                  check=False, timeout=180).stdout)
    assert (report["verdict"], report["code"]) == ("refused", "not-ready"), report
    assert report["reason"].startswith(
        "not ready: not installed; installation: not installed"), report

    guest.reboot()  # ...the reboot an interrupted or failed installation demands
    guest.wait_until_booted()
    # The give-back runs after the harden unit reported ready (what it starts again is
    # ordered after that unit), so the boot can finish first.
    guest.wait_for(f"grep -q '\"state\": \"given-back\"' {STATE}", "the give-back at boot")
    assert install_state(guest) == "given-back"
    assert_untouched(guest, root_before)
    guest.wait_for(f"systemctl is-active --quiet {getty}", "the console getty, given back")
    installation = status(guest)["installation"]
    assert not installation["holds"]
    assert installation["detail"].startswith("not installed: given back at boot: firewall failed")
    assert "broken on purpose" in installation["detail"]
