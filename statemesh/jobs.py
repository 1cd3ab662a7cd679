"""Jobs planted to run later, found before installing: cron, at and systemd timers.

A job the operator schedules before installing runs as root on the locked-down node, with
no terminal and no login: a way back in that the lockdown never sees. Preflight refuses a
machine with any crontab or at job (a node runs no user's jobs), with cron's system tables
not as their packages installed them, or with a systemd timer no package installed
(transient ones included, `systemd-run --on-calendar`), naming each and how to remove it.

Only reads files and dpkg's database (statemesh.planted.packaged_files).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Dict, List, Sequence

from statemesh.planted import as_packaged, named

CRONTABS = Path("/var/spool/cron/crontabs")
AT_JOBS = Path("/var/spool/cron/atjobs")
CRON_TABLE_GLOBS = ("/etc/crontab", "/etc/anacrontab", "/etc/cron.d/*",
                    "/etc/cron.hourly/*", "/etc/cron.daily/*", "/etc/cron.weekly/*",
                    "/etc/cron.monthly/*", "/etc/cron.yearly/*")
# Where a timer unit can be that is not a package's: the admin's, runtime and transient.
TIMER_GLOBS = ("/etc/systemd/system/*.timer", "/usr/local/lib/systemd/system/*.timer",
               "/run/systemd/system/*.timer", "/run/systemd/transient/*.timer")
AT_SEQUENCE = ".SEQ"  # at's job counter, not a job
MASKED = "/dev/null"  # what a masked unit's file links to: it cannot run


def spool_problems(crontabs: Path = CRONTABS, at_jobs: Path = AT_JOBS) -> List[str]:
    """Any user's crontab, any pending at job."""
    problems = []
    tables = _entries(crontabs)
    if tables:
        users = [Path(path).name for path in tables]
        problems.append(f"crontabs of {named(users)} in {crontabs} (crontab -r -u USER)")
    jobs = [path for path in _entries(at_jobs) if Path(path).name != AT_SEQUENCE]
    if jobs:
        problems.append(f"at jobs pending in {at_jobs}: {named(jobs)} (atrm them)")
    return problems


def _entries(directory: Path) -> List[str]:
    try:
        return sorted(str(entry) for entry in directory.iterdir() if entry.is_file())
    except OSError:
        return []


def table_problems(packaged: Dict[str, str],
                   table_globs: Sequence[str] = CRON_TABLE_GLOBS) -> List[str]:
    """cron's system tables and run-parts scripts that are not as a package installed them."""
    changed = sorted({path for pattern in table_globs for path in glob.glob(pattern)
                      if Path(path).is_file() and not as_packaged(path, packaged)})
    if not changed:
        return []
    return [f"cron jobs not as a package installed them: {named(changed)} (remove them, or "
            "reinstall their package)"]


def timer_problems(packaged: Dict[str, str],
                   timer_globs: Sequence[str] = TIMER_GLOBS) -> List[str]:
    """systemd timers no package installed; an enabled packaged timer is a symlink to the
    package's file, and is judged by it; a masked one cannot run."""
    foreign = sorted({path for pattern in timer_globs for path in glob.glob(pattern)
                      if os.path.realpath(path) != MASKED and not as_packaged(path, packaged)})
    if not foreign:
        return []
    return [f"systemd timers no package installed: {named(foreign)} (systemctl stop and "
            "disable them, remove their files, systemctl daemon-reload)"]


def problems(packaged: Dict[str, str]) -> List[str]:
    """Every planted job preflight refuses."""
    return spool_problems() + table_problems(packaged) + timer_problems(packaged)
