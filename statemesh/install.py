"""The all-or-nothing installation transaction, and its undoing at package removal.

Where the work runs: the postinst calls `statemesh-node install` (request_install), which
only records the installing package manager (grace) and restarts statemesh-harden.service
over D-Bus, waiting for the job; it prints the outcome, or the preflight refusal the unit
journaled. Preflight and the hardening itself (harden) run inside that unit, outside the
operator's terminal and process tree: Ctrl-C, SIGHUP, a closed SSH connection or a killed
apt end the waiting helper at most, never the transaction. The unit is Type=notify: the
job is "done" only once every guarantee was applied and read back, and "failed" otherwise.
A refusal journaled means a refused node stays as it was at the next boot too (IDLE), until
the operator retries.

States (statemesh.journal): installing (journaled with the boot id) -> installed, or ->
failed. A transaction that dies (SIGKILL, power loss) leaves "installing" with a dead pid:
that and "failed" make every later attempt and every StateMesh service refuse with "reboot
required" until the boot id changes. The node is reported installed only after the last
guarantee was applied and every guarantee's check() holds.

At every boot the unit runs again (boot_action says what it does): an installed node checks
the guarantees that declare it as their boot unit (ssh, agents, logins, rescue, memory; the
firewall's is statemesh-firewall.service, the others persist or have units of their own) and
applies again those that do not hold; a pristine one (an image built in a chroot, no journal
yet) runs the whole installation. A half-applied installation never outlives a boot: one
interrupted in an earlier boot is run again from the start, once, with nobody logged in; one
that failed, or whose retry was interrupted too, is given back (every guarantee reverted
from the restore record: SSH, gettys, root's password, rescue as they were), so that the
operator can log in and retry. Then the unit stays up as the tamper listener.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from statemesh import (dpkgdb, grace, guarantees, journal, leftrunning, ownunits, planted,
                       preflight, sdnotify, systemd)
from statemesh.config import NodeConfig
from statemesh.guarantees import tamper, unitmask
from statemesh.guarantees.base import FIREWALL_UNIT, HARDEN_UNIT, Finding, Guarantee

# Written by the install helper for the unit: run the whole transaction even on an
# installed node (an upgrade, a reconfigure, a trigger), not just the boot-time re-assert.
REQUEST = Path("/run/statemesh-node/install-request")
RUN_SYSTEMD = Path("/run/systemd/system")
# What each boot unit's re-assert records in the journal.
REASSERTED_EVENT = {HARDEN_UNIT: "lockdown-reasserted", FIREWALL_UNIT: "firewall-reasserted"}


class InstallError(RuntimeError):
    """The installation did not complete; the node is not installed."""


class PreflightRefused(InstallError):
    """Preflight found reasons to refuse; nothing was changed."""

    def __init__(self, report: preflight.Report):
        self.report = report
        super().__init__("refusing to install: " + "; ".join(report.problems))


def transaction(book: journal.Journal, ordered: Sequence[Guarantee],
                check_preflight: Callable[[], preflight.Report], attempt: int = 1) -> None:
    """Preflight (unless installed already), apply every guarantee in order (systemd loads
    their masks in one reload at the end), read all back. An upgrade of a node installed in
    an earlier boot keeps what holds of the guarantees that say so
    (kept_by_upgrades_while_holding): no one has had root since that boot began."""
    book.require_clean_boot()
    upgrade = book.state().installed
    keeps = upgrade and not book.installed_in_this_boot()
    if not upgrade:
        report = check_preflight()
        if not report.ok:
            book.record("preflight-refused", problems=report.problems)
            raise PreflightRefused(report)
    book.set_state(journal.INSTALLING, attempt=attempt)
    current = "preflight"
    try:
        with unitmask.one_reload(book):
            for guarantee in ordered:
                current = guarantee.name
                if keeps and guarantee.kept_by_upgrades_while_holding and guarantee.check().holds:
                    book.record("kept", guarantee=current)
                    continue
                book.record("apply", guarantee=current)
                guarantee.apply(book)
                book.record("applied", guarantee=current)
            current = "reloading systemd"
        current = "verification"
        failing = [f for f in (g.check() for g in ordered) if not f.holds]
        if failing:
            raise InstallError("; ".join(f"{f.name}: {f.detail}" for f in failing))
    except Exception as error:
        book.set_state(journal.FAILED, reason=f"{current} failed: {error}", attempt=attempt)
        raise InstallError(f"{current} failed: {error}") from error
    book.set_state(journal.INSTALLED, attempt=attempt)


def reapply_at_boot(book: journal.Journal, ordered: Sequence[Guarantee],
                    unit: str) -> Optional[List[Finding]]:
    """Boot time on an installed node: check every guarantee whose boot_unit is `unit`, in
    order, and apply again those that do not hold; returns their findings as they stand
    after. None before an installation has completed: its transaction applies them then.

    Only what does not hold is applied: apply is idempotent, but not free (the firewall's
    reloads every rule ufw.service has just loaded: most of an installed node's boot under
    emulation), and check() is what status trusts, so nothing it accepts needs repairing."""
    book.require_clean_boot()
    if not book.state().installed:
        return None
    findings: List[Finding] = []
    applied: List[str] = []
    for guarantee in ordered:
        if guarantee.boot_unit != unit:
            continue
        finding = guarantee.check()
        if not finding.holds:
            guarantee.apply(book)
            applied.append(guarantee.name)
            finding = guarantee.check()
        findings.append(finding)
    book.record(REASSERTED_EVENT[unit], guarantees=[f.name for f in findings], applied=applied)
    return findings


TRANSACTION, RETRY, GIVE_BACK, REASSERT, IDLE = (
    "transaction", "retry", "give-back", "reassert", "idle")
# The installation the operator started is attempt 1; the boot after its interruption runs
# attempt 2; nothing is attempted a third time, so that no boot loops on a broken step.
LAST_ATTEMPT = 2


def boot_action(book: journal.Journal, requested: bool) -> str:
    """What the harden unit does; every state the journal can hold maps to one action.

    - asked by the installer (install, upgrade, reconfigure), or a pristine node (an
      image's first boot: no journal at all): the transaction;
    - installed: the re-assert;
    - installing, left by an earlier boot (power lost, or killed and rebooted): the
      transaction again, unless that was already the retry: then give back;
    - failed in an earlier boot (a step raised), or a give-back that an earlier boot did not
      finish: give back;
    - anything of this boot (a transaction interrupted in this boot is "reboot required"),
      not installed after a refusal, given back, removing, removed: nothing.
    """
    state = book.state()
    pristine = state.state == journal.NOT_INSTALLED and not book.journal_path.exists()
    if requested or pristine:
        return TRANSACTION
    if state.installed:
        return REASSERT
    if state.boot_id == journal.boot_id():
        return IDLE
    if state.state == journal.INSTALLING:
        return RETRY if state.attempt < LAST_ATTEMPT else GIVE_BACK
    return GIVE_BACK if state.state in (journal.FAILED, journal.GIVING_BACK) else IDLE


def give_back(book: journal.Journal, ordered: Sequence[Guarantee], why: str) -> List[str]:
    """Revert every guarantee from the restore record, so that the operator can log in
    again and decide; the node is then "given-back" with `why`. Returns what could not
    be given back (the state stays "giving-back", and the next boot tries again). Until it
    ends, status says that the machine is being given back, not what failed before."""
    book.set_state(journal.GIVING_BACK, reason=why, attempt=book.state().attempt)
    return revert_all(book, ordered, final=journal.GIVEN_BACK, reason=why)


def interrupted_reason(state: journal.InstallState) -> str:
    """Why an installation left by an earlier boot is given back."""
    if state.state in (journal.FAILED, journal.GIVING_BACK):
        return state.reason or "the installation failed"
    if state.attempt >= LAST_ATTEMPT:
        return "the installation was interrupted, and again at its retry at boot"
    return "the installation was interrupted"


def giving_back(state: journal.InstallState) -> str:
    """Where a give-back stands: under way, or left unfinished (the next boot's harden unit
    tries again; the journal says what could not be given back)."""
    if state.in_progress():
        return f"giving the machine back now (pid {state.pid}): {state.reason}"
    when = "in this boot" if state.boot_id == journal.boot_id() else "in an earlier boot"
    return (f"giving the machine back did not finish {when} ({state.reason}); the next boot "
            f"tries again (journalctl -u {HARDEN_UNIT} says what was left)")


def harden(config: NodeConfig, listen: bool = True) -> int:
    """What statemesh-harden.service runs: boot_action's action, then listen."""
    requested = REQUEST.exists()
    REQUEST.unlink(missing_ok=True)
    return act(journal.Journal(), guarantees.ordered(config), requested, listen, preflight.check)


def act(book: journal.Journal, ordered: Sequence[Guarantee], requested: bool, listen: bool,
        check_preflight: Callable[[], preflight.Report],
        grace_path: Path = grace.GRACE_PATH) -> int:
    """Do what boot_action says; the unit's exit status."""
    try:
        action = boot_action(book, requested)
        if action == TRANSACTION:
            _transaction_then_grace_deadline(book, ordered, check_preflight, grace_path)
        elif action == RETRY:
            return _retry_at_boot(book, ordered, listen, check_preflight)
        elif action == GIVE_BACK:
            return _give_back_at_boot(book, ordered, interrupted_reason(book.state()))
        elif action == REASSERT:
            reapply_at_boot(book, ordered, HARDEN_UNIT)
        else:
            print(f"statemesh-node: {_idle(book.state())}", flush=True)
            sdnotify.ready()
            return 0
    except (InstallError, journal.RebootRequiredError, journal.JournalError) as error:
        print(f"statemesh-node: {error}", file=sys.stderr)
        return 1
    return _hardened(book, ordered, listen)


def _transaction_then_grace_deadline(book: journal.Journal, ordered: Sequence[Guarantee],
                                     check_preflight: Callable[[], preflight.Report],
                                     grace_path: Path) -> None:
    """The transaction; the installing session's grace gets its deadline when it ends,
    whatever its outcome, but for a preflight refusal: that changed nothing and started no
    watchdog, and a deadline (a grace is never lengthened) would cut the operator's retry
    short, or leave it without its session."""
    try:
        transaction(book, ordered, check_preflight)
    except PreflightRefused:
        raise
    except BaseException:
        grace.end_after(grace.AFTER_TRANSACTION, grace_path)
        raise
    grace.end_after(grace.AFTER_TRANSACTION, grace_path)


def _idle(state: journal.InstallState) -> str:
    """Why the harden unit does nothing now."""
    if state.state == journal.GIVING_BACK:
        return f"not installed: {giving_back(state)}"
    return (f"not installed ({state.state}); nothing to do until the installation is retried "
            "(dpkg --configure -a)")


def _hardened(book: journal.Journal, ordered: Sequence[Guarantee], listen: bool) -> int:
    print("statemesh-node: hardened, every guarantee holds", flush=True)
    if not listen:
        sdnotify.ready()
        return 0
    asyncio.run(tamper.listen(ordered, book, ready=sdnotify.ready))
    return 0


def _retry_at_boot(book: journal.Journal, ordered: Sequence[Guarantee], listen: bool,
                   check_preflight: Callable[[], preflight.Report]) -> int:
    """The installation interrupted in an earlier boot, run again from the start; nobody is
    logged in at boot, so preflight holds unless the machine itself has changed."""
    attempt = book.state().attempt + 1
    print("statemesh-node: the installation was interrupted in an earlier boot; running it "
          f"again (attempt {attempt})", flush=True)
    try:
        transaction(book, ordered, check_preflight, attempt=attempt)
    except InstallError as error:
        return _give_back_at_boot(book, ordered, f"its retry at boot failed: {error}")
    return _hardened(book, ordered, listen)


def _give_back_at_boot(book: journal.Journal, ordered: Sequence[Guarantee], why: str) -> int:
    """Give the machine back from the harden unit. Ready first: what is given back (sshd,
    the gettys) is ordered after this unit, and its start jobs would wait for it forever."""
    print(f"statemesh-node: giving the machine back: {why}", flush=True)
    sdnotify.ready()
    try:
        errors = give_back(book, ordered, why)
    except InstallError as error:
        print(f"statemesh-node: {error}", file=sys.stderr)
        return 1
    for error in errors:
        print(f"statemesh-node: not given back: {error}", file=sys.stderr)
    return 1 if errors else 0


async def _run_harden_unit(check_units: bool) -> List[str]:
    """Restart the harden unit and wait for its job. With `check_units` (not installed yet),
    the package's units must first be as shipped: a drop-in planted on the harden unit
    would run instead of preflight. Returns what is planted on them (nothing started)."""
    async with systemd.manager() as manager:
        units = await ownunits.read_settled_units(manager)
        if _stale(units):
            await manager.reload()
            units = await ownunits.read_settled_units(manager)
        planted = ownunits.problems(units) if check_units else []
        if not planted:
            await manager.restart_unit(HARDEN_UNIT)
        return planted


def _stale(units: Sequence[ownunits.LoadedUnit]) -> bool:
    """Whether systemd must reload before the harden unit runs: one of the package's units
    changed on disk since it was loaded, or is not loaded. The postinst's debhelper part has
    reloaded already on every normal path, and a reload costs seconds on a small machine."""
    return any(unit.load_state != "loaded" or unit.needs_reload for unit in units)


def _say(message: str, quiet: bool) -> None:
    """Tell the operator; the terminal may be gone (closed SSH), which must not matter."""
    if quiet:
        return
    try:
        print(message, flush=True)
    except OSError:
        pass


def _complain(message: str) -> None:
    try:
        print(f"statemesh-node: {message}", file=sys.stderr, flush=True)
    except OSError:
        pass


def _refusal_since(book: journal.Journal, since: int) -> Optional[List[str]]:
    """The problems of the unit's preflight refusal journaled after `since`, if it refused."""
    refusals = [event for event in book.events(since)
                if event.get("event") == "preflight-refused"
                and isinstance(event.get("problems"), list)]
    return [str(problem) for problem in refusals[-1]["problems"]] if refusals else None


def _refuse(problems: Sequence[str]) -> int:
    _complain("refusing to install; nothing was hardened:")
    for problem in problems:
        _complain(f"  - {problem}")
    return 1


def request_install(quiet: bool, book: Optional[journal.Journal] = None) -> int:
    """What the postinst runs: have the unit do the transaction, wait, report its outcome.
    Preflight runs in the unit, once, and journals its refusal, which the helper prints;
    only when the package's own units are not as shipped is the unit not started, and the
    helper runs preflight itself."""
    if not RUN_SYSTEMD.is_dir():
        _say("statemesh-node: systemd is not running here; the hardening runs at first boot",
             quiet)
        return 0
    book = book or journal.Journal()
    try:
        book.require_clean_boot()
    except journal.RebootRequiredError as error:
        _complain(str(error))
        return 1
    state = book.state()
    if state.state == journal.GIVING_BACK:  # restarting the unit would cut it short
        _complain(f"refusing to install: {giving_back(state)}")
        return 1
    grace.record_installer(os.getpid())
    outlive_the_operators_signals()
    REQUEST.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    REQUEST.write_text(f"{os.getpid()}\n", encoding="ascii")
    _say("statemesh-node: checking and hardening this machine (statemesh-harden.service)...",
         quiet)
    since = book.end()
    try:
        planted = asyncio.run(_run_harden_unit(check_units=not state.installed))
    except systemd.SystemdError as error:
        refusal = _refusal_since(book, since)
        if refusal is not None:
            return _refuse(refusal)
        state = book.state()
        why = state.reason if state.state == journal.FAILED else str(error)
        _complain(f"installation failed, the node is NOT installed: {why}")
        return 1
    if planted:  # every reason, as the unit's preflight would have given them
        problems = preflight.check().problems or planted
        book.record("preflight-refused", problems=problems)
        return _refuse(problems)
    if not book.state().installed:
        _complain("installation did not complete, the node is NOT installed")
        return 1
    _say("statemesh-node: installed; every guarantee holds", quiet)
    return 0


# What an operator's terminal sends apt's process group: Ctrl-C, a closed connection, `kill`,
# a broken pipe to a closed terminal. SIGKILL cannot be ignored; the transaction runs in its
# unit and finishes all the same, and dpkg is then left behind (status says so).
OPERATORS_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE)


def outlive_the_operators_signals() -> None:
    """The helper waits for the harden unit to report the outcome to dpkg and the
    operator; ending it early would only leave dpkg behind a finished transaction."""
    for number in OPERATORS_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


async def _stop_harden_unit() -> None:
    async with systemd.manager() as manager:
        await manager.stop_unit(HARDEN_UNIT)


def revert_all(book: journal.Journal, ordered: Sequence[Guarantee],
               final: str = journal.REMOVED, reason: str = "") -> List[str]:
    """Revert in reverse order from the restore record; returns what could not be given back.
    When everything was given back, the record is spent and the state becomes `final`.
    Systemd reloads once for every unit set given back, then starts what ran (one_give_back).

    The data guarantee (holds_workload_data, last in the list) comes first: if the workload
    data cannot be destroyed, nothing is given back (InstallError). Otherwise every other
    guarantee is reverted even if one fails, so that the operator gets back as much of the
    machine as possible.
    """
    record = book.restore_record()
    errors, reverted = [], []
    with unitmask.one_give_back() as not_started:
        for guarantee in reversed(ordered):
            try:
                guarantee.revert(record.get(guarantee.name, {}))
            except Exception as error:  # noqa: BLE001 - each guarantee has its own errors
                book.record("revert-failed", guarantee=guarantee.name, error=str(error))
                if guarantee.holds_workload_data:
                    raise InstallError("the workload data could not be destroyed, nothing "
                                       f"was given back: {error}") from error
                errors.append(f"{guarantee.name}: {error}")
                continue
            reverted.append(guarantee.name)
    for name in reverted:  # the units each gave back have started again, or not
        if name in not_started:
            failures = "; ".join(not_started[name])
            book.record("revert-failed", guarantee=name, error=failures)
            errors.append(f"{name}: not everything could be given back: {failures}")
        else:
            book.record("reverted", guarantee=name)
    if not errors:
        book.forget_restore_record()
        book.set_state(final, reason=reason)
        grace.forget()
    return errors


def uninstall(config: NodeConfig) -> int:
    """Package removal (prerm): stop the listener, destroy the data, give the machine back."""
    book = journal.Journal()
    book.set_state(journal.REMOVING)
    try:
        asyncio.run(_stop_harden_unit())
        errors = revert_all(book, guarantees.ordered(config))
    except (InstallError, systemd.SystemdError) as error:
        _complain(str(error))
        return 1
    for error in errors:
        _complain(f"not restored: {error}")
    return 1 if errors else 0


PACKAGE = "statemesh-node"


def dpkg_state(dpkg_dir: Path = dpkgdb.DPKG_DIR) -> str:
    """dpkg's state of the package ("installed", "half-configured", "unpacked", ...),
    "not-installed", or "unknown" when dpkg's database cannot be read."""
    try:
        known = dpkgdb.packages(dpkg_dir)
    except OSError:
        return "unknown"
    return dpkgdb.state(known[PACKAGE]) if PACKAGE in known else "not-installed"


def installation_finding(book: journal.Journal, dpkg_dir: Path = dpkgdb.DPKG_DIR,
                         grace_path: Path = grace.GRACE_PATH,
                         left_running: Callable[[], List[str]] = leftrunning.now) -> Finding:
    """Where the installation stands, for status: it holds only on an installed node that
    spares no installing session any more and runs no program left running by hand (one the
    spared session started lives on after it); when the node was installed at boot after an
    interruption, dpkg's state lags until the next apt run, and the detail says so."""
    try:
        state = book.state()
    except journal.JournalError as error:
        return Finding("installation", False, str(error))
    spared = grace.current(grace_path)
    facts = {"state": state.state, "attempt": state.attempt, "reason": state.reason,
             "dpkg": dpkg_state(dpkg_dir),
             "spared_session": None if spared is None else spared.describe()}
    if not state.installed:
        return Finding("installation", False, _not_installed(book, state), facts)
    detail = f"installed (version {state.version})"
    if facts["dpkg"] != "installed":
        detail += (f"; dpkg still has the package {facts['dpkg']} (the installation was "
                   "completed at boot or cut short): the next apt run, or "
                   "dpkg --configure -a, completes it")
    if spared is not None:
        return Finding("installation", False,
                       f"{detail}, but the installing session is still spared: "
                       f"{spared.describe()}", facts)
    try:
        facts["left_running"] = left_running()
    except systemd.SystemdError as error:
        return Finding("installation", False, f"{detail}, but systemd cannot be asked what "
                       f"runs by hand: {error}", facts)
    if facts["left_running"]:
        left = planted.named(facts["left_running"], leftrunning.ENTRIES_SHOWN)
        return Finding("installation", False,
                       f"{detail}, but programs left running by hand keep running as root: "
                       f"{left} (the next boot ends them)", facts)
    return Finding("installation", True, detail, facts)


def _not_installed(book: journal.Journal, state: journal.InstallState) -> str:
    if state.state == journal.INSTALLING and state.in_progress():
        return f"not installed: installing now (pid {state.pid}, attempt {state.attempt})"
    if state.state == journal.GIVING_BACK:
        return f"not installed: {giving_back(state)}"
    try:
        book.require_clean_boot()
    except journal.RebootRequiredError as error:
        return f"not installed: {error}"
    if state.state == journal.GIVEN_BACK:
        return f"not installed: given back at boot: {state.reason}"
    if state.state in (journal.INSTALLING, journal.FAILED):
        return (f"not installed: {interrupted_reason(state)} in an earlier boot "
                f"(journalctl -u {HARDEN_UNIT} says what this boot did about it)")
    return f"not installed ({state.state})"
