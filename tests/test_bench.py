"""Each host benchmark runs end to end, at a size that proves the wiring, not the figures:
bench.watchdog lost its imports in a tree reshuffle and nothing noticed until it was run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parent.parent

SMALL_RUNS = [
    pytest.param("watchdog", ["--n", "3", "--idle-seconds", "0.2", "--baseline-n", "1"],
                 "watchdog p50_ms=", id="watchdog"),
    # Opens TLS connections: not on jammy's PyPI libraries (see tests/test_atls.py).
    pytest.param("atls", ["--n", "2"], "atls handshake_ms=", marks=pytest.mark.system_libssl,
                 id="atls"),
    pytest.param("fuzz", ["--n", "20"], "fuzz mutated=20 ", id="fuzz"),
]


@pytest.mark.parametrize("name, arguments, summary", SMALL_RUNS)
def test_a_host_benchmark_runs_and_prints_its_summary(name: str, arguments: List[str],
                                                      summary: str) -> None:
    done = subprocess.run([sys.executable, "-m", f"bench.{name}", *arguments], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith(summary), last
    if name == "watchdog":  # the terminal filter's line: every open from a refused cgroup failed
        deny = next(line for line in done.stdout.splitlines() if line.startswith("watchdog-deny "))
        assert " denied=3 leaked=0 " in deny, deny


def test_every_host_benchmark_is_run_here() -> None:
    from bench.__main__ import HOST_BENCHMARKS
    assert sorted(HOST_BENCHMARKS) == sorted(run.id for run in SMALL_RUNS)
