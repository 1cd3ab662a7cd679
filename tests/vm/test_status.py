"""status and selftest on a real installed node: what an operator or a customer runs."""

from __future__ import annotations

import json

import pytest

from tests.vm.driver import Guest

GUARANTEES = {"ssh", "logins", "rescue", "firewall", "security_class", "watchdog", "storage"}


@pytest.mark.cost(60)
def test_status_selftest_and_a_broken_guarantee(installed_guest: Guest) -> None:
    guest = installed_guest
    status = guest.run("statemesh-node status --json", check=False)
    report = json.loads(status.stdout)
    failing = [g for g in report["guarantees"] if not g["holds"]]
    assert status.returncode == 0 and not failing, status.stdout + status.stderr
    assert {g["name"] for g in report["guarantees"]} >= GUARANTEES
    print(guest.run("statemesh-node status").stdout)

    selftest = guest.run("statemesh-node selftest --json", check=False, timeout=180)
    probes = json.loads(selftest.stdout)["probes"]
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
    assert {p["name"] for p in probes} >= {"pty", "start ssh.service", "storage keyslots",
                                           "volume key on disk"}
    assert all(p["blocked"] for p in probes)
    print(guest.run("statemesh-node selftest").stdout)

    # An operator switching the firewall off must show up: status is a monitoring check.
    guest.run("ufw disable")
    broken = guest.run("statemesh-node status --json", check=False)
    assert broken.returncode == 1
    firewall = next(g for g in json.loads(broken.stdout)["guarantees"] if g["name"] == "firewall")
    assert not firewall["holds"]
