"""The journaled all-or-nothing transaction, "reboot required", and the removal path."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from statemesh import grace, install, journal, systemd
from statemesh.guarantees.base import Finding
from tests.conftest import ROOT
from tests.fakebus import FakeBus, fakebus, package_units  # noqa: F401 - fixture


class Step:
    """A guarantee that records what is asked of it."""

    def __init__(self, name: str, log: List[Any], fail: Optional[Exception] = None,
                 holds_after: bool = True, revert_fails: bool = False):
        self.name = name
        self.log = log
        self.fail = fail
        self.holds_after = holds_after
        self.revert_fails = revert_fails
        self.applied = False
        self.boot_unit = None
        self.tamper_watched = False
        self.holds_workload_data = name == "storage"
        self.kept_by_upgrades_while_holding = name == "firewall"

    def check(self) -> Finding:
        return Finding(self.name, self.applied and self.holds_after, "checked")

    def apply(self, book: journal.Journal) -> None:
        self.log.append(("apply", self.name))
        book.remember(self.name, {"before": f"{self.name}-original"})
        if self.fail:
            raise self.fail
        self.applied = True

    def revert(self, record: Dict[str, Any]) -> None:
        self.log.append(("revert", self.name, record))
        if self.revert_fails:
            raise RuntimeError(f"{self.name} cannot be reverted")


class Boot:
    """This test's boot id, which a "reboot" changes."""

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        self.reboot()

    def reboot(self) -> None:
        self.count += 1
        self.path.write_text(f"00000000-0000-0000-0000-{self.count:012d}\n")


@pytest.fixture
def boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Boot:
    current = Boot(tmp_path / "boot_id")
    monkeypatch.setattr(journal, "BOOT_ID_PATH", current.path)
    return current


@pytest.fixture
def book(tmp_path: Path, boot: Boot) -> journal.Journal:
    return journal.Journal(tmp_path / "state")


def passed() -> Any:
    from statemesh.preflight import Report
    return Report([], {})


def refused() -> Any:
    from statemesh.preflight import Report
    return Report(["interactive session 5 of bob on pts/3"], {})


def test_success_applies_in_order_and_reports_installed(book: journal.Journal) -> None:
    log: List[Any] = []
    steps = [Step(name, log) for name in ("ssh", "logins", "rescue", "storage")]
    install.transaction(book, steps, passed)
    assert log == [("apply", n) for n in ("ssh", "logins", "rescue", "storage")]
    assert book.state().state == journal.INSTALLED
    names = [e["event"] for e in book.events()]
    assert names[0] == "state-installing" and names[-1] == "state-installed"
    assert names.count("applied") == 4
    assert {e["boot_id"] for e in book.events()} == {journal.boot_id()}


def test_preflight_refusal_changes_nothing(book: journal.Journal) -> None:
    log: List[Any] = []
    with pytest.raises(install.PreflightRefused, match="interactive session 5 of bob"):
        install.transaction(book, [Step("ssh", log)], refused)
    assert log == []
    assert book.state().state == journal.NOT_INSTALLED
    assert book.restore_record() == {}
    book.require_clean_boot()  # a refusal is not an interrupted installation


def test_failed_step_means_reboot_required_then_a_clean_retry(book: journal.Journal,
                                                              boot: Boot) -> None:
    log: List[Any] = []
    steps = [Step("ssh", log), Step("firewall", log, fail=RuntimeError("ufw is broken")),
             Step("storage", log)]
    with pytest.raises(install.InstallError, match="firewall failed: ufw is broken"):
        install.transaction(book, steps, passed)
    assert ("apply", "storage") not in log
    assert book.state().state == journal.FAILED and not book.state().installed
    with pytest.raises(journal.RebootRequiredError, match="reboot required: firewall failed"):
        journal.require_clean_boot(book.directory)
    with pytest.raises(journal.RebootRequiredError):
        install.transaction(book, steps, passed)
    boot.reboot()
    steps[1].fail = None
    install.transaction(book, steps, passed)
    assert book.state().installed
    assert book.restore_record()["ssh"] == {"before": "ssh-original"}


def test_a_guarantee_that_does_not_hold_afterwards_fails_the_installation(
        book: journal.Journal) -> None:
    steps = [Step("ssh", []), Step("rescue", [], holds_after=False)]
    with pytest.raises(install.InstallError, match="verification failed: rescue: checked"):
        install.transaction(book, steps, passed)
    assert book.state().state == journal.FAILED


KILLED_MIDWAY = """
import os, signal, sys
from pathlib import Path
from statemesh import grace, install, journal
from statemesh.preflight import Report
journal.BOOT_ID_PATH = Path(sys.argv[2])

class Killer:
    name = "logins"
    def apply(self, book):
        os.kill(os.getpid(), signal.SIGKILL)

install.transaction(journal.Journal(Path(sys.argv[1])), [Killer()], lambda: Report([], {}))
"""


def test_sigkill_midway_is_never_installed_and_needs_a_reboot(book: journal.Journal,
                                                              boot: Boot) -> None:
    child = subprocess.run([sys.executable, "-c", KILLED_MIDWAY, str(book.directory),
                            str(boot.path)], cwd=ROOT, capture_output=True, check=False)
    assert child.returncode == -9, child.stderr
    assert book.state().state == journal.INSTALLING and not book.state().installed
    with pytest.raises(journal.RebootRequiredError, match=r"an installation \(pid \d+\) was "
                                                          r"interrupted in this boot"):
        book.require_clean_boot()
    boot.reboot()
    install.transaction(book, [Step("logins", [])], passed)
    assert book.state().installed


def test_a_running_transaction_is_not_an_interrupted_one(book: journal.Journal) -> None:
    book.set_state(journal.INSTALLING)
    book.require_clean_boot()


def test_an_installed_node_is_reapplied_without_preflight(book: journal.Journal) -> None:
    log: List[Any] = []
    install.transaction(book, [Step("ssh", log)], passed)
    install.transaction(book, [Step("ssh", log)], refused)
    assert log == [("apply", "ssh"), ("apply", "ssh")]
    assert book.state().installed


def test_an_upgrade_keeps_a_holding_guarantee_that_says_so_and_applies_a_failing_one(
        book: journal.Journal, boot: Boot) -> None:
    log: List[Any] = []
    steps = [Step("ssh", log), Step("firewall", log)]
    install.transaction(book, steps, passed)
    install.transaction(book, steps, passed)  # an upgrade in the installation's boot
    assert log == [("apply", "ssh"), ("apply", "firewall")] * 2
    boot.reboot()
    install.transaction(book, steps, passed)  # the firewall holds, ssh says nothing
    install.transaction(book, steps, passed)  # and again, in the same boot
    assert log[4:] == [("apply", "ssh"), ("apply", "ssh")]
    assert [e["guarantee"] for e in book.events() if e["event"] == "kept"] == ["firewall"] * 2
    steps[1].holds_after = False  # broken since: applied, and the verification still reads it
    with pytest.raises(install.InstallError, match="firewall: checked"):
        install.transaction(book, steps, passed)
    assert log[-2:] == [("apply", "ssh"), ("apply", "firewall")]


def test_an_installation_of_this_boot_is_told_from_upgrades_and_earlier_boots(
        book: journal.Journal, boot: Boot) -> None:
    assert not book.installed_in_this_boot()
    install.transaction(book, [Step("ssh", [])], passed)
    assert book.installed_in_this_boot()
    boot.reboot()
    assert not book.installed_in_this_boot()
    install.transaction(book, [Step("ssh", [])], passed)  # an upgrade
    assert not book.installed_in_this_boot()
    # A torn line (power lost mid-write, or root's own) hides what follows: it may have.
    with book.journal_path.open("a") as journal_file:
        journal_file.write('{"event": "state-inst\n')
    assert book.installed_in_this_boot()


def test_a_first_installation_applies_a_holding_guarantee_all_the_same(book: journal.Journal,
                                                          boot: Boot) -> None:
    """Not installed yet (a first installation, or an interrupted one retried): the operator had root,
    and the firewall's check does not read all a boot would load (a raw line in user.rules)."""
    log: List[Any] = []
    firewall = Step("firewall", log)
    firewall.applied = True  # it holds, as the operator prepared it
    install.transaction(book, [firewall], passed)
    assert log == [("apply", "firewall")]


def test_revert_is_reverse_with_each_record_then_the_record_is_spent(
        book: journal.Journal) -> None:
    log: List[Any] = []
    steps = [Step(name, log) for name in ("ssh", "logins", "storage")]
    install.transaction(book, steps, passed)
    log.clear()
    assert install.revert_all(book, steps) == []
    assert log == [("revert", "storage", {"before": "storage-original"}),
                   ("revert", "logins", {"before": "logins-original"}),
                   ("revert", "ssh", {"before": "ssh-original"})]
    assert book.restore_record() == {} and book.state().state == journal.REMOVED


def test_data_not_destroyed_means_nothing_given_back(book: journal.Journal) -> None:
    log: List[Any] = []
    steps = [Step("ssh", log), Step("storage", log, revert_fails=True)]
    install.transaction(book, steps, passed)
    log.clear()
    with pytest.raises(install.InstallError, match="data could not be destroyed"):
        install.revert_all(book, steps)
    assert [entry[:2] for entry in log] == [("revert", "storage")]
    assert "ssh" in book.restore_record()


def test_other_revert_failures_give_back_the_rest_and_keep_the_record(
        book: journal.Journal) -> None:
    log: List[Any] = []
    steps = [Step("ssh", log), Step("firewall", log, revert_fails=True), Step("storage", log)]
    install.transaction(book, steps, passed)
    log.clear()
    assert install.revert_all(book, steps) == ["firewall: firewall cannot be reverted"]
    assert [entry[:2] for entry in log] == [("revert", "storage"), ("revert", "firewall"),
                                            ("revert", "ssh")]
    assert "ssh" in book.restore_record()


def test_remember_keeps_the_first_value_across_instances(book: journal.Journal) -> None:
    book.remember("ssh", {"unit_files": {"ssh.service": "enabled"}})
    journal.Journal(book.directory).remember("ssh", {"unit_files": {"ssh.service": "masked"}})
    assert book.restore_record() == {"ssh": {"unit_files": {"ssh.service": "enabled"}}}


def test_unreadable_state_is_a_clear_error(book: journal.Journal) -> None:
    book.directory.mkdir(parents=True)
    book.state_path.write_text("{not json")
    with pytest.raises(journal.JournalError, match="state.json cannot be read"):
        book.require_clean_boot()


@pytest.mark.usefixtures("returns_promptly")
def test_a_fifo_among_the_journals_files_is_a_clear_error(book: journal.Journal) -> None:
    """Root can leave a FIFO where the journal's files go before installing: status and
    the installation waited on it for ever."""
    book.directory.mkdir(parents=True)
    for path in (book.state_path, book.restore_path, book.journal_path):
        os.mkfifo(path)
    not_regular = "cannot be read: a FIFO, not a regular file"
    with pytest.raises(journal.JournalError, match=f"state.json {not_regular}"):
        book.require_clean_boot()
    with pytest.raises(journal.JournalError, match=f"restore.json {not_regular}"):
        book.restore_record()
    with pytest.raises(journal.JournalError, match=f"journal.jsonl {not_regular}"):
        book.events()


def test_what_the_harden_unit_does_at_boot(book: journal.Journal) -> None:
    assert install.boot_action(book, requested=False) == install.TRANSACTION  # image, 1st boot
    with pytest.raises(install.PreflightRefused):
        install.transaction(book, [Step("ssh", [])], refused)
    assert install.boot_action(book, requested=False) == install.IDLE  # no surprise install
    assert install.boot_action(book, requested=True) == install.TRANSACTION
    install.transaction(book, [Step("ssh", [])], passed)
    assert install.boot_action(book, requested=False) == install.REASSERT
    assert install.boot_action(book, requested=True) == install.TRANSACTION  # upgrade


def _state_of_an_earlier_boot(book: journal.Journal, boot: Boot, state: str,
                              attempt: int = 1) -> None:
    book.set_state(state, reason="firewall failed: ufw is broken" if state == journal.FAILED
                   else "", attempt=attempt)
    boot.reboot()


@pytest.mark.parametrize("state, attempt, action", [
    (journal.INSTALLING, 1, install.RETRY),  # power lost, or killed then rebooted
    (journal.INSTALLING, 2, install.GIVE_BACK),  # ... and again during the retry at boot
    (journal.FAILED, 1, install.GIVE_BACK),
    (journal.FAILED, 2, install.GIVE_BACK),
    (journal.INSTALLED, 1, install.REASSERT),
    (journal.GIVING_BACK, 1, install.GIVE_BACK),  # the boot ended before the give-back did
    (journal.GIVEN_BACK, 1, install.IDLE),
    (journal.REMOVING, 1, install.IDLE),
    (journal.REMOVED, 1, install.IDLE),
])
def test_every_state_left_by_an_earlier_boot_maps_to_one_action(
        book: journal.Journal, boot: Boot, state: str, attempt: int, action: str) -> None:
    _state_of_an_earlier_boot(book, boot, state, attempt)
    assert install.boot_action(book, requested=False) == action
    assert install.boot_action(book, requested=True) == install.TRANSACTION


@pytest.mark.parametrize("state", [journal.INSTALLING, journal.FAILED])
def test_what_this_boot_left_half_done_waits_for_the_reboot(book: journal.Journal,
                                                            state: str) -> None:
    book.set_state(state)  # this process: "installing" is in progress, not interrupted
    assert install.boot_action(book, requested=False) == install.IDLE


def test_an_interrupted_installation_is_run_again_at_boot(book: journal.Journal,
                                                          boot: Boot) -> None:
    log: List[Any] = []
    steps = [Step("ssh", log), Step("firewall", log), Step("storage", log)]
    _state_of_an_earlier_boot(book, boot, journal.INSTALLING)
    assert install.act(book, steps, requested=False, listen=False, check_preflight=passed) == 0
    assert log == [("apply", "ssh"), ("apply", "firewall"), ("apply", "storage")]
    assert book.state().installed and book.state().attempt == 2
    assert install.installation_finding(book, left_running=list).holds


def test_a_retry_at_boot_that_fails_gives_the_machine_back_at_once(book: journal.Journal,
                                                                   boot: Boot) -> None:
    log: List[Any] = []
    steps = [Step("ssh", log), Step("firewall", log, fail=RuntimeError("ufw is broken")),
             Step("storage", log)]
    _state_of_an_earlier_boot(book, boot, journal.INSTALLING)
    assert install.act(book, steps, requested=False, listen=False, check_preflight=passed) == 0
    assert [entry[:2] for entry in log] == [("apply", "ssh"), ("apply", "firewall"),
                                            ("revert", "storage"), ("revert", "firewall"),
                                            ("revert", "ssh")]
    state = book.state()
    assert state.state == journal.GIVEN_BACK
    assert state.reason == "its retry at boot failed: firewall failed: ufw is broken"
    assert book.restore_record() == {}
    finding = install.installation_finding(book)
    assert not finding.holds
    assert finding.detail == f"not installed: given back at boot: {state.reason}"
    book.require_clean_boot()  # the operator may log in and retry at once
    assert install.boot_action(book, requested=False) == install.IDLE


@pytest.mark.parametrize("state, attempt, why", [
    (journal.FAILED, 1, "firewall failed: ufw is broken"),
    (journal.INSTALLING, 2, "the installation was interrupted, and again at its retry at boot"),
])
def test_a_failed_or_twice_interrupted_installation_is_given_back_at_boot(
        book: journal.Journal, boot: Boot, state: str, attempt: int, why: str) -> None:
    log: List[Any] = []
    steps = [Step("ssh", log), Step("logins", log)]
    for step in steps:
        step.apply(book)
    log.clear()
    _state_of_an_earlier_boot(book, boot, state, attempt)
    assert install.act(book, steps, requested=False, listen=False, check_preflight=passed) == 0
    assert log == [("revert", "logins", {"before": "logins-original"}),
                   ("revert", "ssh", {"before": "ssh-original"})]
    assert (book.state().state, book.state().reason) == (journal.GIVEN_BACK, why)


def test_a_give_back_that_leaves_something_is_tried_again_at_the_next_boot(
        book: journal.Journal, boot: Boot) -> None:
    steps = [Step("ssh", []), Step("firewall", [], revert_fails=True)]
    _state_of_an_earlier_boot(book, boot, journal.FAILED)
    assert install.act(book, steps, requested=False, listen=False, check_preflight=passed) == 1
    state = book.state()
    assert (state.state, state.reason) == (journal.GIVING_BACK, "firewall failed: ufw is broken")
    assert install.installation_finding(book).detail == (
        "not installed: giving the machine back now (pid "
        f"{os.getpid()}): firewall failed: ufw is broken")
    boot.reboot()
    assert install.installation_finding(book).detail == (
        "not installed: giving the machine back did not finish in an earlier boot (firewall "
        "failed: ufw is broken); the next boot tries again (journalctl -u "
        "statemesh-harden.service says what was left)")
    assert install.boot_action(book, requested=False) == install.GIVE_BACK
    assert install.act(book, steps, requested=False, listen=False, check_preflight=passed) == 1
    assert book.state().reason == "firewall failed: ufw is broken"  # not nested


DPKG_STATUS = """Package: other
Status: install ok installed

Package: statemesh-node
Status: install ok {}
Version: 0.1.0
"""


def test_status_says_when_dpkg_lags_behind_an_installation_completed_at_boot(
        book: journal.Journal, tmp_path: Path) -> None:
    status_file = tmp_path / "status"
    install.transaction(book, [Step("ssh", [])], passed)
    status_file.write_text(DPKG_STATUS.format("installed"))
    finding = install.installation_finding(book, tmp_path, left_running=list)
    assert finding.holds and finding.detail.startswith("installed (version ")
    status_file.write_text(DPKG_STATUS.format("half-configured"))
    finding = install.installation_finding(book, tmp_path, left_running=list)
    assert finding.holds and "dpkg still has the package half-configured" in finding.detail


def test_dpkg_state_reads_the_updates_dpkg_has_not_folded_in_yet(tmp_path: Path) -> None:
    status_file = tmp_path / "status"
    status_file.write_text(DPKG_STATUS.format("installed"))
    assert install.dpkg_state(tmp_path) == "installed"
    (tmp_path / "updates").mkdir()
    (tmp_path / "updates" / "0001").write_text(DPKG_STATUS.format("half-configured"))
    (tmp_path / "updates" / "tmp.i").write_text(DPKG_STATUS.format("unpacked"))
    assert install.dpkg_state(tmp_path) == "half-configured"
    (tmp_path / "updates" / "0002").write_text(DPKG_STATUS.format("installed"))
    assert install.dpkg_state(tmp_path) == "installed"


def test_an_installed_node_that_still_spares_the_installing_session_does_not_hold(
        book: journal.Journal, tmp_path: Path) -> None:
    status_file = tmp_path / "status"
    status_file.write_text(DPKG_STATUS.format("installed"))
    record = tmp_path / "install-grace.json"
    install.transaction(book, [Step("ssh", [])], passed)
    grace.record_installer(os.getpid(), record)
    finding = install.installation_finding(book, tmp_path, record)
    assert not finding.holds
    assert "the installing session is still spared" in finding.detail
    assert f"of pid {os.getpid()} " in finding.detail and "until the transaction ends" in finding.detail
    grace.end_after(0, record)
    finding = install.installation_finding(book, tmp_path, record, list)
    assert finding.holds and finding.facts["spared_session"] is None


def test_status_judges_the_grace_once_however_root_flips_it_between_lines(
        book: journal.Journal, tmp_path: Path) -> None:
    """Status's installation line read the grace record, then each guarantee read it again:
    root removing the record before the first and putting it back before the agents' line
    made both hold, a spared agent running. Inside grace.pinned() every line sees the first
    judgement, whether the record or the installer (SIGSTOP) changes meanwhile."""
    (tmp_path / "status").write_text(DPKG_STATUS.format("installed"))
    record = tmp_path / "install-grace.json"
    install.transaction(book, [Step("ssh", [])], passed)
    with grace.pinned():
        assert install.installation_finding(book, tmp_path, record, list).holds  # no record
        grace.record_installer(os.getpid(), record)  # put back
        assert grace.current(record) is None
    assert grace.current(record) is not None  # outside, judged again
    with grace.pinned():
        assert not install.installation_finding(book, tmp_path, record, list).holds
        record.unlink()  # removed before the next line
        assert grace.current(record) is not None


def test_a_unit_the_spared_session_started_by_hand_fails_the_installation(
        book: journal.Journal, tmp_path: Path) -> None:
    """The installing session may run anything while it is spared (another tmux window);
    a unit it started with systemd-run outlives it: status says so until the next boot."""
    (tmp_path / "status").write_text(DPKG_STATUS.format("installed"))
    record = tmp_path / "install-grace.json"
    install.transaction(book, [Step("ssh", [])], passed)
    left = ["left-behind.service (started by hand): pid 42 (/usr/bin/sleep 1644)"]
    finding = install.installation_finding(book, tmp_path, record, lambda: left)
    assert not finding.holds
    assert finding.detail == (
        "installed (version 0.1.0), but programs left running by hand keep running as root: "
        "left-behind.service (started by hand): pid 42 (/usr/bin/sleep 1644) (the next boot "
        "ends them)")

    def no_bus() -> List[str]:
        raise systemd.NoBusError("cannot connect to the system bus")

    finding = install.installation_finding(book, tmp_path, record, no_bus)
    assert not finding.holds and "systemd cannot be asked what runs by hand" in finding.detail
    assert install.installation_finding(book, tmp_path, record, list).holds


def test_the_transaction_stamps_the_grace_deadline_installed_or_not(
        book: journal.Journal, tmp_path: Path) -> None:
    record = tmp_path / "install-grace.json"
    grace.record_installer(os.getpid(), record)
    failing = [Step("ssh", [], fail=RuntimeError("no"))]
    assert install.act(book, failing, requested=True, listen=False, check_preflight=passed,
                       grace_path=record) == 1
    stamped = grace.recorded(record)
    assert stamped is not None and stamped.ends_at is not None
    assert stamped.ends_at - grace.boottime() <= grace.AFTER_TRANSACTION


def test_a_preflight_refusal_leaves_the_installing_session_its_grace_for_the_retry(
        book: journal.Journal, tmp_path: Path) -> None:
    """A deadline is never moved later: stamped at a refusal, it would cut the retry's
    transaction short, or (once passed) leave the retry's preflight without its session."""
    record = tmp_path / "install-grace.json"
    grace.record_installer(os.getpid(), record)
    assert install.act(book, [Step("ssh", [])], requested=True, listen=False,
                       check_preflight=refused, grace_path=record) == 1
    stamped = grace.recorded(record)
    assert stamped is not None and stamped.ends_at is None


def test_status_names_an_interrupted_installation_of_this_boot(book: journal.Journal) -> None:
    child = subprocess.run([sys.executable, "-c", KILLED_MIDWAY, str(book.directory),
                            str(journal.BOOT_ID_PATH)], cwd=ROOT, capture_output=True, check=False)
    assert child.returncode == -9, child.stderr
    finding = install.installation_finding(book)
    assert not finding.holds and finding.detail.startswith("not installed: reboot required")


def _left_by_a_gone_process(book: journal.Journal) -> None:
    """The state as its process left it, that process being gone (pid 0 is nobody's)."""
    journal.write_atomically(book.state_path, dataclasses.asdict(
        dataclasses.replace(book.state(), pid=0)))


def test_no_installation_cuts_a_give_back_short(book: journal.Journal, boot: Boot,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    """The postinst restarts the harden unit: during a give-back (or after one that did not
    finish in this boot) that would start a transaction over a half-reverted machine."""
    monkeypatch.setattr(install, "RUN_SYSTEMD", tmp_path)  # "systemd runs here"
    book.set_state(journal.GIVING_BACK, reason="its retry at boot failed: firewall failed")
    assert install.request_install(quiet=True, book=book) == 1
    assert ("refusing to install: giving the machine back now (pid "
            f"{os.getpid()}): its retry at boot failed") in capsys.readouterr().err
    _left_by_a_gone_process(book)
    assert install.request_install(quiet=True, book=book) == 1
    assert ("refusing to install: giving the machine back did not finish in this boot "
            "(its retry at boot failed: firewall failed); the next boot tries again"
            ) in capsys.readouterr().err
    assert install.boot_action(book, requested=False) == install.IDLE  # not this boot again
    boot.reboot()
    assert install.boot_action(book, requested=False) == install.GIVE_BACK


@pytest.fixture
def helper(fakebus: FakeBus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeBus:
    """The postinst's helper against the stand-in systemd, with the package's units: its
    request file in a temp dir, this test process's signals and the host's /run untouched."""
    monkeypatch.setattr(install, "RUN_SYSTEMD", tmp_path)
    monkeypatch.setattr(install, "REQUEST", tmp_path / "statemesh-node/install-request")
    monkeypatch.setattr(install, "outlive_the_operators_signals", lambda: None)
    monkeypatch.setattr(grace, "record_installer", lambda pid: None)
    package_units(fakebus.systemd)
    return fakebus


def test_the_helper_prints_the_refusal_the_unit_journaled_and_the_next_boot_leaves_it(
        helper: FakeBus, book: journal.Journal, boot: Boot,
        capsys: pytest.CaptureFixture) -> None:
    """Preflight runs once, in the harden unit; the waiting helper prints its refusal. A
    refusal of an earlier run is not this one's; and a refused machine is not installed by
    the next boot behind the operator's back (the journal is not pristine any more)."""
    helper.systemd.failing["statemesh-harden.service"] = "failed"
    book.record("preflight-refused", problems=["an earlier run's reason"])
    assert install.request_install(quiet=True, book=book) == 1
    err = capsys.readouterr().err
    assert "installation failed, the node is NOT installed" in err
    assert "an earlier run's reason" not in err

    helper.systemd.after["RestartUnit"] = lambda args: book.record(
        "preflight-refused", problems=["interactive session 5 of bob on pts/3"])
    assert install.request_install(quiet=True, book=book) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["statemesh-node: refusing to install; nothing was hardened:",
                                "statemesh-node:   - interactive session 5 of bob on pts/3"]
    boot.reboot()
    assert install.boot_action(book, requested=False) == install.IDLE


def test_a_drop_in_on_the_harden_unit_is_refused_by_the_helper_without_starting_it(
        helper: FakeBus, book: journal.Journal, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """A drop-in planted on statemesh-harden.service would run instead of the unit's
    preflight: the helper finds it on the units it reads anyway, starts nothing, and gives
    every reason preflight finds."""
    dropin = "/etc/systemd/system/statemesh-harden.service.d/50-planted.conf"
    helper.systemd.units["statemesh-harden.service"].dropins = [dropin]
    from statemesh.preflight import Report
    monkeypatch.setattr(install.preflight, "check", lambda: Report(
        [f"statemesh-harden.service has drop-ins: {dropin}", "another reason"], {}))
    assert install.request_install(quiet=True, book=book) == 1
    err = capsys.readouterr().err
    assert f"  - statemesh-harden.service has drop-ins: {dropin}" in err
    assert "  - another reason" in err
    assert "RestartUnit" not in [member for member, _args in helper.systemd.calls]
    assert [e["event"] for e in book.events()] == ["preflight-refused"]


OUTLIVES_SIGNALS = """
import os, signal
from statemesh import install
install.outlive_the_operators_signals()
for name in ("SIGINT", "SIGHUP", "SIGTERM", "SIGPIPE"):
    os.kill(os.getpid(), getattr(signal, name))
    print(name, "outlived", flush=True)
"""


def test_the_postinst_helper_outlives_ctrl_c_a_closed_terminal_and_kill() -> None:
    """What a terminal sends apt's process group must not end the helper that waits for the
    harden unit: dpkg would be left behind a transaction that finishes anyway."""
    child = subprocess.run([sys.executable, "-c", OUTLIVES_SIGNALS], cwd=ROOT,
                           capture_output=True, text=True, check=False, timeout=60)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split("\n")[:4] == [f"{name} outlived" for name in
                                            ("SIGINT", "SIGHUP", "SIGTERM", "SIGPIPE")]
