"""Live upgrades through unattended-upgrades on a node with workload data on it.

Version N (the freshly built package) is installed (the saved installed node, restored
with a repository that also holds N+1); N+1 is built from the same tree. The
operator's unattended-upgrades, configured for the StateMesh origin, brings N+1: the data
stays, the storage unit is not restarted, the lockdown holds, nothing prompts. A broken N+1
whose preinst fails must leave N installed and working (dpkg's abort-upgrade path).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Dict, List

import pytest

from harness.vm import image
from harness.vm.driver import KEEP_CONFFILES_CONF, Guest
from harness.vm.variants import build_variant

UNATTENDED_CONFIG = b"""// The node's operator lets unattended-upgrades take StateMesh's own repository.
Unattended-Upgrade::Origins-Pattern { "origin=StateMesh,label=StateMesh"; };
Unattended-Upgrade::Automatic-Reboot "false";
"""
NONINTERACTIVE = {"DEBIAN_FRONTEND": "noninteractive"}
# What earlier builds left on a node: deb-systemd-helper's links starting
# statemesh-state.service (before the state socket), the vTPM and the state socket (before
# the endpoint pulled them in), the storage, harden and firewall units (before
# statemesh-node.target wanted them) at every boot, and its record of each.
HELPER_STATE = "/var/lib/systemd/deb-systemd-helper-enabled"
JOURNAL = "/var/lib/statemesh-node/journal.jsonl"
POLICY_LOG = "/root/input-policy"
LEGACY_LINKS = {
    "statemesh-state.service": "/etc/systemd/system/multi-user.target.wants",
    "statemesh-vtpm.service": "/etc/systemd/system/multi-user.target.wants",
    "statemesh-state.socket": "/etc/systemd/system/sockets.target.wants",
    "statemesh-storage.service": "/etc/systemd/system/sysinit.target.wants",
    "statemesh-harden.service": "/etc/systemd/system/multi-user.target.wants",
    "statemesh-firewall.service": "/etc/systemd/system/multi-user.target.wants",
}


def _legacy_state(unit: str, wants: str) -> str:
    link, target = f"{wants}/{unit}", wants.rsplit("/", 1)[1]
    return (f"mkdir -p {wants} {HELPER_STATE}/{target} && "
            f"ln -sf /lib/systemd/system/{unit} {link} && "
            f"echo {link} > {HELPER_STATE}/{unit}.dsh-also && touch {HELPER_STATE}/{target}/{unit}")


def _version(deb: Path) -> str:
    return re.match(r"statemesh-node_(.+)_all\.deb", deb.name).group(1)


@pytest.fixture(scope="module")
def next_version_repo(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("upgrade")
    newer = build_variant(work, f"{_version(deb)}+upgrade1")
    return image.build_repo_disk([deb, newer], work / "repo.img")


@pytest.fixture(scope="module")
def broken_version_repo(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("broken")
    broken = build_variant(work, f"{_version(deb)}+broken1", broken_preinst=True)
    return image.build_repo_disk([deb, broken], work / "repo.img")


def _installed_version_n(guest: Guest, version: str) -> None:
    """Version N installed and holding, the repository's index read, workload data written.
    The saved node's provisioning told apt to keep conffiles without asking: taken away, so
    that the upgrade meets dpkg's conffile handling as an operator's node would."""
    guest.run(f"rm {KEEP_CONFFILES_CONF}")
    guest.run("apt-get update -q", env=NONINTERACTIVE)
    assert _installed_version(guest) == f"{version} ii"
    guest.run("statemesh-node status")
    guest.run("dd if=/dev/urandom of=/var/lib/statemesh/workload.bin bs=1M count=8 status=none")


def _storage_invocation(guest: Guest) -> str:
    return guest.run("systemctl show -P InvocationID statemesh-storage.service").stdout.strip()


def _checksum(guest: Guest) -> str:
    return guest.run("sha256sum /var/lib/statemesh/workload.bin").stdout.split()[0]


@dataclasses.dataclass(frozen=True)
class WatchdogGap:
    """How the watchdog went through the upgrade, by systemd's and journald's clocks."""

    unit_inactive: float  # the unit's most recent stop/start; 0 if it never stopped
    handovers: int  # SIGHUP hand-overs to a successor ("handed-over" lines)
    unwatched: float  # longest time between the old process's end and its successor's ready
    overlap: float  # shortest time both were watching


def _watchdog_gap(guest: Guest) -> WatchdogGap:
    """The old process stops watching at its "handed-over" line (it exits right after), or at
    its "handover" line if it wrote no "handed-over" (an in-place re-exec would start there);
    its successor watches from its first "ready" line after that."""
    shown = guest.run("systemctl show -P InactiveEnterTimestampMonotonic statemesh-watchdog; "
                      "systemctl show -P ActiveEnterTimestampMonotonic statemesh-watchdog").stdout
    inactive, active = (int(value or 0) for value in shown.split())
    unit_inactive = max(0, active - inactive) / 1e6 if inactive else 0.0
    journal = guest.run("journalctl -b -u statemesh-watchdog -o json --output-fields=MESSAGE").stdout
    rounds: List[Dict[str, float]] = []
    for entry in map(json.loads, journal.splitlines()):
        message, at = str(entry.get("MESSAGE", "")), int(entry["__MONOTONIC_TIMESTAMP"]) / 1e6
        line = json.loads(message) if message.startswith('{"event"') else {}
        event = line.get("event")
        if event == "handover" and line.get("state") == "starting the successor":
            rounds.append({"start": at})
        elif event == "ready" and rounds and "ready" not in rounds[-1]:
            rounds[-1]["ready"] = at
        elif event == "handed-over" and rounds:
            rounds[-1]["handed"] = at
    gaps = [one["ready"] - one.get("handed", one["start"]) for one in rounds if "ready" in one]
    return WatchdogGap(unit_inactive=unit_inactive,
                       handovers=sum("handed" in one for one in rounds),
                       unwatched=max([0.0, *gaps]),
                       overlap=max(0.0, -max(gaps)) if gaps else 0.0)


def _installed_version(guest: Guest) -> str:
    """Version and status, e.g. `0.1.0 ii` (dpkg's error-flag column, a space when clear,
    is stripped)."""
    return guest.run("dpkg-query -W -f '${Version} ${db:Status-Abbrev}' statemesh-node").stdout.rstrip()


@pytest.mark.cost(170)
def test_unattended_upgrade_keeps_data_storage_and_lockdown(
    guest_factory, installed_node, deb: Path, next_version_repo: Path, measured
) -> None:
    guest = guest_factory(saved=installed_node, repo=next_version_repo)
    # Booted since the installation, as a node is by the time an upgrade comes: its ufw
    # chains were loaded from files the check reads, and no one has had root since.
    guest.reboot()
    guest.run("systemctl is-system-running --wait", check=False, timeout=600)
    version = _version(deb)
    _installed_version_n(guest, version)
    checksum, invocation = _checksum(guest), _storage_invocation(guest)
    guest.run(" && ".join(_legacy_state(unit, wants) for unit, wants in LEGACY_LINKS.items()))
    guest.put("/etc/apt/apt.conf.d/51statemesh-unattended", UNATTENDED_CONFIG)

    # The mesh node's INPUT policy, read every half second while the upgrade runs: ufw-init
    # force-reload (what applying the firewall to a running ufw takes) set it to ACCEPT
    # for 19 s of every upgrade, measured in such a guest.
    guest.run(f"setsid -f sh -c 'while :; do iptables -S INPUT | head -1; sleep 0.5; done "
              f">{POLICY_LOG}' </dev/null >/dev/null 2>&1")
    upgrade = guest.run("unattended-upgrade -v", env=NONINTERACTIVE, timeout=900, check=False)
    guest.run(f"pkill -f '[{POLICY_LOG[0]}]{POLICY_LOG[1:]}'")  # not this command's own shell
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    policies = guest.run(f"cat {POLICY_LOG}").stdout.splitlines()
    assert len(policies) > 10 and set(policies) == {"-P INPUT DROP"}, sorted(set(policies))
    kept = guest.run(f"grep -cF '\"event\": \"kept\", \"guarantee\": \"firewall\"' {JOURNAL}").stdout
    assert kept.strip() == "1"  # it held: the upgrade applied everything else
    assert _installed_version(guest).startswith(f"{version}+upgrade1 ii")
    assert "conffile" not in (upgrade.stdout + upgrade.stderr).lower()

    assert _checksum(guest) == checksum, "workload data changed across the upgrade"
    assert _storage_invocation(guest) == invocation, "the storage unit was restarted"
    for unit, wants in LEGACY_LINKS.items():
        assert guest.run(f"test ! -L {wants}/{unit} && test ! -e {HELPER_STATE}/{unit}.dsh-also",
                         check=False).returncode == 0, f"an old build's boot link is left: {unit}"
    assert guest.run("systemctl is-enabled statemesh-node.target").stdout.strip() == "enabled"
    status = guest.run("statemesh-node status --json", check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    assert guest.run("systemctl is-active ssh.service", check=False).stdout.strip() != "active"
    assert guest.run("systemctl is-active statemesh-watchdog").stdout.strip() == "active"
    gap = _watchdog_gap(guest)
    measured("watchdog during the upgrade",
             f"unit inactive {gap.unit_inactive:.3f} s, {gap.handovers} hand-over(s), "
             f"unwatched {gap.unwatched:.3f} s, both watching {gap.overlap:.3f} s")
    assert gap.handovers >= 1, "the upgrade did not hand the watchdog over to the new code"
    assert gap.unit_inactive < 1.0 and gap.unwatched < 1.0, gap


@pytest.mark.cost(50)
def test_failing_upgrade_leaves_version_n_working(
    guest_factory, installed_node, deb: Path, broken_version_repo: Path
) -> None:
    guest = guest_factory(saved=installed_node, repo=broken_version_repo)
    version = _version(deb)
    _installed_version_n(guest, version)
    checksum = _checksum(guest)

    upgrade = guest.run("apt-get install -y statemesh-node", env=NONINTERACTIVE,
                        timeout=600, check=False)
    assert upgrade.returncode != 0
    assert "this preinst fails on purpose" in upgrade.stdout + upgrade.stderr

    assert _installed_version(guest) == f"{version} ii"
    assert _checksum(guest) == checksum
    status = guest.run("statemesh-node status", check=False)
    assert status.returncode == 0, status.stdout + status.stderr
