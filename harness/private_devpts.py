"""Run a Python function inside a private mount and PID namespace with its own devpts instance.

Host tests of the watchdog must never see, let alone touch, a terminal of this host. The
function runs in `unshare --mount --propagation private --pid --fork --mount-proc`:
nothing mounted there propagates back, and its /proc shows the scenario's processes only,
so a watchdog that ends every pty of every devpts instance it can find ends none of the
host's. A new devpts instance is mounted on a temporary directory and bound over /dev/pts
and /dev/ptmx: every pty opened inside (os.openpty included) belongs to that instance only.
The watchdog under test is pointed at it.

Usage: run_scenario("harness.watchdog_scenarios:name", {"arg": 1}) -> the function's result
(JSON), given the keyword arguments plus `devpts`, the private mount's path.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

ROOT = Path(__file__).resolve().parent.parent
RESULT_MARK = "scenario-result: "
# A directory the caller made and removes; inside, the scenario's tmpfs is mounted on it.
SCRATCH_ENV = "SM_SCENARIO_SCRATCH"


class ScenarioError(RuntimeError):
    """The scenario failed inside the namespace; the message carries its output."""


def run_scenario(target: str, kwargs: Optional[Dict[str, Any]] = None, timeout: float = 120) -> Any:
    """Run module:function in a private devpts namespace and return what it returned."""
    argv = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc",
            "/usr/bin/python3", "-m", "harness.private_devpts", target, json.dumps(kwargs or {})]
    with tempfile.TemporaryDirectory(prefix="sm-scenario-") as scratch:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
               "PYTHONPATH": str(ROOT), "SM_OUTER_MNT_NS": os.readlink("/proc/self/ns/mnt"),
               SCRATCH_ENV: scratch}
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env=env, stdin=subprocess.DEVNULL, check=False)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARK) and done.returncode == 0:
            return json.loads(line[len(RESULT_MARK):])
    raise ScenarioError(f"{target} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}")


def _mount(*argv: str) -> None:
    subprocess.run(["mount", *argv], check=True, stdin=subprocess.DEVNULL)


def _enter_private_devpts() -> str:
    """Mount a new devpts instance and make it this namespace's /dev/pts and /dev/ptmx."""
    if os.readlink("/proc/self/ns/mnt") == os.environ.get("SM_OUTER_MNT_NS", os.readlink("/proc/self/ns/mnt")):
        raise ScenarioError("refusing to mount: not inside a private mount namespace")
    # The scenario's temporary files on a tmpfs of the namespace's own: they go with it.
    _mount("-t", "tmpfs", "-o", "mode=0700", "sm-scratch", os.environ[SCRATCH_ENV])
    tempfile.tempdir = os.environ[SCRATCH_ENV]
    devpts = tempfile.mkdtemp(prefix="sm-devpts-")
    _mount("-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=0620", "devpts", devpts)
    _mount("--bind", f"{devpts}/ptmx", "/dev/ptmx")
    _mount("--bind", devpts, "/dev/pts")
    return devpts


def main() -> None:
    target, kwargs = sys.argv[1], json.loads(sys.argv[2])
    devpts = _enter_private_devpts()
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(devpts=devpts, **kwargs)
    print(RESULT_MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
