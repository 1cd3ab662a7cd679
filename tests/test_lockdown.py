"""ssh, logins, rescue and the tamper listener against stand-in systemd on a private bus.

Files the lockdown writes (shadow, GRUB drop-in, generator mask) live in a temp root.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from statemesh import audit, cli, guarantees, install, journal, ownunits, proc, systemd
from statemesh.config import NodeConfig
from statemesh.guarantees import logins, rescue, ssh, tamper, unitmask, unitprocs
from statemesh.guarantees.base import HARDEN_UNIT, Finding
from statemesh.guarantees.unitmask import LockdownError
from tests.fakebus import FakeBus, debian12_units, fakebus  # noqa: F401 - fixture

SHADOW = "root:$6$salt$hash:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A machine's files: passwd/shadow for usermod --root, /etc/default/grub."""
    etc = tmp_path / "root/etc"
    (etc / "default").mkdir(parents=True)
    shutil.copy("/etc/passwd", etc / "passwd")
    shutil.copy("/etc/group", etc / "group")
    (etc / "shadow").write_text(SHADOW)
    (etc / "shadow").chmod(0o600)
    (etc / "gshadow").write_text("")
    (etc / "default/grub").write_text("GRUB_DEFAULT=0\n")
    return tmp_path / "root"


@pytest.fixture
def book(tmp_path: Path) -> journal.Journal:
    return journal.Journal(tmp_path / "state")


@pytest.fixture
def debian(fakebus: FakeBus) -> FakeBus:
    debian12_units(fakebus.systemd)
    return fakebus


class Machine:
    """The three lockdown guarantees of one (fake) machine."""

    def __init__(self, root: Path, tmp_path: Path):
        self.grub_runs: List[str] = []
        self.sshd: List[int] = []
        self.grace_path = tmp_path / "grace.json"
        self.ssh = ssh.Ssh(root=root, find_sshd=lambda: list(self.sshd),
                           grace_path=self.grace_path)
        self.audit = FakeAudit()
        self.logins = logins.Logins(root=root, grace_path=self.grace_path,
                                    kernel_audit=self.audit)
        self.rescue = rescue.Rescue(root=root,
                                    regenerate_grub=lambda: self.grub_runs.append("update-grub"))
        self.all = [self.ssh, self.logins, self.rescue]


class FakeAudit:
    """The kernel's loginuid_immutable switch: set and locked by the one call, never undone."""

    def __init__(self, error: str = "") -> None:
        self.state = audit.LoginuidImmutable(enabled=False, locked=False)
        self.error = error

    def loginuid_immutable(self) -> audit.LoginuidImmutable:
        if self.error:
            raise audit.AuditError(93, self.error)
        return self.state

    def make_loginuid_immutable(self) -> None:
        self.loginuid_immutable()
        self.state = audit.LoginuidImmutable(enabled=True, locked=True)


@pytest.fixture
def machine(root: Path, tmp_path: Path) -> Machine:
    return Machine(root, tmp_path)


def unit_states(fake: FakeBus) -> Dict[str, Any]:
    return {name: (u.unit_file_state(), u.active_state) for name, u in fake.systemd.units.items()}


def test_lockdown_masks_stops_locks_and_holds(debian: FakeBus, machine: Machine, root: Path,
                                              book: journal.Journal) -> None:
    assert [g.check().holds for g in machine.all] == [False, False, False]
    for guarantee in machine.all:
        guarantee.apply(book)
    findings = [g.check() for g in machine.all]
    assert all(f.holds for f in findings), [f.detail for f in findings]
    units = debian.systemd.units
    for name in ssh.UNITS.names + logins.UNITS.names + rescue.UNITS.names:
        assert units[name].masked, name
    assert units["ssh.service"].active_state == "inactive" and not units["ssh.service"].enabled
    assert units["getty@tty1.service"].active_state == "inactive"
    assert units["serial-getty@ttyS0.service"].active_state == "inactive"
    assert logins.password_field(root / "etc/shadow") == "!$6$salt$hash"
    assert (root / rescue.GRUB_DROPIN).read_text() == rescue.GRUB_SETTINGS
    assert machine.grub_runs == ["update-grub"]
    assert os.readlink(root / ssh.GENERATOR) == "/dev/null"
    record = book.restore_record()
    assert record["ssh"]["unit_files"]["ssh.service"] == "enabled"
    assert record["ssh"]["active"] == ["ssh.service"]
    assert record["logins"]["root_locked"] is False
    assert sorted(record["logins"]["active"]) == ["getty@tty1.service",
                                                  "serial-getty@ttyS0.service"]


def test_running_units_are_stopped_before_their_mask_is_loaded(
        debian: FakeBus, machine: Machine, book: journal.Journal) -> None:
    """A unit reloaded from its mask has lost KillMode=process: stopping ssh.service then
    kills every process in its cgroup, which without libpam-systemd holds every SSH
    connection's shell and the installing apt itself (seen in the VM: apt died on SIGTERM)."""
    machine.all[0].apply(book)  # ssh
    calls = [(member, args[0]) for member, args in debian.systemd.calls
             if member in ("StopUnit", "MaskUnitFiles")]
    first_mask = next(i for i, (member, _args) in enumerate(calls) if member == "MaskUnitFiles")
    assert ("StopUnit", "ssh.service") in calls[:first_mask], calls


class StartsAGetty:
    """A step of the transaction during which logind spawns a getty (its unit is masked on
    disk, not yet loaded: systemd starts it)."""

    name = "spawn"
    holds_workload_data = False

    def __init__(self, fail: bool = False):
        self.fail = fail

    def apply(self, book: journal.Journal) -> None:
        async def start() -> None:
            async with systemd.manager() as manager:
                await manager.start_unit("getty@tty1.service")
        asyncio.run(start())
        if self.fail:
            raise RuntimeError("the step after the masks failed")

    def check(self) -> Finding:
        return Finding(self.name, True, "")

    def revert(self, record: Dict[str, Any]) -> None:
        del record


def events_named(book: journal.Journal, name: str) -> List[Dict[str, Any]]:
    return [event for event in book.events() if event["event"] == name]


def no_preflight_problem() -> Any:
    from statemesh.preflight import Report
    return Report([], {})


def test_the_transaction_loads_every_mask_in_one_reload_and_stops_what_started_before_it(
        debian: FakeBus, machine: Machine, book: journal.Journal) -> None:
    """Each reload costs seconds on a small machine: the installation masks every set, then
    reloads once; a getty logind started before that reload is stopped after it."""
    units = debian.systemd.units
    install.transaction(book, [*machine.all, StartsAGetty()], no_preflight_problem)
    members = [member for member, _args in debian.systemd.calls]
    assert members.count("Reload") == 1
    assert members.index("Reload") > max(i for i, m in enumerate(members) if m == "MaskUnitFiles")
    for name in ssh.UNITS.names + logins.UNITS.names + rescue.UNITS.names:
        assert units[name].mask_loaded, name
    assert units["getty@tty1.service"].active_state == "inactive"
    assert events_named(book, "masks-loaded")[0]["stopped"] == ["getty@tty1.service"]
    assert book.state().state == journal.INSTALLED


def test_a_getty_logind_spawns_right_after_its_mask_is_stopped_not_a_failed_install(
        debian: FakeBus, machine: Machine, book: journal.Journal) -> None:
    """Until the one reload a masked getty can still start; the sweep after it stops it,
    and no guarantee's own read-back fails the transaction over it before then."""
    units = debian.systemd.units

    def spawn(args: Any) -> None:
        if "getty@.service" in args[0]:
            units["getty@tty1.service"].active_state = "active"

    debian.systemd.after["MaskUnitFiles"] = spawn
    install.transaction(book, machine.all, no_preflight_problem)
    assert units["getty@tty1.service"].active_state == "inactive"
    assert "getty@tty1.service" in events_named(book, "masks-loaded")[0]["stopped"]
    assert book.state().state == journal.INSTALLED


def test_a_transaction_that_fails_after_the_masks_still_loads_them_and_names_its_error(
        debian: FakeBus, machine: Machine, book: journal.Journal) -> None:
    with pytest.raises(install.InstallError, match="spawn failed: the step after the masks"):
        install.transaction(book, [*machine.all, StartsAGetty(fail=True)],
                            no_preflight_problem)
    assert debian.systemd.units["ssh.service"].mask_loaded
    assert debian.systemd.units["getty@tty1.service"].active_state == "inactive"
    assert book.state().state == journal.FAILED


def test_giving_a_set_back_reloads_once_before_starting_what_ran(
        debian: FakeBus, machine: Machine, book: journal.Journal) -> None:
    machine.ssh.apply(book)
    debian.systemd.calls.clear()
    machine.ssh.revert(book.restore_record()["ssh"])
    members = [member for member, _args in debian.systemd.calls
               if member in ("UnmaskUnitFiles", "EnableUnitFiles", "Reload", "StartUnit")]
    assert members == ["UnmaskUnitFiles", "EnableUnitFiles", "Reload", "StartUnit"]
    assert debian.systemd.units["ssh.service"].active_state == "active"


def test_purge_gives_every_set_back_in_one_reload_then_starts_what_ran(
        debian: FakeBus, machine: Machine, book: journal.Journal) -> None:
    units = debian.systemd.units
    install.transaction(book, machine.all, no_preflight_problem)
    debian.systemd.calls.clear()
    assert install.revert_all(book, machine.all) == []
    members = [member for member, _args in debian.systemd.calls]
    assert members.count("Reload") == 1
    reload_at = members.index("Reload")
    assert max(i for i, m in enumerate(members) if m == "UnmaskUnitFiles") < reload_at
    assert min(i for i, m in enumerate(members) if m == "StartUnit") > reload_at
    assert units["ssh.service"].active_state == "active"
    assert units["getty@tty1.service"].active_state == "active"


def test_a_unit_that_does_not_start_again_is_its_guarantees_failure_and_keeps_the_record(
        debian: FakeBus, machine: Machine, book: journal.Journal) -> None:
    install.transaction(book, machine.all, no_preflight_problem)
    debian.systemd.failing["ssh.service"] = "failed"
    errors = install.revert_all(book, machine.all)
    assert len(errors) == 1 and errors[0].startswith("ssh: not everything could be given back")
    assert "ssh.service" in errors[0]
    assert events_named(book, "revert-failed")[0]["guarantee"] == "ssh"
    assert "ssh" not in [event["guarantee"] for event in events_named(book, "reverted")]
    assert "ssh" in book.restore_record()  # tried again at the next boot
    assert debian.systemd.units["getty@tty1.service"].active_state == "active"


def test_apply_is_idempotent_and_keeps_the_first_record(debian: FakeBus, machine: Machine,
                                                        book: journal.Journal) -> None:
    for _ in range(2):
        for guarantee in machine.all:
            guarantee.apply(book)
    record = book.restore_record()
    assert record["ssh"]["unit_files"]["ssh.service"] == "enabled"
    assert record["logins"]["root_locked"] is False
    assert all(g.check().holds for g in machine.all)


def test_revert_gives_back_exactly_what_was_there(debian: FakeBus, machine: Machine, root: Path,
                                                  book: journal.Journal) -> None:
    debian.systemd.units["debug-shell.service"].masked = True  # masked by the operator before
    before = unit_states(debian)
    shadow_before = (root / "etc/shadow").read_text()
    for guarantee in machine.all:
        guarantee.apply(book)
    record = book.restore_record()
    for guarantee in reversed(machine.all):
        guarantee.revert(record[guarantee.name])
    after = unit_states(debian)
    assert {n: after[n] for n in before} == before
    assert not debian.systemd.units["kbrequest.target"].masked
    assert debian.systemd.units["debug-shell.service"].masked
    assert (root / "etc/shadow").read_text() == shadow_before
    assert not (root / rescue.GRUB_DROPIN).exists()
    assert not (root / "etc/default/grub.d").exists()
    assert not (root / ssh.GENERATOR).exists() and not (root / ssh.GENERATOR).parent.exists()
    assert machine.grub_runs == ["update-grub", "update-grub"]


def test_loginuids_are_made_immutable_and_stay_so_after_purge(
        debian: FakeBus, machine: Machine, book: journal.Journal) -> None:
    finding = machine.logins.check()
    assert not finding.holds and "loginuids can be changed (audit loginuid_immutable not set)" \
        in finding.detail
    machine.logins.apply(book)
    finding = machine.logins.check()
    assert finding.holds and finding.facts["loginuid_immutable"], finding.detail
    assert any(event["event"] == "loginuid-immutable" for event in _events(book))
    machine.logins.revert(book.restore_record()["logins"])  # the kernel keeps it locked
    assert machine.audit.state.holds


def test_at_boot_only_the_loginuid_is_set_again_and_systemd_is_not_reloaded(
        debian: FakeBus, machine: Machine, book: journal.Journal) -> None:
    """A boot resets the kernel's loginuid switch and nothing else of this guarantee: the
    harden unit's re-assert sets it again without masking the gettys anew (a reload, seconds
    of an installed node's boot)."""
    machine.logins.apply(book)
    machine.audit.state = audit.LoginuidImmutable(enabled=False, locked=False)  # a new boot
    debian.systemd.calls.clear()
    assert "loginuids can be changed" in machine.logins.check().detail
    machine.logins.apply(book)
    assert machine.logins.check().holds
    members = [member for member, _args in debian.systemd.calls]
    assert "Reload" not in members and "MaskUnitFiles" not in members, members
    assert len(events_named(book, "loginuid-immutable")) == 2
    assert len(events_named(book, "logins-locked")) == 1


def test_no_kernel_audit_interface_fails_the_check_and_the_apply(
        debian: FakeBus, machine: Machine, book: journal.Journal) -> None:
    machine.audit.error = "Protocol not supported"
    assert "cannot ask the kernel whether loginuids are immutable" in machine.logins.check().detail
    with pytest.raises(LockdownError, match="making loginuids immutable"):
        machine.logins.apply(book)


def _events(book: journal.Journal) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in book.journal_path.read_text().splitlines()]


def test_a_root_locked_before_stays_locked(debian: FakeBus, machine: Machine, root: Path,
                                           book: journal.Journal) -> None:
    (root / "etc/shadow").write_text(SHADOW.replace("$6$", "!$6$", 1))
    machine.logins.apply(book)
    machine.logins.revert(book.restore_record()["logins"])
    assert logins.password_field(root / "etc/shadow").startswith("!")


def test_a_grub_setting_read_after_the_drop_in_undoes_the_lock(
        debian: FakeBus, machine: Machine, root: Path, book: journal.Journal) -> None:
    """Prepared: a drop-in update-grub reads after the package's turns recovery entries on
    again (and its command line gets init=, which preflight names: test_bootargs)."""
    machine.rescue.apply(book)
    assert machine.rescue.check().holds
    (root / "etc/default/grub.d/zz.cfg").write_text("GRUB_DISABLE_RECOVERY=false\n")
    finding = machine.rescue.check()
    assert not finding.holds and "a settings file read after it" in finding.detail
    # Preflight names it, before and after the drop-in exists; one read before it is fine.
    (root / "etc/default/grub.d/10-console.cfg").write_text("GRUB_TIMEOUT=1\n")
    assert rescue.settings_read_after_the_dropin(root) == [
        f"GRUB settings read after {root / rescue.GRUB_DROPIN} set what it sets "
        "(GRUB_DISABLE_OS_PROBER, GRUB_DISABLE_RECOVERY, GRUB_RECORDFAIL_TIMEOUT, "
        f"GRUB_TIMEOUT, GRUB_TIMEOUT_STYLE): {root}/etc/default/grub.d/zz.cfg (remove those "
        "lines, or rename the files to sort before it)"]
    (root / rescue.GRUB_DROPIN).unlink()
    assert len(rescue.settings_read_after_the_dropin(root)) == 1
    (root / "etc/default/grub.d/zz.cfg").unlink()
    assert rescue.settings_read_after_the_dropin(root) == []


def test_the_installation_runs_update_grub_even_over_a_planted_drop_in(
        debian: FakeBus, machine: Machine, root: Path, book: journal.Journal) -> None:
    """Prepared: the package's drop-in written before installing, word for word, and
    grub.cfg's entries given init=/bin/sh by hand: with nothing left to write, update-grub
    did not run, and the hand edit would have stayed. The installation runs it anyway."""
    (root / rescue.GRUB_DROPIN).parent.mkdir(parents=True, exist_ok=True)
    (root / rescue.GRUB_DROPIN).write_text(rescue.GRUB_SETTINGS)
    machine.rescue.apply(book)
    assert machine.grub_runs == ["update-grub"] and machine.rescue.check().holds


def test_failed_stop_job_fails_the_apply(debian: FakeBus, machine: Machine,
                                         book: journal.Journal) -> None:
    debian.systemd.failing["ssh.service"] = "timeout"
    with pytest.raises(systemd.JobFailedError, match="ssh.service: job timeout"):
        machine.ssh.apply(book)
    assert not machine.ssh.check().holds


def test_a_stop_that_never_ends_is_cut_short_with_sigkill(
        debian: FakeBus, machine: Machine, book: journal.Journal,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Prepared before installing: ssh.service with TimeoutStopSec=infinity and sshd held by
    a tracer. Its stop job would wait forever, and the transaction (or the tamper listener)
    with it; after the bound, every process of the unit gets SIGKILL and the job ends."""
    monkeypatch.setattr(unitmask, "STOP_SECONDS", 0.2)
    debian.systemd.endless_stops["ssh.service"] = None
    machine.ssh.apply(book)
    assert machine.ssh.check().holds
    assert ("KillUnit", ("ssh.service", "all", 9)) in debian.systemd.calls
    assert debian.systemd.units["ssh.service"].active_state == "inactive"
    assert [args for member, args in debian.systemd.calls
            if member == "StopUnit" and args[0] == "ssh.service"][:2] == [
                ("ssh.service", "replace")] * 2  # the same job, waited for again
    assert "ssh.service did not stop within 0 s: killing every process of it" in caplog.text


def test_access_denied_is_reported_not_hidden(debian: FakeBus, machine: Machine,
                                              book: journal.Journal) -> None:
    debian.systemd.denied.add("MaskUnitFiles")
    with pytest.raises(systemd.AccessDeniedError):
        machine.rescue.apply(book)
    assert debian.systemd.units["ssh.service"].enabled
    # Unit-file states come from one listing, and by name for what it does not list.
    for denied in ("ListUnitFilesByPatterns", "GetUnitFileState"):
        debian.systemd.denied.add(denied)
        finding = machine.rescue.check()
        assert not finding.holds and "Access denied" in finding.detail
        debian.systemd.denied.discard(denied)


def test_stray_sshd_processes_are_terminated(debian: FakeBus, machine: Machine,
                                             book: journal.Journal) -> None:
    victim = os.fork()
    if victim == 0:
        time.sleep(60)
        os._exit(0)
    machine.sshd.append(victim)
    machine.ssh.find_sshd = lambda: [p for p in machine.sshd if _alive(p)]
    machine.ssh.apply(book)
    assert not _alive(victim)
    events = [json.loads(line) for line in book.journal_path.read_text().splitlines()]
    assert any(e["event"] == "sshd-terminated" and e["pids"] == [victim] for e in events)


def _alive(pid: int) -> bool:
    try:
        waited, _status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return waited == 0


def test_the_installing_getty_is_spared_while_the_package_manager_runs(
        debian: FakeBus, machine: Machine, book: journal.Journal) -> None:
    ticks = proc.start_ticks(os.getpid())
    machine.grace_path.write_text(json.dumps({"pid": os.getpid(), "start_ticks": ticks,
                                              "session": "1", "sid": os.getsid(0),
                                              "tty": "/dev/tty1"}))
    machine.logins.apply(book)
    assert debian.systemd.units["getty@tty1.service"].active_state == "active"
    assert debian.systemd.units["serial-getty@ttyS0.service"].active_state == "inactive"
    assert machine.logins.check().holds
    machine.grace_path.unlink()
    assert not machine.logins.check().holds


def test_a_shadow_without_root_is_a_clear_error(debian: FakeBus, machine: Machine, root: Path,
                                                book: journal.Journal) -> None:
    (root / "etc/shadow").write_text("nobody:*:1:0:99999:7:::\n")
    with pytest.raises(LockdownError, match="has no entry for root"):
        machine.logins.apply(book)


def test_tamper_listener_reasserts_after_unmask(debian: FakeBus, machine: Machine,
                                               book: journal.Journal) -> None:
    for guarantee in machine.all:
        guarantee.apply(book)

    def journaled() -> List[str]:
        return [json.loads(line)["event"] for line in book.journal_path.read_text().splitlines()]

    async def scenario() -> List[str]:
        ready = asyncio.Event()
        listener = asyncio.ensure_future(
            tamper.listen(machine.all, book, ready=ready.set, period=3600))
        await asyncio.wait_for(ready.wait(), 30)
        async with systemd.manager() as manager:
            await manager.unmask_unit_files(["ssh.service"])
        # The listener journals the re-assert once its read-back has confirmed it: the mask
        # alone can be seen first, and cancelling then would cut the listener short.
        while "tamper-reasserted" not in journaled():
            if listener.done():
                listener.result()  # the listener's own error, not a timeout
            await asyncio.sleep(0.05)
        listener.cancel()
        return journaled()

    events = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert "tamper-detected" in events and events[-1] == "tamper-reasserted"
    assert machine.ssh.check().holds


def test_a_guarantee_the_listener_cannot_enforce_does_not_shield_the_others(
        debian: FakeBus, machine: Machine, book: journal.Journal) -> None:
    """Prepared: ssh.service's stop job fails. Unmasked and started again, ssh cannot be
    enforced; the getty started beside it is still stopped and masked again."""
    for guarantee in machine.all:
        guarantee.apply(book)
    units = debian.systemd.units
    for name in ("ssh.service", "getty@.service"):
        units[name].masked = units[name].mask_loaded = False
    units["ssh.service"].active_state = "active"
    debian.systemd.add("getty@tty2.service", active_state="active")
    debian.systemd.failing["ssh.service"] = "failed"

    async def enforce() -> List[str]:
        async with systemd.manager() as manager:
            return await tamper.enforce_tampered(manager, machine.all, book)
    assert debian.call(enforce()) == ["logins"]
    assert not machine.ssh.check().holds
    assert machine.logins.check().holds and units["getty@tty2.service"].active_state == "inactive"


def test_any_error_of_one_guarantee_leaves_the_listener_enforcing_the_others(
        debian: FakeBus, machine: Machine, book: journal.Journal,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """rescue's enforce writes a file; an OSError there (a read-only or full /etc) is not
    one of the lockdown's own errors, and must not end the round either."""
    for guarantee in machine.all:
        guarantee.apply(book)

    async def tampered(*_args: object) -> Finding:
        return Finding("rescue", False, "rescue.target unmasked")

    async def unwritable(*_args: object) -> None:
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(machine.rescue, "inspect", tampered)
    monkeypatch.setattr(machine.rescue, "enforce", unwritable)
    units = debian.systemd.units
    units["ssh.service"].masked = units["ssh.service"].mask_loaded = False

    async def enforce() -> List[str]:
        async with systemd.manager() as manager:
            return await tamper.enforce_tampered(manager, [machine.rescue, machine.ssh], book)
    assert debian.call(enforce()) == ["ssh"]
    assert machine.ssh.check().holds


def test_a_guarantee_that_keeps_failing_is_tried_again_once_a_period_not_in_a_loop(
        debian: FakeBus, machine: Machine, book: journal.Journal,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An enforce that reloads systemd and then fails (prepared so) emits the Reloading
    signal the listener wakes on: it must not wake itself, reload after reload."""
    attempts: List[int] = []

    async def tampered(*_args: object) -> Finding:
        return Finding("ssh", False, "ssh.service unmasked")

    async def reload_then_fail(manager: systemd.Systemd, _journal: object) -> None:
        attempts.append(1)
        await manager.reload()
        raise unitmask.LockdownError("ssh: still not locked after enforcing")
    monkeypatch.setattr(machine.ssh, "inspect", tampered)
    monkeypatch.setattr(machine.ssh, "enforce", reload_then_fail)

    async def scenario() -> None:
        listener = asyncio.ensure_future(tamper.listen([machine.ssh], book, period=3600))
        await asyncio.sleep(1.0)
        listener.cancel()
    debian.call(scenario())
    assert len(attempts) == 1, len(attempts)
    # And status says so: the listener runs, but did not re-assert ssh.
    assert tamper.cannot_enforce([os.getpid()]) == {
        "ssh": "LockdownError: ssh: still not locked after enforcing"}


def test_status_fails_while_the_listener_cannot_re_assert_a_guarantee(
        tmp_path: Path, listener_state_of_the_test: Path) -> None:
    """Its record counts only while the process that wrote it runs the harden unit."""
    ordered = [ssh.Ssh()]
    listener_state_of_the_test.write_text(json.dumps(
        {"pid": os.getpid(), "cannot_enforce": {"ssh": "JobFailedError: ssh.service: failed"}}))
    finding = tamper.listener_finding(ordered, True, _harden_cgroup(tmp_path, [os.getpid()]))
    assert not finding.holds and finding.detail.endswith(
        "but its last try to re-assert failed: ssh: JobFailedError: ssh.service: failed")
    gone = tamper.listener_finding(ordered, True, _harden_cgroup(tmp_path / "x", [1]))
    assert gone.holds, gone.detail  # a record of another process's: not the listener's
    listener_state_of_the_test.write_text(json.dumps({"pid": os.getpid(), "cannot_enforce": {}}))
    assert tamper.listener_finding(ordered, True, _harden_cgroup(tmp_path / "y",
                                                                 [os.getpid()])).holds


def _harden_cgroup(tmp_path: Path, pids: List[int]) -> Path:
    """A stand-in cgroup tree holding statemesh-harden.service's processes."""
    unit = tmp_path / "cgroup" / "system.slice" / HARDEN_UNIT
    unit.mkdir(parents=True)
    (unit / "cgroup.procs").write_text("".join(f"{pid}\n" for pid in pids))
    return tmp_path / "cgroup"


def test_status_says_the_tamper_listener_runs_on_an_installed_node(tmp_path: Path) -> None:
    ordered = guarantees.ordered(NodeConfig())
    finding = tamper.listener_finding(ordered, True, _harden_cgroup(tmp_path, [os.getpid()]))
    assert finding.holds and finding.name == "tamper_listener"
    assert finding.detail == (f"{HARDEN_UNIT} running (pid {os.getpid()}), re-asserts ssh, "
                              "agents, logins, rescue, memory when they are undone")


def test_status_fails_when_the_tamper_listener_is_gone_or_stopped(
        tmp_path: Path, stopped_process: int) -> None:
    ordered = guarantees.ordered(NodeConfig())
    gone = tamper.listener_finding(ordered, True, tmp_path / "no-cgroup")
    assert not gone.holds and gone.detail == (
        f"{HARDEN_UNIT} is not running: nothing re-asserts ssh, agents, logins, rescue, memory when "
        "they are undone")
    stopped = tamper.listener_finding(ordered, True, _harden_cgroup(tmp_path, [stopped_process]))
    assert not stopped.holds and stopped.facts["stopped"] == [stopped_process]
    assert stopped.detail.startswith(f"{HARDEN_UNIT} is stopped (pid {stopped_process}: SIGSTOP or a tracer)")
    # A node that is not installed has no listener, whatever runs in the unit (the transaction).
    installing = tamper.listener_finding(ordered, False, _harden_cgroup(tmp_path / "i", [os.getpid()]))
    assert not installing.holds and installing.detail == "none: the node is not installed"


def test_status_fails_naming_the_tamper_listener_when_only_it_is_missing(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    installed = Finding("installation", True, "installed (version 0.1.0)", {"state": "installed"})
    monkeypatch.setattr(install, "installation_finding", lambda book: installed)
    monkeypatch.setattr(guarantees, "ordered", lambda node_config: [])
    monkeypatch.setattr(unitprocs, "unit_pids", lambda unit, cgroup_root: [])
    monkeypatch.setattr(ownunits, "finding", lambda: Finding("package_units", True, "shipped"))
    assert cli.main(["--config", "/nonexistent/node.conf", "status"]) == cli.EXIT_FAILED
    out = capsys.readouterr().out
    assert f"FAIL tamper_listener  {HARDEN_UNIT} is not running" in out
    assert out.rstrip().endswith("NOT all guarantees hold")


@pytest.mark.usefixtures("returns_promptly")
def test_fifos_where_the_lockdown_reads_roots_files_are_never_waited_on(
        root: Path, listener_state_of_the_test: Path) -> None:
    """/etc/shadow, GRUB's drop-in and the listener's record are root's to replace before
    installing: a FIFO at any held the installation or status for ever. Shadow is an
    error, the drop-in is not as written, the record says nothing."""
    (root / "etc/shadow").unlink()
    os.mkfifo(root / "etc/shadow")
    with pytest.raises(LockdownError, match="etc/shadow: a FIFO, not a regular file"):
        logins.password_field(root / "etc/shadow")
    (root / rescue.GRUB_DROPIN).parent.mkdir(parents=True)
    os.mkfifo(root / rescue.GRUB_DROPIN)
    assert not rescue.Rescue(root=root, regenerate_grub=lambda: None)._grub_locked()
    os.mkfifo(listener_state_of_the_test)
    assert tamper.cannot_enforce([os.getpid()]) == {}
