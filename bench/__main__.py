"""Run every benchmark and print each one's summary line (a ratio against its baseline).

Each benchmark is its own module, runnable alone as `python3 -m bench.NAME`; this runner
only runs them one after another (never in parallel: they measure latency) and collects
their last lines, which are the figures the README quotes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import List

HOST_BENCHMARKS = ["watchdog", "atls", "fuzz"]
VM_BENCHMARKS = ["storage"]


def run_benchmark(name: str, extra: List[str]) -> str:
    """Run one benchmark, streaming its output; return its summary (last) line."""
    argv = [sys.executable, "-m", f"bench.{name}", *extra]
    print(f"== bench.{name}", flush=True)
    result = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False)
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
        raise SystemExit(f"bench.{name} failed with status {result.returncode}")
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return lines[-1] if lines else f"{name}: no output"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench")
    parser.add_argument("--deb", type=Path, help="built .deb: also run the VM benchmarks")
    args = parser.parse_args()
    summaries = [run_benchmark(name, []) for name in HOST_BENCHMARKS]
    if args.deb:
        summaries += [run_benchmark(name, ["--deb", str(args.deb)]) for name in VM_BENCHMARKS]
    print("== summary")
    print("\n".join(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
