"""The terminal watchdog on a real guest: real ptys, ttys, systemd units and a real restart.

What only a real system shows: `script`, `systemd-run --pty`, an agetty started by hand,
`machinectl shell` (where systemd-container is installed) and a Python openpty holder are
all ended; a process without a terminal is not, nor one writing to the console, nor any
service systemd starts; the unit refuses a manual stop, comes back after SIGKILL, runs
sandboxed, and a reload re-reads node.conf (exemptions).
"""

from __future__ import annotations

import json
import re
from typing import Dict, List

import pytest

from harness.vm.driver import Guest, quote
from statemesh.ownunits import PACKAGE_UNITS

UNIT = "statemesh-watchdog.service"
HOLDER = "import os, time; os.openpty(); time.sleep({})"


def start_watchdog(guest: Guest) -> int:
    """The watchdog running (the installer starts it, the test makes sure) -> its pid."""
    started = guest.run(f"systemctl is-active --quiet {UNIT} || systemctl enable --now {UNIT}",
                        check=False)
    assert started.returncode == 0, guest.run(
        f"systemctl status --no-pager {UNIT}; journalctl -q --no-pager -u {UNIT}", check=False).stdout
    return main_pid(guest)


def main_pid(guest: Guest) -> int:
    return int(guest.run(f"systemctl show -P MainPID {UNIT}").stdout)


def background(guest: Guest, command: str) -> int:
    """Start a command in the background, outside any terminal; its pid."""
    return int(guest.run(f"{command} </dev/null >/dev/null 2>&1 & echo $!").stdout)


def ended(guest: Guest, pid: int, seconds: float = 20) -> bool:
    """Whether process `pid` is gone (or a zombie) within `seconds`."""
    script = (f"end=$(( $(date +%s) + {int(seconds)} )); while [ $(date +%s) -le $end ]; do "
              f"s=$(sed -n 's/^State:[[:space:]]*\\(.\\).*/\\1/p' /proc/{pid}/status 2>/dev/null); "
              f"if [ -z \"$s\" ] || [ \"$s\" = Z ]; then exit 0; fi; sleep 0.1; done; exit 1")
    return guest.run(script, check=False, timeout=seconds + 30).returncode == 0


def running(guest: Guest, pattern: str) -> List[int]:
    # "[s]leep 1" matches "sleep 1" but not the shell running this pgrep
    found = guest.run(f"pgrep -f {quote('[' + pattern[0] + ']' + pattern[1:])} || true").stdout.split()
    return [int(pid) for pid in found]


def failed_service_starts(guest: Guest, starts: int) -> int:
    """How many of `starts` short services fail. On Debian 13 each is spawned by a
    systemd-executor that writes to /dev/console and reuses that fd's number for files it
    reads: a watchdog misreading the fd kills the service (4 % of starts, before the fix)."""
    loop = f"fails=0; for i in $(seq {starts}); do systemd-run --wait -q true || fails=$((fails+1)); done; echo $fails"
    return int(guest.run(loop, timeout=starts * 5).stdout)


def kill_log(guest: Guest) -> List[Dict]:
    lines = guest.run(f"journalctl -q -u {UNIT} -o cat").stdout.splitlines()
    return [json.loads(line) for line in lines if line.startswith('{"event": "kill"')]


@pytest.mark.every_release
@pytest.mark.cost(85)
def test_every_kind_of_terminal_is_ended_and_a_plain_process_lives(installed_guest: Guest) -> None:
    guest = installed_guest
    watchdog = start_watchdog(guest)
    guest.run("systemd-run --unit=sm-workload sleep 1605")
    plain = background(guest, "sleep 1606")
    # writes to the console, as systemd and boot scripts do: no input, so no session
    console_writer = background(guest, "sh -c 'exec 3>/dev/console; exec sleep 1607'")

    python = background(guest, f"python3 -c {quote(HOLDER.format(1601))}")
    script = background(guest, "script -qfc 'sleep 1602' /dev/null")
    pty_client = background(guest, "systemd-run --pty --unit=sm-pty sleep 1603")
    agetty = background(guest, "agetty --noclear tty3 linux")
    has_machinectl = guest.run("command -v machinectl", check=False).returncode == 0
    shell = background(guest, "machinectl shell .host /bin/sleep 1604") if has_machinectl else None
    # a devpts of its own that /dev/pts never shows: /dev/ptmx opens its ptys from then on
    inner = ("mount -t devpts -o newinstance devpts /dev/pts && "
             f"exec python3 -c {quote(HOLDER.format(1608))}")
    unshared = background(guest, f"unshare -m sh -c {quote(inner)}")

    assert ended(guest, python), "python openpty holder"
    assert ended(guest, script), "script"
    assert ended(guest, pty_client), "systemd-run --pty client"
    assert ended(guest, agetty), "agetty on tty3"
    if shell is not None:
        assert ended(guest, shell), "machinectl shell"
    assert ended(guest, unshared), "a pty of a devpts instance that unshare -m mounted"
    for duration in (1601, 1602, 1603, 1604):
        assert running(guest, f"sleep {duration}") == [], f"the shell side of sleep {duration}"
    assert guest.run("systemctl is-active sm-pty", check=False).stdout.strip() != "active"

    assert guest.run("systemctl is-active sm-workload").stdout.strip() == "active"
    assert running(guest, "sleep 1606") == [plain]
    assert running(guest, "sleep 1607") == [console_writer]
    assert failed_service_starts(guest, 100) == 0
    assert main_pid(guest) == watchdog

    logged = {line["pid"]: line for line in kill_log(guest)}
    assert python in logged and logged[python]["terminal"].startswith("/dev/pts/")
    assert logged[python]["user"] == "root" and "os.openpty" in logged[python]["command"]
    assert logged[python]["latency_ms"] >= 0
    assert agetty in logged and logged[agetty]["terminal"] == "/dev/tty3"
    # Named by its node when the instance's nodes were listed first, else by its numbers (the
    # sweep for any pty found it first): either way a pty of that instance, never the host's.
    assert unshared in logged, logged
    assert re.search(r"/dev/pts/\d+$|^pts/\d+ of devpts \d+:\d+$",
                     logged[unshared]["terminal"]), logged[unshared]
    assert "/dev/console" not in {line["terminal"] for line in logged.values()}


@pytest.mark.cost(15)
def test_watchdog_refuses_stop_comes_back_after_sigkill_and_is_sandboxed(installed_guest: Guest,
                                                                        measured) -> None:
    """A stop is refused, a SIGKILL is survived, the process is sandboxed. Every unit of
    the package has its exposure measured (systemd-analyze security: 0 best, 10 worst);
    the long-running and network-facing ones, the watchdog, the vTPM and the aTLS endpoint,
    are held to 2.0 ("OK"; measured 1.8, 0.4 and 1.5 with Debian 12's systemd-analyze: a
    later systemd that weighs more settings may need the bound, or the unit, revisited)."""
    guest = installed_guest
    first = start_watchdog(guest)

    refused = guest.run(f"systemctl stop {UNIT}", check=False)
    assert refused.returncode != 0 and "refused" in refused.stderr
    assert main_pid(guest) == first

    guest.run(f"kill -9 {first}")
    guest.wait_for(f"systemctl is-active --quiet {UNIT} && pid=$(systemctl show -P MainPID {UNIT}) "
                   f"&& [ \"$pid\" != 0 ] && [ \"$pid\" != {first} ]",
                   f"{UNIT} to come back after SIGKILL", 60)
    holder = background(guest, f"python3 -c {quote(HOLDER.format(1611))}")
    assert ended(guest, holder), "a pty opened after the restart"

    status = guest.run(f"grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/{main_pid(guest)}/status").stdout
    assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status
    assert int(status.split("CapEff:")[1].split()[0], 16) == (1 << 5) | (1 << 19)  # KILL, SYS_PTRACE
    scores = {unit: exposure(guest, unit) for unit in PACKAGE_UNITS if unit.endswith(".service")}
    for unit, score in scores.items():
        measured(f"exposure of {unit}", f"{score:.1f}")
    assert all(scores[unit] <= 2.0 for unit in (UNIT, "statemesh-vtpm.service",
                                                "statemesh-atls.service")), scores


def exposure(guest: Guest, unit: str) -> float:
    """systemd-analyze security's overall exposure level of `unit`."""
    said = guest.run(f"systemd-analyze security --no-pager {unit}").stdout
    return float(said.rsplit("Overall exposure level for", 1)[1].split(":")[1].split()[0])


@pytest.mark.cost(10)
def test_exempt_unit_keeps_its_pty_after_a_reload(installed_guest: Guest) -> None:
    guest = installed_guest
    first = start_watchdog(guest)
    invocation = guest.run(f"systemctl show -P InvocationID {UNIT}").stdout.strip()
    guest.put("/etc/statemesh/node.conf", b"Watchdog-Exempt-Units: sm-runtime.service\n")
    guest.run(f"systemctl reload {UNIT}")
    # The old process names its successor once it is ready.
    guest.wait_for(f"[ \"$(systemctl show -P MainPID {UNIT})\" != {first} ]",
                   "the reload's hand-over to a successor", 60)
    ready = json.loads(guest.run(f"journalctl -q -u {UNIT} -o cat | grep '\"ready\"' | tail -1").stdout)
    assert ready["exempt_units"] == ["sm-runtime.service"] and ready["pid"] == main_pid(guest)
    # handed over within the same run of the unit: no stop, no gap in supervision
    assert guest.run(f"systemctl show -P InvocationID {UNIT}").stdout.strip() == invocation
    assert ended(guest, first)

    guest.run(f"systemd-run --unit=sm-runtime python3 -c {quote(HOLDER.format(1621))}")
    outsider = background(guest, f"python3 -c {quote(HOLDER.format(1622))}")
    # events are handled in order: the outsider's pty was handled after the exempt one's
    assert ended(guest, outsider)
    assert guest.run("systemctl is-active sm-runtime").stdout.strip() == "active"
    assert len(running(guest, "sleep.1621")) == 1

    # A login's process written into the exempt unit's cgroup is still a login's: ended. Its
    # loginuid cannot be taken off again (the installation made loginuids immutable).
    procs = "/sys/fs/cgroup/system.slice/sm-runtime.service/cgroup.procs"
    login = (f"echo 0 > /proc/self/loginuid && echo $$ > {procs} && "
             f"exec python3 -c {quote(HOLDER.format(1623))}")
    moved = background(guest, f"sh -c {quote(login)}")
    assert ended(guest, moved), "a login's process moved into the exempt unit"
    assert len(running(guest, "sleep.1621")) == 1  # the unit's own pty holder lives on
    unset = guest.run("sh -c 'echo 0 > /proc/self/loginuid && echo 4294967295 > "
                      "/proc/self/loginuid'", check=False)
    assert unset.returncode != 0, "a loginuid was taken off again"
