"""Commands planted in apt's and dpkg's configuration, found before installing.

apt and dpkg run the commands their configuration names as root, with no terminal, every
time they run: the daily unattended upgrade runs them on a locked-down node. A file of
their configuration that names a command, moves where apt or dpkg finds its programs,
configuration, database or root, or gives apt's daily script a value it splices into
shell, and is not as a package installed it, is a way back in. So is any of their files or
directories that someone other than root can write, or an entry that points nowhere yet.
Preflight refuses each, naming the file, the settings and how to remove them.

apt's files are read with apt's own parser (python3-apt's apt_pkg), one at a time, so that
every spelling apt accepts (any case, nested blocks, `::` lists, Binary:: scopes) is seen as
apt sees it; a file no package installed may not #include others (not followed here, and
a directory without its slash hangs apt's parser). dpkg's files are "option[=value]" lines
(dpkg.cfg(5)), read as dpkg reads them: the name is the leading letters, digits and dashes,
and a physical line longer than dpkg's 1023-byte buffer goes on as a new line.

Honest limit: this is a list of what runs commands or moves things, from apt's and dpkg's
sources; a setting they add later is not on it.
Only reads files and dpkg's database (statemesh.dpkgdb).
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from statemesh import replaceable, safefile
from statemesh.dpkgdb import as_installed

APT_FILES = ("/etc/apt/apt.conf", "/etc/apt/apt.conf.d/*")
DPKG_FILES = ("/etc/dpkg/dpkg.cfg", "/etc/dpkg/dpkg.cfg.d/*", "/root/.dpkg.cfg")
CONFIG_DIRS = ("/etc/apt", "/etc/apt/apt.conf.d", "/etc/dpkg", "/etc/dpkg/dpkg.cfg.d")
# The names apt reads in apt.conf.d (its characters; no extension or .conf; not the names
# Dir::Ignore-Files-Silently skips by default), and those dpkg reads in dpkg.cfg.d.
APT_PART_NAME = re.compile(r"^[A-Za-z0-9_:.-]*[A-Za-z0-9_:-]$")
APT_IGNORED = re.compile(r"(~|\.disabled|\.bak|\.dpkg-[a-z]+|\.ucf-[a-z]+|\.save|\.orig"
                         r"|\.distUpgrade)$")
DPKG_PART_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# A Binary::<program>:: scope applies the rest of the key to that program alone.
BINARY_SCOPE = re.compile(r"^binary::[^:]+::", re.IGNORECASE)
# apt settings whose values are commands or where apt finds programs, keys, its
# configuration or its root (apt's full key names, case-insensitively; see apt's sources:
# RunScripts, edsp.cc, dpkgpm.cc, gpgv.cc, cdromutl.cc, configuration.cc).
APT_COMMAND_KEY = re.compile(
    r"(^|::)(pre-invoke|post-invoke|post-invoke-success|post-invoke-stats|pre-install-pkgs"
    r"|proxy-auto-detect|proxyautodetect|chroot-directory|gpgvcommand|gpgcommand"
    r"|trustedkeyring|mount|umount)$"
    r"|^(rootdir|dir)($|::bin(::|$)|::etc(::|$))|^aptcli::hooks(::|$)|^apt::(solver|planner)$"
    r"|^dpkg::path$|^apt::key(::|$)|^acquire::gpgv::options", re.IGNORECASE)
# Values apt's daily script (apt.systemd.daily) evaluates or passes unquoted to a shell.
SHELL_SPLICED_KEY = re.compile(r"^(dir|apt::periodic|apt::archives)::", re.IGNORECASE)
SHELL_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_./+:@-]*$")
OPTIONS_KEY = re.compile(r"(^|::)options$", re.IGNORECASE)
# dpkg options that run a command or move its database or root; apt passes DPkg::Options on.
DPKG_COMMAND_OPTIONS = ("pre-invoke", "post-invoke", "status-logger", "admindir", "root",
                        "instdir")
DPKG_LINE_BYTES = 1023
DPKG_OPTION_NAME = re.compile(r"^[A-Za-z0-9-]*")
INCLUDE = re.compile(r"^\s*#\s*include", re.MULTILINE)


def read_apt_file(path: str) -> List[Tuple[str, List[str]]]:
    """Every key one apt configuration file sets, with its values, as apt parses it;
    raises ValueError when apt could not parse it."""
    import apt_pkg  # python3-apt: a C extension of the system's apt
    config = apt_pkg.Configuration()
    try:
        apt_pkg.read_config_file(config, path)
    except SystemError as error:
        raise ValueError(str(error).strip()) from None
    return [(key, _own_values(config, key)) for key in config.keys() if not key.endswith("::")]


def _own_values(config: Any, key: str) -> List[str]:
    """A key's value, and its list's items (its children when they are all anonymous; named
    children are keys of their own)."""
    children = config.list(key)
    listed = bool(children) and all(child.endswith("::") for child in children)
    return [config.get(key), *(config.value_list(key) if listed else [])]


def apt_commands(settings: Sequence[Tuple[str, List[str]]]) -> List[str]:
    """The keys among `settings` that name a command, move what apt runs or reads, or give
    apt's daily script a value it splices into shell."""
    found = []
    for key, values in settings:
        named = BINARY_SCOPE.sub("", key)
        present = [value for value in values if value]
        if APT_COMMAND_KEY.search(named) and present:
            found.append(key)
        elif SHELL_SPLICED_KEY.search(named) and not all(map(SHELL_SAFE_VALUE.match, present)):
            found.append(key)
        elif OPTIONS_KEY.search(named) and any(_dpkg_command_option(value) for value in present):
            found.append(key)
    return sorted(set(found))


def _dpkg_option_name(option: str) -> str:
    """The option a dpkg.cfg line or a DPkg::Options value names ("--post-invoke=x")."""
    return DPKG_OPTION_NAME.match(option.strip().lstrip("-")).group(0)


def _dpkg_command_option(option: str) -> bool:
    return _dpkg_option_name(option).lower() in DPKG_COMMAND_OPTIONS


def dpkg_commands(data: bytes) -> List[str]:
    """The command-running options a dpkg.cfg file sets, read as dpkg reads it."""
    found = set()
    for physical in data.split(b"\n"):
        for start in range(0, max(len(physical), 1), DPKG_LINE_BYTES):
            line = physical[start:start + DPKG_LINE_BYTES].decode("utf-8", "replace").strip()
            if line and not line.startswith("#") and _dpkg_command_option(line):
                found.add(_dpkg_option_name(line))
    return sorted(found)


def _parts(patterns: Sequence[str], reads: Callable[[str], bool],
           opens: Callable[[str], bool]) -> List[str]:
    """The files apt (or dpkg) reads: the main file, and the parts whose names `reads`
    takes, of a type `opens` takes; every link too (what it names may be replaced, or
    appear, later: replaceable.by_others judges it)."""
    paths = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            if "*" in pattern and not reads(os.path.basename(path)):
                continue
            if opens(path) or os.path.islink(path):
                paths.append(path)
    return paths


def dpkg_opens(path: str) -> bool:
    """dpkg opens any name it reads that is no directory, a FIFO or a device too (and waits
    on it, or reads whatever is written into it); apt only regular files (os.path.isfile,
    as apt's RealFileExists)."""
    return os.path.exists(path) and not os.path.isdir(path)


def apt_reads(name: str) -> bool:
    """Whether apt reads a part of this name: its characters, no extension or .conf, not a
    name it skips."""
    return (bool(APT_PART_NAME.match(name)) and not APT_IGNORED.search(name)
            and ("." not in name or name.endswith(".conf")))


def dpkg_reads(name: str) -> bool:
    return bool(DPKG_PART_NAME.match(name))


def _apt_finding(path: str) -> Optional[str]:
    try:
        if INCLUDE.search(safefile.read_text(path, errors="replace")):
            return (f"apt configuration {path} includes other files (#include) and no package "
                    "installed it so (remove the file or the #include)")
        keys = apt_commands(read_apt_file(path))
    except (OSError, ValueError) as error:
        return f"apt configuration {path} cannot be read as apt reads it ({error}); fix or remove it"
    if not keys:
        return None
    return (f"apt configuration {path} runs commands as root at every apt run and no package "
            f"installed it so: {', '.join(keys)} (remove the file or those settings)")


def _dpkg_finding(path: str) -> Optional[str]:
    try:
        options = dpkg_commands(safefile.read_bytes(path))
    except safefile.NotRegularFile as error:
        return (f"dpkg configuration {path} is {error.kind}, not a regular file: dpkg would "
                "wait on it or read whatever is written into it (remove it)")
    except OSError as error:
        return f"dpkg configuration {path} cannot be read ({error.strerror}); fix or remove it"
    if not options:
        return None
    return (f"dpkg configuration {path} runs commands as root at every dpkg run and no "
            f"package installed it so: {', '.join(options)} (remove the file or those options)")


def problems(files: Dict[str, str]) -> List[str]:
    """apt's and dpkg's configuration: files not as a package installed them that run
    commands, and anything of it others than root could change; one finding each."""
    found = [f"apt or dpkg configuration: {why} (make it root's, not group- or world-writable)"
             for why in (replaceable.by_others(d) for d in CONFIG_DIRS if os.path.isdir(d)) if why]
    readers = [(path, _apt_finding) for path in _parts(APT_FILES, apt_reads, os.path.isfile)]
    readers += [(path, _dpkg_finding) for path in _parts(DPKG_FILES, dpkg_reads, dpkg_opens)]
    for path, finding_of in readers:
        why = replaceable.by_others(path)
        if why:
            found.append(f"apt or dpkg configuration: {why} (make it root's, not group- or "
                         "world-writable, or remove it)")
        elif not as_installed(path, files):
            finding = finding_of(path)
            if finding:
                found.append(finding)
    return found
