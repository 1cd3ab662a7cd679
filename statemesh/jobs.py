"""Jobs planted to run later, found before installing: cron, at, systemd services, timers
and generators.

A job the operator schedules before installing runs as root on the locked-down node, with
no terminal and no login: a way back in that the lockdown never sees (a service that dials
out and hands over a shell needs neither, and the firewall lets it out). Preflight refuses
a machine with any crontab or at job (a node runs no user's jobs), with cron's system
tables not as their packages installed them, with a systemd service, socket, path, mount,
automount unit, timer or generator no package installed (transient timers included,
`systemd-run --on-calendar`), with a drop-in no package installed for any such unit or a
target, with what systemd runs at boot without a unit file (an init script no package
installed, an executable /etc/rc.local, a lingering user), or with a hook of a packaged
program (kernel and initramfs updates, needrestart, logrotate, udev, modprobe, network
events) no package installed as it is, naming each and how to remove it.

Only reads files and dpkg's database (statemesh.dpkgdb).
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Dict, List, Pattern, Sequence, Tuple

from statemesh import safefile, shsettings
from statemesh.dpkgdb import (DPKG_DIR, as_installed, direct_target, real_directory,
                              shipped_links)
from statemesh.planted import named

CRONTABS = Path("/var/spool/cron/crontabs")
AT_JOBS = Path("/var/spool/cron/atjobs")
CRON_TABLES = ("/etc/crontab", "/etc/anacrontab")
# run-parts and cron.d skip names with other characters (foo.dpkg-old, foo.ucf-dist).
CRON_DIR_GLOBS = ("/etc/cron.d/*", "/etc/cron.hourly/*", "/etc/cron.daily/*",
                  "/etc/cron.weekly/*", "/etc/cron.monthly/*", "/etc/cron.yearly/*")
RUN_PARTS_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# Where a timer unit can be: the packages', the admin's, runtime and transient ones.
TIMER_GLOBS = ("/usr/lib/systemd/system/*.timer", "/lib/systemd/system/*.timer",
               "/etc/systemd/system/*.timer", "/usr/local/lib/systemd/system/*.timer",
               "/run/systemd/system/*.timer", "/run/systemd/transient/*.timer")
# Where systemd reads unit files and their drop-ins from: the admin's, the runtime's, the
# packages'. An enabled unit's symlinks (*.wants/, *.requires/, *.upholds/) are judged by
# the file they name, so a unit linked in from elsewhere (`systemctl link`) is found too.
UNIT_DIRS = ("/etc/systemd/system.control", "/run/systemd/system.control",
             "/etc/systemd/system", "/etc/systemd/system.attached", "/run/systemd/system",
             "/run/systemd/system.attached", "/usr/local/lib/systemd/system",
             "/usr/lib/systemd/system", "/lib/systemd/system")
# Units that start a program, or mount something over what programs run (timers above).
STARTING_TYPES = ("service", "socket", "path", "mount", "automount")
UNIT_GLOBS = tuple(f"{directory}/{links}*.{kind}" for directory in UNIT_DIRS
                   for links in ("", "*.wants/", "*.requires/", "*.upholds/")
                   for kind in STARTING_TYPES)
# A drop-in for one unit (foo.service.d/), for every unit whose name starts with a prefix
# (foo-.service.d/), or for every unit of a type (service.d/) can change what it runs; one
# for a target can make it want another unit.
DROPIN_GLOBS = tuple(f"{directory}/*{kind}.d/*.conf" for directory in UNIT_DIRS
                     for kind in (*STARTING_TYPES, "timer", "target"))
# What systemd's generators turn into units at every boot: SysV init scripts
# (systemd-sysv-generator) and an executable /etc/rc.local (rc-local.service); and users
# whose service manager starts at boot with no login (loginctl enable-linger).
INIT_SCRIPT_GLOBS = ("/etc/init.d/*",)
RC_LOCAL = Path("/etc/rc.local")
LINGER = Path("/var/lib/systemd/linger")
# Run by systemd as root at every boot and every daemon-reload.
GENERATOR_GLOBS = ("/etc/systemd/system-generators/*", "/run/systemd/system-generators/*",
                   "/usr/local/lib/systemd/system-generators/*",
                   "/usr/lib/systemd/system-generators/*", "/lib/systemd/system-generators/*",
                   "/etc/systemd/system-environment-generators/*",
                   "/usr/local/lib/systemd/system-environment-generators/*",
                   "/usr/lib/systemd/system-environment-generators/*")
# Applied as root at every boot by systemd-tmpfiles-setup and systemd-sysusers: tmpfiles.d
# writes files and makes links anywhere (w+ /etc/ld.so.preload, L+ into /etc/cron.d) and
# changes modes (d /etc/cron.d 1777), sysusers.d makes accounts and adds members to groups
# (tss's, which reach the TPM). Not /run's: gone at the next boot, and until then only read
# by a boot (a package's postinst applies its own file by name).
BOOT_CONFIG_GLOBS = tuple(f"{base}/{kind}.d/*" for kind in ("tmpfiles", "sysusers")
                          for base in ("/etc", "/usr/local/lib", "/usr/lib", "/lib"))
# Written by a package's maintainer script rather than shipped, so dpkg has no record of
# them: each passes with what that script writes and nothing else (Debian's screen makes
# its socket directory, setgid utmp or world-writable with the sticky bit).
GENERATED_CONFIG = {
    "/etc/tmpfiles.d/screen-cleanup.conf": re.compile(
        r"(#[^\n]*\n)*d /run/screen (0755|0775|1777) root utmp\n?"),
}
# Packaged programs' hooks and configuration that run commands as root later, with no
# terminal: kernel packages' hooks and initramfs-tools' (hooks, scripts, and conf.d, which is
# sourced as shell) at every kernel or initramfs update, which unattended-upgrades installs,
# and the initramfs's scripts at every boot; needrestart's after every upgrade (its
# configuration is Perl); logrotate's every day (postrotate); udev's rules at device events
# (RUN+=); modprobe's install commands at module loads, and depmod's configuration, which
# can point modprobe at modules outside /lib/modules; ifupdown's, dhclient's,
# NetworkManager's and networkd-dispatcher's at network events; request-key's, which the
# kernel runs as root whenever any user asks for a key it does not hold (keyctl request2),
# the commands its configuration names. A pattern ending in "/*" stands for every name in
# the directory.
HOOK_GLOBS = ("/etc/kernel/*.d/*",
              "/etc/initramfs-tools/initramfs.conf", "/etc/initramfs-tools/update-initramfs.conf",
              "/etc/initramfs-tools/conf.d/*", "/etc/initramfs-tools/hooks/*",
              "/etc/initramfs-tools/scripts/*", "/etc/initramfs-tools/scripts/*/*",
              "/usr/share/initramfs-tools/conf.d/*", "/usr/share/initramfs-tools/conf-hooks.d/*",
              "/usr/share/initramfs-tools/hooks/*", "/usr/share/initramfs-tools/scripts/*",
              "/usr/share/initramfs-tools/scripts/*/*",
              "/etc/needrestart/needrestart.conf", "/etc/needrestart/*.d/*",
              "/etc/logrotate.conf", "/etc/logrotate.d/*",
              "/etc/udev/rules.d/*", "/run/udev/rules.d/*", "/usr/local/lib/udev/rules.d/*",
              "/usr/lib/udev/rules.d/*", "/lib/udev/rules.d/*",
              "/etc/modprobe.d/*", "/run/modprobe.d/*", "/usr/local/lib/modprobe.d/*",
              "/usr/lib/modprobe.d/*", "/lib/modprobe.d/*",
              # depmod's: `external` and `search` send modprobe to modules anywhere.
              "/etc/depmod.d/*", "/run/depmod.d/*", "/usr/local/lib/depmod.d/*",
              "/usr/lib/depmod.d/*", "/lib/depmod.d/*",
              "/etc/network/if-*.d/*", "/etc/dhcp/dhclient-enter-hooks.d/*",
              "/etc/dhcp/dhclient-exit-hooks.d/*", "/etc/NetworkManager/dispatcher.d/*",
              "/etc/NetworkManager/dispatcher.d/*/*", "/etc/networkd-dispatcher/*/*",
              "/usr/lib/networkd-dispatcher/*/*",
              # dhcpcd's (ifupdown's DHCP client on Debian 13), run as root at every lease.
              "/etc/dhcpcd.enter-hook", "/etc/dhcpcd.exit-hook", "/usr/lib/dhcpcd/dhcpcd-hooks/*",
              "/lib/dhcpcd/dhcpcd-hooks/*",
              # GRUB's configuration is shell, run with its scripts by update-grub at every
              # kernel update (its settings files pass when they only set GRUB_* variables);
              # kernel-install's plugins likewise.
              "/etc/default/grub", "/etc/default/grub.d/*", "/etc/grub.d/*",
              "/etc/kernel/install.d/*", "/usr/lib/kernel/install.d/*",
              "/etc/request-key.conf", "/etc/request-key.d/*",
              "/etc/rsyslog.conf", "/etc/rsyslog.d/*", "/etc/sysfs.conf", "/etc/sysfs.d/*")
# GRUB's settings files, which update-grub sources as shell: settings only (GRUB_* set to
# a literal, or to other settings' values) run nothing there, so an operator's console or
# timeout settings pass, edited or not, and a command substitution does not; but for the
# distribution's own name line, which Debian's and Ubuntu's files carry as shipped.
GRUB_SETTINGS_FILES = re.compile(r"^/etc/default/grub(\.d/[^/]*)?$")
_GRUB_SETTING = shsettings.setting_pattern("GRUB_[A-Z0-9_]+", expandable="GRUB_[A-Z0-9_]+")
_GRUB_DISTRIBUTOR_LINES = (
    "GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`",
    "GRUB_DISTRIBUTOR=`( . /etc/os-release; echo ${NAME:-Ubuntu} ) 2>/dev/null || echo Ubuntu`",
)
# rsyslog's files, judged by what they do rather than as installed (postfix's postinst
# writes one; operators forward logs): what runs a program as root (omprog, mmexternal, a
# legacy `^/program` action) or loads code or configuration from outside rsyslog's own
# directories (a module or an include named by a path) is named.
RSYSLOG_FILES = re.compile(r"^/etc/rsyslog\.(conf|d/[^/]*)$")
_RSYSLOG_RUNS = re.compile(
    r"omprog|mmexternal|\^\s*/"
    r"|(\$ModLoad|load\s*=)\s*\"?[^\s\"]*/"
    r"|(\$IncludeConfig|file\s*=)\s*\"?(?!/etc/rsyslog\.d/)[^\s\"]*/", re.IGNORECASE)
AT_SEQUENCE = ".SEQ"  # at's job counter, not a job
MASKED = "/dev/null"  # what a masked unit's file links to: it cannot run


def spool_problems(crontabs: Path = CRONTABS, at_jobs: Path = AT_JOBS) -> List[str]:
    """Any user's crontab, any pending at job; a spool this process cannot read (run
    without root) is a finding too, not an empty spool."""
    problems = []
    tables, unreadable = _entries(crontabs)
    if tables:
        users = [Path(path).name for path in tables]
        problems.append(f"crontabs of {named(users)} in {crontabs} (crontab -r -u USER)")
    jobs, unreadable_at = _entries(at_jobs)
    jobs = [path for path in jobs if Path(path).name != AT_SEQUENCE]
    if jobs:
        problems.append(f"at jobs pending in {at_jobs}: {named(jobs)} (atrm them)")
    problems += [f"cannot read {spool} to look for jobs (run as root)"
                 for spool in (unreadable, unreadable_at) if spool]
    return problems


def _entries(directory: Path) -> Tuple[List[str], str]:
    """(the files in `directory`, sorted; `directory` itself if it exists but cannot be
    read, else "")."""
    try:
        return sorted(str(entry) for entry in directory.iterdir() if entry.is_file()), ""
    except FileNotFoundError:
        return [], ""
    except OSError:
        return [], str(directory)


def table_problems(files: Dict[str, str], tables: Sequence[str] = CRON_TABLES,
                   dir_globs: Sequence[str] = CRON_DIR_GLOBS) -> List[str]:
    """cron's system tables and run-parts scripts that are not as a package installed them."""
    candidates = [path for path in tables if os.path.isfile(path)]
    candidates += [path for pattern in dir_globs for path in glob.glob(pattern)
                   if os.path.isfile(path) and RUN_PARTS_NAME.match(os.path.basename(path))]
    changed = sorted({path for path in candidates if not as_installed(path, files)})
    if not changed:
        return []
    return [f"cron jobs not as a package installed them: {named(changed)} (remove them, or "
            "reinstall their package)"]


def foreign(patterns: Sequence[str], files: Dict[str, str]) -> List[str]:
    """What the patterns match that no package installed as it is, each file once however
    many ways /usr-merged paths reach it. Masked units and dangling links (a removed
    package's enable link: systemd loads nothing from it) are not files to judge."""
    found: Dict[str, str] = {}
    for pattern in patterns:
        for path in glob.glob(pattern):
            real = os.path.realpath(path)
            if real == MASKED or real in found or not os.path.exists(path):
                continue
            if not as_installed(path, files) and not _as_generated(path):
                found[real] = path
    return sorted(found.values())


def _as_generated(path: str, generated: Dict[str, Pattern[str]] = GENERATED_CONFIG) -> bool:
    """Whether `path` is a file a maintainer script writes, holding what it writes."""
    pattern = generated.get(path)
    if pattern is None:
        return False
    try:
        return pattern.fullmatch(safefile.read_text(path)) is not None
    except (OSError, UnicodeDecodeError):  # a FIFO or a device too: not what it writes
        return False


# (where to look, what is found there, how to remove it): one finding each.
Foreign = Tuple[Sequence[str], str, str]


def foreign_findings(files: Dict[str, str], *kinds: Foreign) -> List[str]:
    """One line per kind naming what its patterns match that no package installed."""
    problems = []
    for patterns, what, remedy in kinds:
        paths = foreign(patterns, files)
        if paths:
            problems.append(f"{what}: {named(_shown(paths))} ({remedy})")
    return problems


def _shown(paths: Sequence[str]) -> List[str]:
    """The paths as a finding names them, saying which are no regular file ("x (a FIFO)"):
    what reads one waits on it, or reads whatever is written into it."""
    return [f"{path} ({kind})" if kind else path
            for path, kind in ((path, safefile.non_regular(path)) for path in paths)]


def timer_problems(files: Dict[str, str], timer_globs: Sequence[str] = TIMER_GLOBS,
                   generator_globs: Sequence[str] = GENERATOR_GLOBS) -> List[str]:
    """systemd timers and generators no package installed; an enabled packaged timer is a
    symlink to the package's file, and is judged by it."""
    return foreign_findings(
        files,
        (timer_globs, "systemd timers no package installed",
         "systemctl stop and disable them, remove their files, systemctl daemon-reload"),
        (generator_globs, "systemd generators no package installed, run as root at every boot",
         "remove them"))


def unit_problems(files: Dict[str, str], unit_globs: Sequence[str] = UNIT_GLOBS,
                  dropin_globs: Sequence[str] = DROPIN_GLOBS) -> List[str]:
    """Units that start programs, and drop-ins for them, that no package installed. None is
    excepted: this package's own purge drop-in lives only while a purge runs."""
    return foreign_findings(
        files,
        (unit_globs, "systemd units no package installed, which would run as root",
         "systemctl disable --now them, remove their files, systemctl daemon-reload"),
        (dropin_globs, "systemd drop-ins no package installed, which change what a unit runs",
         "remove them, systemctl daemon-reload"))


def boot_script_problems(files: Dict[str, str], init_globs: Sequence[str] = INIT_SCRIPT_GLOBS,
                         rc_local: Path = RC_LOCAL, linger: Path = LINGER,
                         config_globs: Sequence[str] = BOOT_CONFIG_GLOBS) -> List[str]:
    """What generators, logind, tmpfiles and sysusers do as root at boot without any unit
    file of its own."""
    problems = foreign_findings(
        files, (init_globs, "init scripts no package installed, which systemd runs as services",
                "remove them, or purge their package"),
        (config_globs, "systemd-tmpfiles and systemd-sysusers configuration not as a package "
         "installed it, applied as root at every boot (files written, links made, accounts "
         "and group members added)", "remove it, or reinstall its package"))
    if rc_local.is_file() and os.access(rc_local, os.X_OK):
        problems.append(f"{rc_local} is executable: rc-local.service runs it at every boot "
                        f"(chmod -x {rc_local}, or remove it)")
    lingering, unreadable = _entries(linger)
    if lingering:
        users = [Path(path).name for path in lingering]
        problems.append(f"users whose service manager starts at boot without a login: "
                        f"{named(users)} (loginctl disable-linger USER)")
    if unreadable:
        problems.append(f"cannot read {unreadable} to look for lingering users (run as root)")
    return problems


def _hook_paths(pattern: str) -> List[str]:
    """What a hook pattern reaches, names starting with a dot included: glob skips them,
    but logrotate and networkd-dispatcher read every name of their directories."""
    parent, _, leaf = pattern.rpartition("/")
    if leaf != "*":
        return [pattern] if os.path.lexists(pattern) else []
    paths = []
    for directory in glob.glob(parent):
        try:
            paths += [os.path.join(directory, name) for name in os.listdir(directory)]
        except OSError:  # not a directory, or gone
            continue
    return paths


def _hook_as_installed(path: str, files: Dict[str, str]) -> bool:
    """A hook file as its package installed it. A symlink is judged apart (a link to any
    packaged program, perl say, would pass as that program's file): one to /dev/null only
    disables a hook; a directory is not a hook to judge."""
    if os.path.islink(path):
        return direct_target(path) == MASKED
    if os.path.isdir(path) or as_installed(path, files):
        return True
    if RSYSLOG_FILES.match(path):
        return rsyslog_runs_nothing(Path(path))
    return bool(GRUB_SETTINGS_FILES.match(path)) and grub_settings_only(Path(path))


def rsyslog_runs_nothing(path: Path) -> bool:
    """An rsyslog file that neither runs a program nor loads code or configuration from
    elsewhere: log forwarding, filters and postfix's own socket line pass, edited or not."""
    try:
        text = safefile.read_text(path, errors="surrogateescape")
    except OSError:  # a FIFO or a device too: judged, never waited on
        return False
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    return not any(_RSYSLOG_RUNS.search(line) for line in lines)


def grub_settings_only(path: Path) -> bool:
    """A GRUB settings file that only sets GRUB_* variables (comments and blank lines aside)."""
    return shsettings.settings_only(path, _GRUB_SETTING, also=_GRUB_DISTRIBUTOR_LINES)


def hook_problems(files: Dict[str, str], hook_globs: Sequence[str] = HOOK_GLOBS,
                  dpkg_dir: Path = DPKG_DIR) -> List[str]:
    """Packaged programs' hooks and command-running configuration not as a package installed
    them (a changed conffile, a dotfile, a symlink no package shipped as it is)."""
    found = sorted({path for pattern in hook_globs for path in _hook_paths(pattern)
                    if not _hook_as_installed(path, files)})
    links = [path for path in found if os.path.islink(path)]
    if links:
        shipped = shipped_links(links, files, dpkg_dir)
        found = [path for path in found if path not in shipped]
    if not found:
        return []
    return [f"hooks of packaged programs not as a package installed them, run as root later "
            f"(kernel and initramfs updates, the initramfs at boot, needrestart, logrotate, "
            f"udev, modprobe, network events, key requests, log messages, sysfs at boot): "
            f"{named(_shown(found))} (remove "
            "them, or reinstall their package)"]


def linked_directory_problems(patterns: Sequence[str] = HOOK_GLOBS + CRON_DIR_GLOBS
                              ) -> List[str]:
    """Directories of hooks and cron jobs, or a directory above them, that are links (but
    /usr-merge's): a link to /tmp/x is empty now and anyone's to fill after the next boot,
    and what is read through it runs as root."""
    found = set()
    for pattern in patterns:
        parent = os.path.dirname(pattern)
        prefix = parent.split("*")[0]  # before any wildcard: /etc/kernel/ of /etc/kernel/*.d
        fixed = prefix.rstrip("/") if prefix.endswith("/") or "*" not in parent else (
            os.path.dirname(prefix))
        for directory in [fixed, *glob.glob(parent)]:
            if os.path.lexists(directory) and real_directory(directory) is None:
                found.add(directory)
    if not found:
        return []
    return [f"directories of hooks or cron jobs that are links, whose target may be anyone's "
            f"to fill later: {named(sorted(found))} (make each a directory again, or "
            "reinstall its package)"]


def problems(files: Dict[str, str]) -> List[str]:
    """Every planted job preflight refuses, given what dpkg installed."""
    return (spool_problems() + table_problems(files) + timer_problems(files)
            + unit_problems(files) + boot_script_problems(files) + hook_problems(files)
            + linked_directory_problems())
