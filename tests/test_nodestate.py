"""The node's state for its evidence: status's report line by line, a failure to read it is a
failing check (never a ready state), and a state is measured again once it is too old."""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, List

from harness.nodestates import STATUS_LINES
from statemesh.attest import nodestate
from statemesh.attest.evidence import NodeState, StateCheck


def _line(name: str, holds: bool, detail: str, **facts: Any) -> Dict[str, Any]:
    return {"name": name, "holds": holds, "detail": detail, "facts": facts}


def status_report(firewall_holds: bool = True) -> Dict[str, Any]:
    """What `statemesh-node status --json` prints on an installed node."""
    return {
        "version": "0.1.0", "zone": "eu-west", "holds": firewall_holds,
        "installation": _line("installation", True, "installed (version 0.1.0)",
                              state="installed"),
        "tamper_listener": _line("tamper_listener", True, "statemesh-harden.service running"),
        "package_units": _line("package_units", True, "6 units as the package shipped them"),
        "planted": _line("planted", True, "nothing planted for root's programs to load or run "
                         "later"),
        "guarantees": [_line("ssh", True, "masked: ssh.service\u2026; not running"),
                       _line("firewall", firewall_holds, "ufw on" if firewall_holds else
                             "ufw is inactive\n(ufw enable)")],
    }


def test_every_line_of_status_becomes_a_check() -> None:
    state = nodestate.from_status(status_report(), 1_700_000_000, ["sm-runtime.service"])
    assert state.ready and state.installed and state.package_version == "0.1.0"
    assert [c.name for c in state.checks] == ["installation", "tamper_listener",
                                              "package_units", "planted", "ssh", "firewall"]
    assert state.checks[4].detail == "masked: ssh.service?; not running"  # printable ASCII
    assert state.exempt_units == ("sm-runtime.service",)
    failing = nodestate.from_status(status_report(firewall_holds=False), 1, [])
    assert not failing.ready
    assert failing.failing() == ["firewall: ufw is inactive?(ufw enable)"]


def test_a_long_detail_is_cut_to_what_the_evidence_carries() -> None:
    report = status_report()
    report["guarantees"][0]["detail"] = "x" * 1000
    detail = nodestate.from_status(report, 1, []).checks[4].detail
    assert len(detail) == nodestate.DETAIL_LIMIT and detail.endswith("...")


def test_measure_reads_status_even_when_it_exits_1() -> None:
    """status exits 1 when a guarantee fails: its report is the state all the same."""
    report = json.dumps(status_report(firewall_holds=False))
    printer = [sys.executable, "-c", f"import sys; print({report!r}); sys.exit(1)"]
    state = nodestate.measure([], lambda: nodestate.status_report(printer),
                              clock=lambda: 1_700_000_000.5)
    assert state.checked == 1_700_000_000 and not state.ready
    assert state.failing() == ["firewall: ufw is inactive?(ufw enable)"]


def test_a_status_that_cannot_be_read_is_a_failing_check(tmp_path) -> None:
    cases = {
        "not json": [sys.executable, "-c", "print('Traceback: boom')"],
        "missing": [str(tmp_path / "no-such-command")],
        "hangs": [sys.executable, "-c", "import time; time.sleep(30)"],
        "not a report": [sys.executable, "-c", "print('[1, 2]')"],
    }
    for what, command in cases.items():
        state = nodestate.measure(["x.service"], lambda: nodestate.status_report(command, 1.0),
                                  clock=lambda: 5.0)
        assert not state.ready and not state.installed, what
        assert [c.name for c in state.checks] == ["status"], what
        assert state.checks[0].detail.startswith(("status could not be read",
                                                  "status did not answer within 1 s")), what
        assert state.exempt_units == ("x.service",)


def test_fresh_serves_a_recent_state_and_measures_an_old_one_again() -> None:
    now = [1000.0]
    measured: List[int] = []

    def measure() -> NodeState:
        measured.append(int(now[0]))
        return NodeState(int(now[0]), True, "0.1.0", (StateCheck("ssh", True, "masked"),), ())

    fresh = nodestate.Fresh(measure, refresh=30, longest=90, clock=lambda: now[0],
                            monotonic=lambda: now[0])
    background: List[NodeState] = []
    # Here the background's measurement runs at once, to see what the caller was served.
    fresh.in_background = lambda: background.append(fresh._measure())  # type: ignore
    assert fresh().checked == 1000 and fresh().checked == 1000  # none yet: measured first
    now[0] = 1029.0
    assert fresh().checked == 1000 and measured == [1000] and not background
    now[0] = 1089.0  # old enough to refresh: served as it is, measured again meanwhile
    assert fresh().checked == 1000 and [s.checked for s in background] == [1089]
    assert fresh().checked == 1089
    now[0] = 1179.0  # older than the longest: never served, measured first
    assert fresh().checked == 1179
    now[0] = 900.0  # the clock went back: a state from "the future" is measured again
    assert fresh().checked == 900
    assert measured == [1000, 1089, 1179, 900]


def test_a_wall_clock_set_back_does_not_keep_a_state_young() -> None:
    """The operator owns the uplink and NTP: the wall clock stepped back by a minute now and
    then would keep a measurement looking recent; the monotonic clock does not step."""
    wall, mono = [1000.0], [50.0]
    fresh = nodestate.Fresh(lambda: NodeState(int(wall[0]), True, "0.1.0",
                                              (StateCheck("ssh", True, "masked"),), ()),
                            refresh=30, longest=90, clock=lambda: wall[0],
                            monotonic=lambda: mono[0])
    assert fresh().checked == 1000
    wall[0], mono[0] = 1010.0, 150.0  # 100 s went by; the wall clock says 10
    assert fresh().checked == 1010


def test_a_state_the_evidence_cannot_carry_is_a_failing_check() -> None:
    report = status_report()
    report["guarantees"][0]["name"] = "Not A Name"
    printer = [sys.executable, "-c", f"print({json.dumps(report)!r})"]
    state = nodestate.measure([f"unit{n}.service" for n in range(3)],
                              lambda: nodestate.status_report(printer))
    assert not state.ready and state.checks[0].name == "status"
    assert state.checks[0].detail.startswith("the state cannot be signed: check name")


def test_a_measurement_in_the_background_is_served_next() -> None:
    states = iter([NodeState(7, True, "0.1.0", (StateCheck("ssh", True, "masked"),), ())])
    fresh = nodestate.Fresh(lambda: next(states), clock=lambda: 10.0)
    fresh.in_background().join(5)
    assert fresh().checked == 7  # not measured again: next(states) would raise


def test_the_checks_a_verifier_requires_are_every_line_of_status() -> None:
    """STATUS_CHECKS (the verifier's default) is what cmd_status reports, in its order."""
    from statemesh import guarantees
    from statemesh.config import NodeConfig
    lines = ["installation", "tamper_listener", "package_units", "planted"]
    names = lines + [guarantee.name for guarantee in guarantees.ordered(NodeConfig())]
    assert list(nodestate.STATUS_CHECKS) == names
    assert [line[0] for line in STATUS_LINES] == names  # the tests' and benchmarks' node
