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
    unit with the other agents' would kill apt half-way. It is masked at once, left running
    while the installer runs, and stopped at the first check after the grace."""
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
    assert units["cloud-final.service"].masked
    assert units["cloud-final.service"].active_state == "active"
    assert units["qemu-guest-agent.service"].active_state == "inactive"
    assert guarantee.check().holds

    grace.end_after(0, record)
    after = guarantee.check()
    assert not after.holds and "running: cloud-final.service" in after.detail, after.detail
    guarantee.apply(book)  # what the tamper listener does at its next check
    assert units["cloud-final.service"].active_state == "inactive"
    assert guarantee.check().holds
