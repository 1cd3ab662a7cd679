"""status and selftest on a real installed node: what an operator or a customer runs."""

from __future__ import annotations

import json

import pytest

from harness.vm.driver import Guest
from tests.vm.reports import guarantee_finding, shown

GUARANTEES = {"ssh", "agents", "logins", "rescue", "memory", "firewall", "security_class",
              "watchdog", "storage"}


@pytest.mark.cost(40)
def test_status_selftest_and_a_broken_guarantee(installed_guest: Guest) -> None:
    guest = installed_guest
    status = guest.run("statemesh-node status --json", check=False)
    report = json.loads(status.stdout)
    failing = [g for g in report["guarantees"] if not g["holds"]]
    assert status.returncode == 0 and not failing, status.stdout + status.stderr
    assert {g["name"] for g in report["guarantees"]} >= GUARANTEES
    assert report["package_units"]["holds"], report["package_units"]
    print(shown(report))

    selftest = guest.run("statemesh-node selftest --json", check=False, timeout=180)
    probes = json.loads(selftest.stdout)["probes"]
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
    assert {p["name"] for p in probes} >= {"spared installing session", "pty",
                                           "start ssh.service", "start qemu-guest-agent.service",
                                           "storage keyslots", "volume key on disk"}
    assert all(p["blocked"] for p in probes)
    print(guest.run("statemesh-node selftest").stdout)

    # A jump from INPUT into one of ufw's own chains that accepts is not one of ufw's hooks.
    jump = "INPUT -p tcp --dport 8080 -j ufw-user-limit-accept"
    guest.run(f"iptables -I {jump}")
    firewall = guarantee_finding(guest, "firewall")
    assert not firewall["holds"], firewall
    assert "--dport 8080 -j ufw-user-limit-accept" in firewall["detail"], firewall
    guest.run(f"iptables -D {jump}")

    # An operator switching the firewall off must show up: status is a monitoring check.
    guest.run("ufw disable")
    broken = guest.run("statemesh-node status --json", check=False)
    assert broken.returncode == 1
    firewall = next(g for g in json.loads(broken.stdout)["guarantees"] if g["name"] == "firewall")
    assert not firewall["holds"]


@pytest.mark.cost(20)
def test_status_names_a_mount_over_the_volume_a_stopped_watchdog_and_a_killed_listener(
        installed_guest: Guest) -> None:
    """What a prepared operator does to a node before lying to its customers with it: each
    must make status fail, named. The tamper listener is killed (systemd restarts it not,
    Restart=no: an interrupted transaction must never rerun half-way); the watchdog is
    stopped rather than killed (systemd would restart a dead one at once); a tmpfs goes over
    the volume with the volume's options and the mapper's name as its source; a program
    left running hides behind a mount over its /proc directory; root's service manager is
    started by hand, with no session."""
    guest = installed_guest
    assert guest.run("statemesh-node status", check=False).returncode == 0
    guest.run("kill -KILL $(systemctl show -P MainPID statemesh-harden.service)")
    watchdog = int(guest.run("systemctl show -P MainPID statemesh-watchdog.service").stdout)
    guest.run(f"kill -STOP {watchdog}")
    guest.run("mount -t tmpfs -o nodev,nosuid /dev/mapper/statemesh /var/lib/statemesh")
    assert guest.run("systemctl is-active statemesh-watchdog.service").stdout.strip() == "active"
    # A program left running by hand, hidden: its /proc directory shows a kernel thread's.
    guest.run("systemd-run --unit=hidden-by-hand sleep 1645")
    hidden = guest.run("systemctl show -P MainPID hidden-by-hand.service").stdout.strip()
    guest.run(f"mount --bind /proc/2 /proc/{hidden}")
    assert "sleep" not in guest.run(f"cat /proc/{hidden}/cmdline").stdout
    # A packaged unit started by hand: root's service manager with no session (it runs
    # root's user units, no terminal needed). Not transient; nothing the boot starts wants it.
    guest.run("systemctl start user@0.service")
    manager = guest.run("systemctl show -P MainPID user@0.service").stdout.strip()

    status = guest.run("statemesh-node status --json", check=False)
    assert status.returncode == 1, status.stdout + status.stderr
    report = json.loads(status.stdout)
    print(shown(report))
    found = {g["name"]: g for g in report["guarantees"]}
    listener = report["tamper_listener"]
    assert not listener["holds"] and "statemesh-harden.service is not running" in listener["detail"]
    installation = report["installation"]
    assert not installation["holds"]
    assert f"hidden by a mount over /proc/{hidden}, from every reader of /proc" in \
        installation["detail"], installation
    assert ("user@0.service (started on request: nothing the boot starts pulls it in or "
            f"triggers it): pid {manager} (/lib/systemd/systemd --user)") in \
        installation["detail"].replace("/usr/lib/systemd", "/lib/systemd"), installation
    assert not found["watchdog"]["holds"]
    assert f"stopped (pid {watchdog}: SIGSTOP or a tracer)" in found["watchdog"]["detail"]
    assert not found["storage"]["holds"]
    assert "tmpfs /dev/mapper/statemesh" in found["storage"]["detail"]
    assert "is mounted at /var/lib/statemesh" in found["storage"]["detail"]
    assert [name for name, g in found.items() if not g["holds"]] == ["watchdog", "storage"]


WATCHDOG_DROPIN = "/etc/systemd/system/statemesh-watchdog.service.d/50-planted.conf"


def package_units(guest: Guest) -> dict:
    status = guest.run("statemesh-node status --json", check=False)
    assert status.returncode == 1, status.stdout + status.stderr
    report = json.loads(status.stdout)
    print(shown(report))
    return report["package_units"]


@pytest.mark.cost(30)
def test_status_names_a_planted_dropin_and_the_process_it_left_running(
        installed_guest: Guest) -> None:
    """A drop-in that makes the watchdog `sleep infinity`, then that process left running
    after the drop-in is gone again: systemd says "active" throughout, status must not."""
    guest = installed_guest
    guest.run(f"mkdir -p {WATCHDOG_DROPIN.rsplit('/', 1)[0]}")
    guest.put(WATCHDOG_DROPIN,
              b"[Service]\nType=simple\nExecStart=\nExecStart=/bin/sleep infinity\n")
    guest.run("systemctl daemon-reload")
    units = package_units(guest)
    assert f"statemesh-watchdog.service has drop-ins: {WATCHDOG_DROPIN}" in units["detail"]

    guest.run("kill -KILL $(systemctl show -P MainPID statemesh-watchdog.service)")
    guest.wait_for("test \"$(ps -o comm= -p $(systemctl show -P MainPID "
             "statemesh-watchdog.service))\" = sleep", "systemd to restart it as planted", 60)
    sleeper = guest.run("systemctl show -P MainPID statemesh-watchdog.service").stdout.strip()
    guest.run(f"rm {WATCHDOG_DROPIN} && systemctl daemon-reload")
    assert guest.run("systemctl is-active statemesh-watchdog.service").stdout.strip() == "active"
    units = package_units(guest)
    assert units["detail"] == (f"statemesh-watchdog.service main process {sleeper} runs "
                               "'/bin/sleep infinity', not '/usr/bin/statemesh-node watchdog "
                               "--terminal-filter /sys/fs/cgroup "
                               "--terminal-filter-pins /run/statemesh-node/bpf'")
