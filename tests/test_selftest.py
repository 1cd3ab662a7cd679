"""selftest must be able to say "open": a probe that can only pass proves nothing."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from statemesh import grace, guarantees, selftest
from statemesh.config import NodeConfig
from statemesh.guarantees import storage, watchdog
from statemesh.guarantees.base import Probe, Step, Way


def test_a_spared_installing_session_is_an_open_way_in(tmp_path) -> None:
    record = tmp_path / "install-grace.json"
    guarantee = watchdog.WatchdogGuarantee(NodeConfig(), grace_path=record)
    assert guarantee.probe_grace().blocked
    grace.record_installer(os.getpid(), record)
    probe = guarantee.probe_grace()
    assert not probe.blocked and f"of pid {os.getpid()} " in probe.detail
    grace.end_after(0, record)
    assert guarantee.probe_grace().blocked


def test_the_unshared_and_the_moved_login_probes_say_open_when_nothing_kills(tmp_path) -> None:
    # No watchdog runs here: both holders live, and the probes say so. The devpts is mounted
    # in a mount namespace of the probe's own; the cgroup is a plain file of the test's.
    unshared = watchdog.probe_unshared_pty(deadline=3)
    assert not unshared.blocked and "stayed open" in unshared.detail, unshared.detail
    cgroup = tmp_path / "system.slice" / watchdog.ALWAYS_EXEMPT
    guarantee = watchdog.WatchdogGuarantee(NodeConfig(), cgroup_root=tmp_path)
    assert "cannot try" in guarantee.probe_moved_login(deadline=3).detail
    cgroup.mkdir(parents=True)
    (cgroup / "cgroup.procs").write_text("")
    moved = guarantee.probe_moved_login(deadline=3)
    assert not moved.blocked and "stayed open" in moved.detail, moved.detail
    assert int((cgroup / "cgroup.procs").read_text()) > 0  # it did write itself in


def test_a_child_probe_is_blocked_only_by_sigkill() -> None:
    def child(code: str) -> list:
        return [sys.executable, "-c", f"import os, signal, sys; print('a pty', flush=True); {code}"]
    assert watchdog._probe_child("p", child("os.kill(os.getpid(), signal.SIGKILL)"), 5).blocked
    failed = watchdog._probe_child("p", child("sys.exit(3)"), 5)
    assert not failed.blocked and failed.detail.startswith("could not try (exit 3)")


def test_pty_probe_reports_open_when_nothing_kills_the_holder() -> None:
    # No watchdog runs in the test: the holder survives, and the probe must say so.
    probe = watchdog.probe_pty(deadline=0.3)
    assert probe.name == "pty"
    assert not probe.blocked
    assert "stayed open" in probe.detail


def test_pty_probe_reports_blocked_when_the_holder_is_killed(monkeypatch) -> None:
    real_wait = watchdog._wait_child

    def kill_then_wait(pid: int, timeout: float) -> tuple:
        os.kill(pid, signal.SIGKILL)  # stands in for the watchdog
        return real_wait(pid, timeout)

    monkeypatch.setattr(watchdog, "_wait_child", kill_then_wait)
    probe = watchdog.probe_pty(deadline=5)
    assert probe.blocked
    assert "killed after" in probe.detail


def test_key_search_finds_a_key_across_chunk_boundaries(tmp_path) -> None:
    key = bytes(range(64))
    path = tmp_path / "state"
    path.write_bytes(b"\0" * ((8 << 20) - 10) + key + b"\0" * 100)
    assert storage._contains(path, key, path.stat().st_size)
    assert not storage._contains(path, key, 8 << 20)
    assert not storage._contains(path, bytes(reversed(key)), path.stat().st_size)


def test_table_key_reads_a_hex_key_and_refuses_to_guess() -> None:
    hex_key = "ab" * 64
    assert storage.table_key(
        f"0 2048 crypt aes-xts-plain64 {hex_key} 0 7:0 32768\n".encode()) == bytes.fromhex(hex_key)
    keyring = b"0 2048 crypt aes-xts-plain64 :64:logon:cryptsetup:3f1c-d0 0 7:0 32768 1 sector_size:4096\n"
    assert storage.table_key(keyring) is None
    for table in (b"0 2048 linear 7:0 0\n", b"0 2048 crypt aes-xts-plain64 - 0 7:0 32768\n"):
        with pytest.raises(ValueError):
            storage.table_key(table)


def test_run_all_tries_every_declared_way_by_step_then_in_the_guarantees_order(monkeypatch) -> None:
    tried = []

    def way(name: str, step: Step) -> Way:
        return Way(name, step, lambda: tried.append(name) or Probe(name, name != "open", "-"))

    class Declares:
        def __init__(self, *ways_in: Way) -> None:
            self._ways = ways_in

        def ways_in(self):
            return self._ways

    listed = [Declares(way("shell a", Step.SHELL)), Declares(),
              Declares(way("data", Step.DATA_AT_REST), way("open", Step.SHELL)),
              Declares(way("terminal", Step.TERMINAL))]
    monkeypatch.setattr(guarantees, "ordered", lambda config: listed)
    assert [w.name for w in selftest.ways(NodeConfig())] == ["terminal", "shell a", "open", "data"]
    assert tried == []  # declaring and ordering tries nothing
    probes = selftest.run_all(NodeConfig())
    assert tried == ["terminal", "shell a", "open", "data"]
    assert [p.blocked for p in probes] == [True, True, False, True]
