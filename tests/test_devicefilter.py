"""The terminal filter (statemesh.watchdog.devicefilter) run by this host's kernel.

Attached to a cgroup made for the scenario (harness.terminal_filter_scenarios), never to
this machine's root: only the scenario's own children are refused anything.
"""

from __future__ import annotations

from typing import Any, Dict

import pytest

from harness.private_devpts import run_scenario

EPERM = "errno 1"


@pytest.fixture(scope="module")
def refusal() -> Dict[str, Any]:
    return run_scenario("harness.terminal_filter_scenarios:refusal")


def test_a_refused_cgroup_cannot_open_any_terminal_and_may_only_write_the_console(refusal) -> None:
    opens = refusal["refused_opens"]
    assert opens["/dev/ptmx rw"] == EPERM and opens["/dev/tty rw"] == EPERM
    assert opens["/dev/console rw"] == EPERM and opens["/dev/console w"] == "ok"
    assert opens["/dev/null rw"] == "ok"
    assert refusal["refused_openpty"] == EPERM


def test_the_decision_is_by_device_numbers_wherever_the_node_was_made(refusal) -> None:
    said = dict(item.split(" ", 1) for item in refusal["refused_made_nodes"].split("; "))
    for terminal in ("tty5", "ttyS0", "vcs1", "pts-slave", "pts-slave-last-major", "hvc0", "ttyUSB0"):
        assert said[terminal] == EPERM, (terminal, said)
    # mknod itself is left alone; other devices get their driver's own answer
    assert said["null"] == "ok"
    assert said["ttyprintk"] != EPERM and said["after-pty-majors"] != EPERM


def test_an_allowed_cgroup_opens_a_pty_until_the_map_no_longer_holds_it(refusal) -> None:
    assert refusal["allowed_openpty"] == "ok"
    assert refusal["state"] == {"attached": True, "detail": "attached",
                                "allowed_is_the_allowed_cgroup": True}
    assert refusal["allowed_openpty_after_allow_nobody"] == EPERM


def test_a_second_start_keeps_the_attached_program_and_an_upgrade_replaces_it(refusal) -> None:
    assert refusal["first"]["replaced"] and len(refusal["first"]["attached"]) == 1
    assert refusal["again"] == {"replaced": False, "same": True,
                                "attached": refusal["first"]["attached"]}
    changed = refusal["changed"]
    assert changed["replaced"] and changed["new"] and len(changed["attached"]) == 1
    assert changed["attached"] != refusal["first"]["attached"]
    assert "not this package's program" in refusal["state_of_another_program"]


def test_remove_detaches_it_and_forgets_the_pins(refusal) -> None:
    assert refusal["removed"] is True
    after = refusal["after_remove"]
    assert after["attached"] == [] and after["refused_openpty"] == "ok"
    assert not [name for name in after["pins"] if name.startswith("statemesh")]


@pytest.fixture(scope="module")
def keeping() -> Dict[str, Any]:
    return run_scenario("harness.terminal_filter_scenarios:keeping")


def test_the_watchdog_lifts_it_for_a_grace_and_attaches_it_after(keeping) -> None:
    assert keeping["during_grace"] == "ok"  # apt opens ptys of its own while it installs
    assert keeping["after_grace"] == EPERM
    assert keeping["lifted"] == "ok"
    assert [line["state"] for line in keeping["log"]] == ["attached", "attached again", "lifted"]


def test_an_exempt_unit_is_allowed_the_moment_its_cgroup_is_made(keeping) -> None:
    assert keeping["exempt_unit_started"] == "ok"
    assert keeping["log"][1]["allowed"][-1] == "/work.slice/sm-late.service"


def test_a_filter_root_detached_is_attached_again_at_the_next_round(keeping) -> None:
    assert keeping["detached"] == "ok" and keeping["next_round"] == EPERM
