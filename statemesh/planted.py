"""Code planted to be loaded by root's programs later, found before installing.

The operator is root before installing and can leave code that programs load by themselves
once the node is locked down, with no terminal and no login: the dynamic linker's preload
list and search path, variables that every service or cron job inherits, commands and
Python or Perl modules found before Debian's own, and Python's startup hooks. The node's
own processes run isolated from Python's environment and site (statemesh-node is
`python3 -IS`), but the system's other root programs (unattended-upgrades, cron's jobs,
maintainer scripts) are not, so preflight refuses such a machine, naming each thing and how
to remove it. What dpkg installed, as it installed it, is never a finding (statemesh.dpkgdb).

Only reads files.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Sequence

from statemesh import replaceable, safefile
from statemesh.dpkgdb import as_installed

LD_SO_PRELOAD = Path("/etc/ld.so.preload")
LD_SO_CONFS = ("/etc/ld.so.conf", "/etc/ld.so.conf.d/*.conf")
# What the dynamic linker, Python, Perl, bash and iconv take from a variable.
LOADER_VARIABLES = ("LD_PRELOAD", "LD_AUDIT", "LD_LIBRARY_PATH", "BASH_ENV", "ENV",
                    "PERL5OPT", "PERL5LIB", "PERLLIB", "GCONV_PATH",
                    # apt's and dpkg's: another configuration, another database or root.
                    "APT_CONFIG", "DPKG_ADMINDIR", "DPKG_ROOT")
PYTHON_VARIABLE_PREFIX = "PYTHON"
GRUB_VARIABLE_PREFIX = "GRUB_"
# The package's own (STATEMESH_DBUS_ADDRESS and the backend choices, for the test suites)
# and the bus address a D-Bus library may honour: set for the node's services, they would
# point them at another bus, one where a stand-in systemd says yes to everything.
NODE_VARIABLE_PREFIX = "STATEMESH_"
BUS_VARIABLES = ("DBUS_SYSTEM_BUS_ADDRESS",)
# Where such a variable is set for services (systemd) and for cron's jobs (pam_env) at the
# next boot; the running manager's environment is asked over D-Bus.
ENVIRONMENT_FILES = ("/etc/environment", "/etc/security/pam_env.conf",
                     "/etc/systemd/system.conf", "/etc/systemd/system.conf.d/*.conf",
                     "/run/systemd/system.conf.d/*.conf",
                     "/usr/local/lib/systemd/system.conf.d/*.conf")
KERNEL_COMMAND_LINE = Path("/proc/cmdline")
# A variable's name where it is set: "NAME=" (environment, DefaultEnvironment=) or
# "NAME DEFAULT=" (pam_env.conf).
ASSIGNED = r"(?<![A-Za-z0-9_])([A-Z][A-Z0-9_]*)[=\s]"
# Searched before Debian's own: a library, module or command here shadows the packaged one.
LOCAL_LIBRARIES = "/usr/local/lib"
LOCAL_COMMAND_DIRS = ("/usr/local/sbin", "/usr/local/bin")
SYSTEM_COMMAND_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
LOCAL_MODULE_GLOBS = ("/usr/local/lib/python3*/dist-packages",
                      "/usr/local/lib/python3*/site-packages",
                      "/root/.local/lib/python3*/site-packages",
                      "/usr/local/lib/*/perl", "/usr/local/share/perl", "/usr/local/lib/site_perl")
# Run at every start of Python (unless -S) or Perl, or moving where Python finds its own.
STARTUP_HOOK_GLOBS = ("/usr/lib/python3*/dist-packages/*.pth",
                      "/usr/lib/python3*/sitecustomize.py", "/usr/lib/python3*/usercustomize.py",
                      "/usr/lib/python3*/dist-packages/sitecustomize.py",
                      "/usr/lib/python3*/dist-packages/usercustomize.py",
                      "/etc/perl/sitecustomize.pl", "/usr/bin/pyvenv.cfg", "/usr/pyvenv.cfg",
                      "/usr/lib/python3*.zip")
SHOWN = 3  # paths named per finding; the rest are counted


def named(paths: Sequence[str], shown: int = SHOWN) -> str:
    """The first few of `paths` and how many more: a finding stays one readable line."""
    listed = ", ".join(paths[:shown])
    return listed if len(paths) <= shown else f"{listed} and {len(paths) - shown} more"


def _not_installed(patterns: Iterable[str], files: Dict[str, str]) -> List[str]:
    """The files the patterns match that are not as dpkg installed them."""
    return sorted({path for pattern in patterns for path in glob.glob(pattern)
                   if not os.path.isdir(path) and not as_installed(path, files)})


def _read(path: Path) -> str:
    """The file's text; "" when it is missing or unreadable. Raises NotRegularFile for a
    FIFO or a device (never waited on): the caller names it."""
    try:
        return safefile.read_text(path, errors="replace")
    except safefile.NotRegularFile:
        raise
    except OSError:
        return ""


def _not_regular(path: Path, error: safefile.NotRegularFile, whose: str) -> str:
    """A finding for a FIFO or a device where a file of loaded code or settings is read:
    its readers would wait on it, or read whatever is written into it."""
    return (f"{path} is {error.kind}, not a regular file: {whose} would wait on it or read "
            f"whatever is written into it (remove {path})")


def _replaceable(path: Path, whose: str) -> List[str]:
    """A finding when someone other than root could change the file later (a link to a
    file in /tmp reads as nothing today, and is anyone's after the next boot)."""
    why = replaceable.by_others(str(path))
    return [f"{why}: {whose} would load what is written there (remove {path})"] if why else []


def preload_problems(path: Path = LD_SO_PRELOAD) -> List[str]:
    """A preload list loads its libraries into every program started, as root too."""
    replaced = _replaceable(path, "every program, root's included,")
    if replaced:
        return replaced
    try:
        text = _read(path)
    except safefile.NotRegularFile as error:
        return [_not_regular(path, error, "every program's start")]
    libraries = [word for line in text.splitlines() for word in line.split("#", 1)[0].split()]
    if not libraries:
        return []
    return [f"{path} loads {named(libraries)} into every program, root's included "
            f"(remove {path})"]


def loads_code(name: str) -> bool:
    """Whether a variable of this name makes a program load or run other code: the loader's,
    Python's, Perl's and the shells', apt's and dpkg's, and GRUB_* (update-grub, run at every
    kernel update, takes one a settings file leaves unset from its environment, and writes
    it onto the kernel's command line); or talk to another system bus (STATEMESH_*, the
    system bus's address)."""
    return (name in LOADER_VARIABLES or name in BUS_VARIABLES
            or name.startswith((PYTHON_VARIABLE_PREFIX, GRUB_VARIABLE_PREFIX, NODE_VARIABLE_PREFIX)))


def environment_problems(environment: Iterable[str]) -> List[str]:
    """What the running service manager passes to every service that makes it load other
    code."""
    return [f"the service manager's environment sets {name}, which every service inherits "
            f"(systemctl unset-environment {name}, and remove it where it is set)"
            for name in (assignment.partition("=")[0] for assignment in environment)
            if loads_code(name)]


def _command_line(path: Path) -> str:
    """The kernel's command line (its own file, no operator's); "" when unreadable."""
    try:
        return safefile.read_text(path, errors="replace")
    except OSError:
        return ""


def _loader_names(text: str) -> List[str]:
    """The variables that make programs load code that an environment file sets."""
    return sorted({name for line in text.splitlines()
                   if not line.lstrip().startswith(("#", ";"))
                   for name in re.findall(ASSIGNED, line) if loads_code(name)})


def environment_file_problems(patterns: Sequence[str] = ENVIRONMENT_FILES,
                              cmdline: Path = KERNEL_COMMAND_LINE) -> List[str]:
    """The same variables set for the next boot's services, or for cron's jobs."""
    problems = []
    for path in sorted({path for pattern in patterns for path in glob.glob(pattern)}):
        replaced = _replaceable(Path(path), "the programs started after it")
        if replaced:
            problems += replaced
            continue
        try:
            names = _loader_names(_read(Path(path)))
        except safefile.NotRegularFile as error:
            problems.append(_not_regular(Path(path), error, "the programs started after it"))
            continue
        if names:
            problems.append(f"{path} sets {', '.join(names)} for the programs started after "
                            f"it (remove it there)")
    setenv = [word.partition("=")[2] for word in _command_line(cmdline).split()
              if word.startswith("systemd.setenv=")]
    names = sorted({name for name in (value.partition("=")[0] for value in setenv)
                    if loads_code(name)})
    if names:
        problems.append(f"the kernel command line sets {', '.join(names)} for every service "
                        "(systemd.setenv=; remove it from the boot loader's configuration)")
    return problems


def library_problems(files: Dict[str, str], local: str = LOCAL_LIBRARIES,
                     confs: Sequence[str] = LD_SO_CONFS) -> List[str]:
    """Shared libraries the dynamic linker finds before Debian's, and search paths added."""
    problems = []
    libraries = sorted(_shared_objects(local))
    if libraries:
        problems.append(f"shared libraries in {local}, searched before the system's: "
                        f"{named(libraries)} (remove them, then run ldconfig)")
    added = _not_installed(confs, files)
    if added:
        problems.append(f"library search paths not as a package installed them: "
                        f"{named(added)} (remove them, then run ldconfig)")
    return problems


def _shared_objects(top: str) -> Iterable[str]:
    """Every *.so and *.so.N under `top`, but in Python's and Perl's module trees (their
    own finding)."""
    for directory, subdirectories, names in os.walk(top):
        subdirectories[:] = [d for d in subdirectories
                             if not d.startswith("python3") and d not in ("perl", "site_perl")]
        yield from (os.path.join(directory, name) for name in names
                    if re.search(r"\.so(\.[0-9]+)*$", name))


def command_problems(local_dirs: Sequence[str] = LOCAL_COMMAND_DIRS,
                     system_dirs: Sequence[str] = SYSTEM_COMMAND_DIRS) -> List[str]:
    """Commands found first on root's PATH under a system command's name: cron's, systemd's
    and maintainer scripts' PATH lists /usr/local first."""
    system = {name for directory in system_dirs for name in _names(directory)}
    shadowing = sorted(os.path.join(directory, name) for directory in local_dirs
                       for name in _names(directory) if name in system)
    if not shadowing:
        return []
    return [f"commands shadowing the system's on root's PATH: {named(shadowing)} "
            "(remove them)"]


def _files_under(top: str) -> Iterable[str]:
    for directory, _subdirectories, names in os.walk(top):
        yield from (os.path.join(directory, name) for name in names)


def _names(directory: str) -> List[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def module_problems(files: Dict[str, str],
                    local_globs: Sequence[str] = LOCAL_MODULE_GLOBS,
                    hook_globs: Sequence[str] = STARTUP_HOOK_GLOBS) -> List[str]:
    """Python and Perl code outside Debian's packages that root's programs would run."""
    problems = []
    for pattern in local_globs:
        for directory in sorted(glob.glob(pattern)):
            modules = sorted(_files_under(directory))
            if modules:
                problems.append(f"modules in {directory} come before Debian's for root's "
                                f"programs: {named(modules)} (remove them)")
    hooks = _not_installed(hook_globs, files)
    if hooks:
        problems.append("interpreter startup hooks not as a package installed them, run by "
                        f"every Python or Perl program: {named(hooks)} (remove them, or "
                        "reinstall their package)")
    return problems


def problems(environment: Iterable[str], files: Dict[str, str]) -> List[str]:
    """Every planted thing preflight refuses, given the running service manager's
    environment and what dpkg installed."""
    return (preload_problems() + environment_problems(environment)
            + environment_file_problems() + library_problems(files) + command_problems()
            + module_problems(files))
