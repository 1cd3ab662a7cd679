"""The node's state for its evidence: what `statemesh-node status` says, measured again when
it is older than a bound.

The endpoint signs whatever state it is given, so the state must be status's own verdicts,
not a summary: each line of `status --json` becomes a check of the evidence, detail and all.
It is measured by running the status command itself (the same checks, the same code), as
root, by the state service (statemesh.attest.stateservice), which the endpoint asks: the
network-facing endpoint runs without privileges and keeps none of the checks' imports, and
a check that crashes takes nothing of the endpoint with it. A state that cannot be measured
is a failing check, never an absent one: the node then answers "not ready".
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

from statemesh.attest.evidence import EvidenceFormatError, NodeState, StateCheck, check_state

STATUS_COMMAND = ("/usr/bin/statemesh-node", "status", "--json")
STATUS_TIMEOUT = 120.0
MAX_REPORT_BYTES = 4 << 20  # status --json of this version is a few kilobytes
# A state older than REFRESH_SECONDS is measured again in the background and still served;
# one older than LONGEST_SECONDS (or none yet) is measured before it is served. A handshake
# thus seldom waits for status, and no evidence carries a state older than LONGEST_SECONDS:
# below the verifier's default bound (120 s, statemesh.attest.verifier).
REFRESH_SECONDS = 30.0
LONGEST_SECONDS = 90.0
DETAIL_LIMIT = 400
INSTALLED = "installed"
# The lines of this version's status, in its order: a verifier requires each by default, so
# that a node whose status says less (an older package) is not taken for one whose every
# guarantee holds.
STATUS_CHECKS = ("installation", "tamper_listener", "package_units", "planted", "ssh",
                 "agents", "logins", "rescue", "memory", "firewall", "security_class",
                 "watchdog", "storage")


def _printable(text: str) -> str:
    """A detail as the evidence carries it: printable ASCII, bounded."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in str(text))
    return cleaned if len(cleaned) <= DETAIL_LIMIT else cleaned[:DETAIL_LIMIT - 3] + "..."


def _check(line: Dict[str, Any]) -> StateCheck:
    return StateCheck(str(line["name"]), line["holds"] is True, _printable(line["detail"]))


def from_status(report: Dict[str, Any], checked: int, exempt_units: Iterable[str]) -> NodeState:
    """The state in `status --json`'s report, measured at `checked`."""
    installation = report["installation"]
    lines = [installation, report["tamper_listener"], report["package_units"],
             report["planted"], *report["guarantees"]]
    installed = installation.get("facts", {}).get("state") == INSTALLED
    return NodeState(checked, installed, str(report.get("version", "")),
                     tuple(_check(line) for line in lines), tuple(exempt_units))


def unmeasured(checked: int, why: str, exempt_units: Iterable[str]) -> NodeState:
    """The state when status could not be read: one failing check that says why."""
    return NodeState(checked, False, "", (StateCheck("status", False, _printable(why)),),
                     tuple(exempt_units))


class Unanswered(Exception):
    """No report came in time: from status, or from the state service asked for one."""


def status_report(command: Sequence[str] = STATUS_COMMAND,
                  timeout: float = STATUS_TIMEOUT) -> bytes:
    """status --json's report; status exits 1 when something fails, still with a report."""
    try:
        done = subprocess.run(list(command), capture_output=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise Unanswered(f"status did not answer within {timeout:.0f} s") from None
    return done.stdout[:MAX_REPORT_BYTES]


def measure(exempt_units: Sequence[str], report: Callable[[], bytes],
            clock: Callable[[], float] = time.time) -> NodeState:
    """The state in the report `report` gives (status's, or the state service's copy)."""
    checked = int(clock())
    try:
        return check_state(from_status(json.loads(report()), checked, exempt_units))
    except Unanswered as error:
        return unmeasured(checked, str(error), exempt_units)
    except EvidenceFormatError as error:  # a name, or a count, the evidence cannot carry
        return unmeasured(checked, f"the state cannot be signed: {error}", [])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return unmeasured(checked, f"status could not be read: {error}", exempt_units)


class Fresh:
    """The node's state for each handshake: the last one measured while it is recent enough,
    measured again in the background once older than `refresh`, and before it is served
    once older than `longest`. One measurement runs at a time."""

    def __init__(self, measure_state: Callable[[], NodeState], refresh: float = REFRESH_SECONDS,
                 longest: float = LONGEST_SECONDS, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self.measure_state = measure_state
        self.refresh = refresh
        self.longest = longest
        self.clock = clock
        self.monotonic = monotonic
        self._state: Optional[NodeState] = None
        self._measured_at = 0.0  # monotonic
        self._measuring = threading.Lock()

    def _age(self) -> Optional[float]:
        """Seconds since the state was checked, by the wall clock (what the evidence says)
        and by the monotonic one (a wall clock set back cannot make it look recent); None
        for none yet, or one from "the future"."""
        if self._state is None:
            return None
        wall = self.clock() - self._state.checked
        return max(wall, self.monotonic() - self._measured_at) if wall >= 0 else None

    def __call__(self) -> NodeState:
        state, age = self._state, self._age()
        if state is None or age is None or age >= self.longest:
            return self._measure()
        if age >= self.refresh and not self._measuring.locked():
            self.in_background()
        return state

    def _measure(self) -> NodeState:
        with self._measuring:
            age = self._age()
            if self._state is not None and age is not None and age < self.refresh:
                return self._state  # measured by another caller meanwhile
            state = self.measure_state()
            self._state, self._measured_at = state, self.monotonic()
            return state

    def in_background(self) -> threading.Thread:
        """Measure without making the caller wait."""
        thread = threading.Thread(target=self._measure, name="node-state", daemon=True)
        thread.start()
        return thread
