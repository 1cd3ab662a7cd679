"""Benchmark of the terminal watchdog against the seed's 1 s polling, in a private devpts.

    /usr/bin/python3 -m bench.watchdog [--n 1000] [--idle-seconds 60] [--baseline-n 20]

Runs inside a private mount namespace with its own devpts instance (harness.private_devpts):
no terminal of this host is involved. A holder process opens one pty (os.openpty) and
keeps it; the latency is from just before openpty to the moment the bench sees the holder
dead, N times in a row. Then the watchdog's CPU time over an idle period. Then the same
latency for a baseline that polls the devpts every second and kills what it finds (what
`watch -n1 'ls -l /dev/pts'` plus a kill would do), fewer samples since each costs ~0.5 s.
Before it, the first line's figures (the terminal filter, statemesh.watchdog.devicefilter,
attached to a cgroup made for the bench, never this machine's root): N opens of /dev/ptmx
from a cgroup it refuses (each must fail: leaked counts those that did not), and the same
from a cgroup it allows against one with no filter at all, the baseline, in the same run
(one process taking turns in the three cgroups).
The last line is the summary that the project's reports quote.
"""

from __future__ import annotations

import argparse
import math
import os
import select
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import psutil

from harness import terminal_filter_scenarios, watchdog_scenarios as scenarios
from harness.private_devpts import run_scenario

UNIT_FILE = Path(__file__).resolve().parent.parent / "systemd" / "statemesh-watchdog.service"

# The baseline: poll once a second, SIGKILL every holder of every pty that exists.
BASELINE = """
import os, signal, sys, time
from statemesh.watchdog import terminals
devpts = sys.argv[1]
print("ready", flush=True)
while True:
    for terminal, process in terminals.holders(terminals.ptys(devpts)):
        if process.pid != os.getpid():
            os.kill(process.pid, signal.SIGKILL)
    time.sleep(1)
"""


def _timed_holder(report: int) -> None:
    os.write(report, struct.pack("d", time.monotonic()))
    os.openpty()
    scenarios.sleep_forever()


def latencies(count: int) -> List[float]:
    """Milliseconds from openpty to the holder's death, `count` holders one after another."""
    samples = []
    read_end, write_end = os.pipe()
    for _ in range(count):
        holder = scenarios.fork_child(lambda: _timed_holder(write_end))
        started = struct.unpack("d", os.read(read_end, 8))[0]
        pidfd = os.pidfd_open(holder)
        ready, _, _ = select.select([pidfd], [], [], scenarios.WAIT_SECONDS)
        ended = time.monotonic()
        os.close(pidfd)
        if not ready:
            os.kill(holder, 9)
            raise RuntimeError(f"holder {holder} was not killed within {scenarios.WAIT_SECONDS} s")
        os.waitpid(holder, 0)
        samples.append((ended - started) * 1000)
    return samples


def percentile(samples: List[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def unit_nice() -> int:
    """The Nice= of statemesh-watchdog.service: the watchdog is measured as it is deployed."""
    for line in UNIT_FILE.read_text().splitlines():
        if line.startswith("Nice="):
            return int(line.split("=", 1)[1])
    return 0


def measure(devpts: str, n: int, idle_seconds: float, baseline_n: int) -> Dict[str, Any]:
    """Runs inside the private devpts namespace, at the unit's Nice= like everything it starts:
    the watchdog as deployed, the holders and this measuring process no less promptly
    scheduled than it (on a loaded machine their wake-ups would otherwise dominate)."""
    os.nice(unit_nice())
    with scenarios.watchdog(devpts) as state:
        pid = state["process"].pid
        time.sleep(1)  # past start-up
        before = cpu_seconds(pid)
        time.sleep(idle_seconds)
        idle_cpu_pct = (cpu_seconds(pid) - before) / idle_seconds * 100
        watchdog_ms = latencies(n)
    baseline = subprocess.Popen(["/usr/bin/python3", "-c", BASELINE, devpts],
                                stdout=subprocess.PIPE, text=True)
    try:
        baseline.stdout.readline()
        baseline_ms = latencies(baseline_n)
    finally:
        baseline.kill()
        baseline.wait()
    return {"watchdog_ms": watchdog_ms, "idle_cpu_pct": idle_cpu_pct, "baseline_ms": baseline_ms,
            "kills_logged": sum(1 for line in state["log"] if line["event"] == "kill"),
            "opens": terminal_filter_scenarios.open_timings(n)}


def deny_line(opens: Dict[str, List[List[Any]]]) -> str:
    """The filter's line: refused opens' latency, and what an allowed open costs more than
    one with no filter (p99 against p99, same run)."""
    def microseconds(samples: List[List[Any]]) -> List[float]:
        return [nanoseconds / 1000 for nanoseconds, _opened in samples]
    refused = opens["refused"]
    denied = sum(1 for _ns, opened in refused if not opened)
    refused_us = microseconds(refused)
    allowed, baseline = microseconds(opens["allowed"]), microseconds(opens["baseline"])
    allowed_p99, baseline_p99 = percentile(allowed, 0.99), percentile(baseline, 0.99)
    p50_overhead = percentile(allowed, 0.5) - percentile(baseline, 0.5)
    return (f"watchdog-deny opens={len(refused)} denied={denied} leaked={len(refused) - denied} "
            f"p50_us={percentile(refused_us, 0.5):.1f} p99_us={percentile(refused_us, 0.99):.1f} "
            f"allowed_overhead_us={allowed_p99 - baseline_p99:.1f} "
            f"allowed_overhead_p50_us={p50_overhead:.1f} "
            f"allowed_p99_us={allowed_p99:.1f} baseline_p99_us={baseline_p99:.1f}")


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.watchdog", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="ptys opened against the watchdog")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle CPU period")
    parser.add_argument("--baseline-n", type=int, default=20, help="ptys opened against the baseline")
    args = parser.parse_args(argv)
    if args.n < 1 or args.baseline_n < 1 or args.idle_seconds <= 0:
        parser.error("--n and --baseline-n must be >= 1, --idle-seconds > 0")
    timeout = 60 + args.idle_seconds + args.n * 0.5 + args.baseline_n * 2
    result = run_scenario("bench.watchdog:measure", {"n": args.n, "idle_seconds": args.idle_seconds,
                                                     "baseline_n": args.baseline_n}, timeout=timeout)
    ms = result["watchdog_ms"]
    p50, p99, worst = percentile(ms, 0.50), percentile(ms, 0.99), max(ms)
    baseline_p99 = percentile(result["baseline_ms"], 0.99)
    print(f"watchdog: {len(ms)} ptys, {result['kills_logged']} kills logged; "
          f"mean {sum(ms) / len(ms):.2f} ms")
    print(f"baseline (1 s polling): {len(result['baseline_ms'])} ptys; "
          f"p50 {percentile(result['baseline_ms'], 0.5):.1f} ms")
    print(deny_line(result["opens"]))
    print(f"watchdog p50_ms={p50:.2f} p99_ms={p99:.2f} max_ms={worst:.2f} "
          f"idle_cpu_pct={result['idle_cpu_pct']:.3f} baseline_p99_ms={baseline_p99:.1f} "
          f"ratio={baseline_p99 / p99:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
