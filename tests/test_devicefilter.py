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


def test_each_refusal_is_told_with_its_device_access_uid_and_cgroup(refusal) -> None:
    # the opens above, in order: /dev/ptmx, /dev/tty and the console read, each refused
    assert refusal["refusals_told"] == [["5:2", "rw", 0, "refused"], ["5:0", "rw", 0, "refused"],
                                        ["5:1", "rw", 0, "refused"]]


def test_the_decision_is_by_device_numbers_wherever_the_node_was_made(refusal) -> None:
    said = dict(item.split(" ", 1) for item in refusal["refused_made_nodes"].split("; "))
    for terminal in ("tty5", "ttyS0", "vcs1", "pts-slave", "pts-slave-300", "hvc0", "ttyUSB0"):
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


def test_the_same_code_over_roots_own_map_is_not_taken_for_the_filter(refusal) -> None:
    swap = refusal["tag_swap"]
    assert swap["opens_with_roots_program"] == "ok"  # what root gains while it lasts
    assert swap["state"] == "the attached filter reads other maps than those pinned"
    assert swap["next_round_replaced"] is True and swap["opens_after_next_round"] == EPERM


def test_a_start_after_a_kill_between_attach_and_pins_keeps_the_one_attached(refusal) -> None:
    assert refusal["interrupted"] == {"kept_the_attached_one": True, "attached": 1,
                                      "new_pins_left": []}


def test_a_second_program_of_its_name_is_named_by_status(refusal) -> None:
    assert refusal["unpinned_extra"] == "2 programs of its name are attached, not the one pinned alone"


def test_remove_detaches_it_and_forgets_the_pins(refusal) -> None:
    assert refusal["removed"] == 2  # the pinned one and an unpinned one of its name
    after = refusal["after_remove"]
    assert after["attached"] == [] and after["refused_openpty"] == "ok"
    assert not [name for name in after["pins"] if name.startswith("statemesh")]


@pytest.fixture(scope="module")
def keeping() -> Dict[str, Any]:
    return run_scenario("harness.terminal_filter_scenarios:keeping")


def test_a_grace_allows_its_package_manager_alone_and_only_while_it_runs(keeping) -> None:
    assert keeping["grace_installer"] == "ok"  # apt opens a pty for dpkg when it has a terminal
    assert keeping["grace_other"] == EPERM
    assert keeping["after_grace_installer"] == EPERM
    assert [line["state"] for line in keeping["log"]
            if line["event"] == "terminal-filter"] == ["attached", "attached again", "pinned again"]


def test_the_watchdog_journals_each_openers_cgroup_once_per_read(keeping) -> None:
    told = [line for line in keeping["log"] if line["event"] == "terminal-refused"]
    line = told[0]  # three refused openpty calls, one line
    assert (line["devices"], line["uids"], line["count"]) == (["5:2 rw"], [0], 3)
    assert line["cgroup"].endswith("/other") and line["unit"] == ""
    assert line["processes"] == []  # the opener has exited: nothing runs there now


def test_a_flood_from_many_cgroups_costs_a_bounded_number_of_lines(keeping) -> None:
    # 12 cgroups refused: 8 lines, the 4 least refused in one more (1 + i % 3 opens each)
    assert keeping["flood"]["refused_lines"] == 8
    assert keeping["flood"]["more"] == [{"count": 4, "cgroups": 4, "buffer_was_full": False,
                                         "position_moved": False}]


def test_a_consumer_position_written_by_root_is_said_and_reading_goes_on(keeping) -> None:
    assert keeping["moved"] == {"moved_said": [True], "next_told": [1]}


def test_an_exempt_unit_and_a_unit_in_an_exempt_slice_are_allowed_once_made(keeping) -> None:
    assert keeping["exempt_unit_started"] == "ok"
    assert keeping["unit_in_exempt_slice_started"] == "ok"


def test_a_filter_root_detached_is_attached_again_at_the_next_round(keeping) -> None:
    assert keeping["detached"] == "ok" and keeping["next_round"] == EPERM


def test_lost_pins_are_made_again_from_the_program_in_force(keeping) -> None:
    assert keeping["after_lost_pins"] is True
