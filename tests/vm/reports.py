"""Reading `statemesh-node status --json` reports in the VM tests."""

from __future__ import annotations


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
