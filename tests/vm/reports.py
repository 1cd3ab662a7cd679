"""Reading `statemesh-node status --json` reports in the VM tests."""

from __future__ import annotations

import json

from harness.vm.driver import Guest

# One guarantee's line of status, from its own check (what status runs for it), for a test
# that asks about that guarantee alone: the whole of status costs several seconds more in a
# guest under emulation. Started as /usr/bin/statemesh-node starts (isolated, no site).
ONE_GUARANTEE = b"""#!/usr/bin/python3 -IS
import json, sys
sys.path.append("/usr/lib/python3/dist-packages")  # as /usr/bin/statemesh-node has it
sys.modules["gi"] = None
from statemesh import config, guarantees

found = [g for g in guarantees.ordered(config.load()) if g.name == sys.argv[1]]
print(json.dumps(found[0].check().as_dict()))
"""


def guarantee_finding(guest: Guest, name: str) -> dict:
    """The line status would print for guarantee `name`, as JSON."""
    guest.put("/root/one-guarantee.py", ONE_GUARANTEE, mode=0o755)
    return json.loads(guest.run(f"/root/one-guarantee.py {name}").stdout)


def failing_lines(report: dict) -> dict:
    """The lines of a status report that do not hold, each with its whole detail (a
    report's repr is cut short in pytest's message before it reaches them)."""
    lines = [report.get(name) for name in ("installation", "tamper_listener", "package_units",
                                           "planted")] + report.get("guarantees", [])
    return {line.get("name"): line.get("detail") for line in lines
            if isinstance(line, dict) and not line.get("holds")}


def shown(report: dict) -> str:
    """A status report as the operator's `statemesh-node status` prints it, for the test's
    log: read from the JSON the test already has, since each status costs seconds in a
    guest under emulation."""
    lines = [report.get(name) for name in ("installation", "tamper_listener", "package_units",
                                           "planted")] + report.get("guarantees", [])
    return "\n".join(f"{'ok  ' if line.get('holds') else 'FAIL'} {line.get('name')}  "
                     f"{line.get('detail')}" for line in lines if isinstance(line, dict))
