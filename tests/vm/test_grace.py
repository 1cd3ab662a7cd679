"""The installation grace ends, whatever the operator prepared before installing.

The operator installs over SSH, as README says, but from a shell renamed `apt`
(`exec -a apt bash`: the name of a package manager on a process that is none), and with an
apt hook that never returns, so that apt itself never exits. Before the grace was bounded,
the renamed shell was taken for the installer and its session was spared for as long as it
lived: a root shell on an installed node that status called locked down. Now the installer is
apt-get by its executable, status and selftest name the spared session while it lasts, and
the session ends AFTER_TRANSACTION seconds after the transaction, apt with it.
"""

from __future__ import annotations

import json
import time
from typing import Callable

import pytest

from harness.vm.driver import Guest, SavedGuest
from statemesh import grace
from tests.vm import terminal

GRACE_RECORD = "/run/statemesh-node/install-grace.json"
JOURNAL = "/var/lib/statemesh-node/journal.jsonl"
HOOK = "/etc/apt/apt.conf.d/99operator-keeps-apt-running"


@pytest.fixture
def node(guest_factory: Callable[..., Guest], provisioned_node: SavedGuest) -> Guest:
    return guest_factory(saved=provisioned_node)


# The operator's SSH login is the guest's only logind session (its TTY column stays empty).
SESSIONS = "loginctl list-sessions --no-legend | grep -q ."


def ssh_sessions(guest: Guest) -> str:
    return guest.run("loginctl list-sessions --no-legend").stdout.strip()


# The operator's package that ships a Post-Invoke hook keeping apt from ever exiting.
# Packaged, as needrestart's hook is on Ubuntu: preflight refuses such a hook only when no
# package installed it (a planted one is a way in of its own), and the grace must end
# whatever a packaged one does.
HOOK_PACKAGE = "/root/hook-pkg"
HOOK_CONTROL = (b"Package: operator-keeps-apt-running\nVersion: 1\nArchitecture: all\n"
                b"Maintainer: operator <root@localhost>\nDescription: an endless apt hook\n")


def prepare_the_operators_way_in(guest: Guest, keep_apt_running: bool = True) -> None:
    """A key for root's SSH login, and a packaged Post-Invoke hook that keeps apt from ever
    exiting."""
    terminal.authorize_a_key(guest)
    if keep_apt_running:
        guest.run(f"mkdir -p {HOOK_PACKAGE}/DEBIAN {HOOK_PACKAGE}/etc/apt/apt.conf.d")
        guest.put(f"{HOOK_PACKAGE}{HOOK}", b'DPkg::Post-Invoke { "sleep 100000"; };\n')
        guest.put(f"{HOOK_PACKAGE}/DEBIAN/conffiles", f"{HOOK}\n".encode())
        guest.put(f"{HOOK_PACKAGE}/DEBIAN/control", HOOK_CONTROL)
        guest.run(f"dpkg-deb -b {HOOK_PACKAGE} /root/hook.deb && dpkg -i /root/hook.deb")


@pytest.mark.cost(210)
def test_a_renamed_shell_and_an_endless_apt_hook_end_with_the_grace(node: Guest, measured) -> None:
    guest = node
    prepare_the_operators_way_in(guest)
    terminal.run_over_ssh(guest, "apt-get install -y statemesh-node", shell="apt")  # renamed
    guest.wait_for(f"{SESSIONS} && pgrep -x apt-get", "the operator's apt-get", 120)
    guest.wait_for(f"grep -q '\"event\": \"state-installed\"' {JOURNAL}", "installed", 900)
    # The harden unit stamps the deadline just after it journals the outcome.
    guest.wait_for(f"grep -q '\"ends_at\": [0-9]' {GRACE_RECORD}", "the grace's deadline", 60)

    # The installer recorded is apt-get, by its executable; the renamed shell is not.
    record = json.loads(guest.run(f"cat {GRACE_RECORD}").stdout)
    assert guest.run(f"readlink /proc/{record['pid']}/exe").stdout.strip() == "/usr/bin/apt-get"
    assert record["command"].startswith("apt-get install"), record
    # While the session is spared, status and selftest say so, and name it.
    status = guest.run("statemesh-node status --json", check=False)
    installation = json.loads(status.stdout)["installation"]
    assert status.returncode == 1 and not installation["holds"], status.stdout
    assert f"of pid {record['pid']} 'apt-get install" in installation["detail"], installation
    selftest = guest.run("statemesh-node selftest --json", check=False, timeout=180)
    probe = next(p for p in json.loads(selftest.stdout)["probes"]
                 if p["name"] == "spared installing session")
    assert selftest.returncode == 1 and not probe["blocked"], probe
    assert ssh_sessions(guest), "the session ended before the bound"
    left = record["ends_at"] - float(guest.run("cut -d' ' -f1 /proc/uptime").stdout)
    measured("grace left after status and selftest", f"{left:.0f} s")

    # The bound: apt is still waiting on the hook, and the session ends all the same.
    assert guest.run("pgrep -x apt-get", check=False).returncode == 0, "apt returned by itself"
    waited_from = time.monotonic()
    guest.wait_for(f"! {SESSIONS}", "the session's end",
                   grace.AFTER_TRANSACTION + 120)
    measured("installing session ended after status", f"{time.monotonic() - waited_from:.0f} s")
    ended = guest.run("journalctl -o cat -u statemesh-watchdog.service | grep grace-ended").stdout
    assert ended, "the watchdog did not log the grace's end"
    # The watchdog kills the session's processes one by one: the shell may outlive apt (or
    # its hook) by enough to write apt's status, which is then a failure, never a success.
    assert guest.run(f"cat {terminal.STATUS} 2>/dev/null", check=False).stdout.strip() != "0"
    # The operator's ssh client (outside the session) exits once its sshd is gone.
    guest.wait_for("! pgrep -x apt-get && ! pgrep -x ssh", "apt and the ssh client's end", 60)
    final = guest.run("statemesh-node status --json", check=False)
    assert final.returncode == 0, final.stdout
    assert json.loads(final.stdout)["installation"]["facts"]["spared_session"] is None


@pytest.mark.cost(90)
def test_install_over_ssh_without_a_logind_session_returns_then_the_session_ends(
        node: Guest, measured) -> None:
    """A minimal image has no libpam-systemd: sshd then opens no logind session, and every
    connection's sshd, shell and apt stay in ssh.service's cgroup. Stopping ssh.service after
    its mask was loaded (which drops KillMode=process) killed that whole cgroup 20 s into
    the hardening: the connection closed, apt died with it, dpkg was left behind and the
    operator saw no outcome. Units are now stopped before their mask, and the grace spares
    what carries the installing terminal (sshd's session process holds the pty's master)."""
    guest = node
    guest.run("apt-get purge -y -q libpam-systemd", env={"DEBIAN_FRONTEND": "noninteractive"},
              timeout=300)
    prepare_the_operators_way_in(guest, keep_apt_running=False)
    started = time.monotonic()
    terminal.run_over_ssh(guest, "apt-get install -y statemesh-node")
    guest.wait_for("pgrep -x apt-get", "the operator's apt-get", 120)
    assert not ssh_sessions(guest)  # no logind session: the case this test is for
    guest.wait_for("! pgrep -x apt-get", "apt-get's end", 900)
    measured("apt-get install over ssh without logind", f"{time.monotonic() - started:.0f} s")
    # apt has returned: the grace is over, and the session with it (the connection closes).
    guest.wait_for("! pgrep -x ssh", "the session's end", 60)
    said = guest.run(f"cat {terminal.OUTPUT}").stdout
    assert "statemesh-node: installed; every guarantee holds" in said, said
    assert "\nE: " not in said, said
    # The shell may be ended before it writes apt's status; if it wrote one, it is success.
    assert guest.run(f"cat {terminal.STATUS} 2>/dev/null", check=False).stdout.strip() in ("", "0")
    assert guest.run("dpkg-query -W -f '${db:Status-Abbrev}' statemesh-node").stdout.strip() \
        == "ii"
    final = guest.run("statemesh-node status --json", check=False)
    assert final.returncode == 0, final.stdout
