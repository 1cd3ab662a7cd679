"""Planted jobs: crontabs, at jobs, changed cron tables and foreign timers are named; what
dpkg installed, and a masked timer, are not."""

from __future__ import annotations

import hashlib
from pathlib import Path

from statemesh import jobs


def test_any_crontab_and_any_at_job_is_named(tmp_path: Path) -> None:
    crontabs, at_jobs = tmp_path / "crontabs", tmp_path / "atjobs"
    assert jobs.spool_problems(crontabs, at_jobs) == []  # cron and at not even installed
    crontabs.mkdir()
    at_jobs.mkdir()
    (at_jobs / ".SEQ").write_text("1\n")
    assert jobs.spool_problems(crontabs, at_jobs) == []
    (crontabs / "root").write_text("@reboot /root/way-in\n")
    (at_jobs / "a00001019a2b3c").write_text("#!/bin/sh\n/root/way-in\n")
    assert jobs.spool_problems(crontabs, at_jobs) == [
        f"crontabs of root in {crontabs} (crontab -r -u USER)",
        f"at jobs pending in {at_jobs}: {at_jobs}/a00001019a2b3c (atrm them)"]


def test_cron_tables_not_as_packaged(tmp_path: Path) -> None:
    cron_d = tmp_path / "cron.d"
    cron_d.mkdir()
    shipped = b"30 3 * * 0 root test -e /run/systemd/system || e2scrub_all\n"
    (cron_d / "e2scrub_all").write_bytes(shipped)
    packaged = {str(cron_d / "e2scrub_all"): hashlib.md5(shipped).hexdigest()}
    globs = (f"{cron_d}/*",)
    assert jobs.table_problems(packaged, globs) == []
    (cron_d / "planted").write_text("* * * * * root /root/way-in\n")
    (cron_d / "e2scrub_all").write_bytes(shipped + b"* * * * * root /root/way-in\n")
    assert jobs.table_problems(packaged, globs) == [
        f"cron jobs not as a package installed them: {cron_d}/e2scrub_all, {cron_d}/planted "
        "(remove them, or reinstall their package)"]


def test_timers_no_package_installed(tmp_path: Path) -> None:
    system, lib = tmp_path / "etc-system", tmp_path / "lib-system"
    system.mkdir()
    lib.mkdir()
    unit = b"[Timer]\nOnCalendar=daily\n"
    (lib / "fstrim.timer").write_bytes(unit)
    (system / "fstrim.timer").symlink_to(lib / "fstrim.timer")  # a packaged one, linked
    (system / "apt-daily.timer").symlink_to("/dev/null")  # masked
    packaged = {str(lib / "fstrim.timer"): hashlib.md5(unit).hexdigest()}
    globs = (f"{system}/*.timer",)
    assert jobs.timer_problems(packaged, globs) == []
    (system / "way-in.timer").write_bytes(unit)
    assert jobs.timer_problems(packaged, globs) == [
        f"systemd timers no package installed: {system}/way-in.timer (systemctl stop and "
        "disable them, remove their files, systemctl daemon-reload)"]
