"""Commands planted in apt's and dpkg's configuration, found before installing.

apt and dpkg run the commands their configuration names as root, with no terminal, every
time they run: the daily unattended upgrade runs them on a locked-down node. A file of
their configuration that names a command, or moves where apt finds its programs and
configuration, and is not as a package installed it, is a way back in. Preflight refuses
it, naming the file, the settings and how to remove them.

apt's files are read with apt's own parser (python3-apt's apt_pkg), one at a time, so that
every spelling apt accepts (any case, nested blocks, `::` lists, #include) is seen as apt
sees it. dpkg's files are "option[=value]" lines (dpkg.cfg(5)); no library reads them.
Only reads files and dpkg's database (statemesh.dpkgdb).
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Pattern, Sequence, Tuple

from statemesh.dpkgdb import as_installed

APT_FILES = ("/etc/apt/apt.conf", "/etc/apt/apt.conf.d/*")
DPKG_FILES = ("/etc/dpkg/dpkg.cfg", "/etc/dpkg/dpkg.cfg.d/*")
# The names apt reads in apt.conf.d (others it skips: Dir::Ignore-Files-Silently's defaults),
# and those dpkg reads in dpkg.cfg.d.
APT_PART_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
APT_IGNORED = re.compile(r"(~|\.disabled|\.bak|\.dpkg-[a-z]+|\.ucf-[a-z]+|\.save|\.orig"
                         r"|\.distUpgrade)$")
DPKG_PART_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# apt settings whose values are commands, or places apt takes programs or configuration
# from (matched against apt's full key names, case-insensitively).
APT_COMMAND_KEY = re.compile(
    r"(^|::)(pre-invoke|post-invoke|post-invoke-success|pre-install-pkgs|proxy-auto-detect"
    r"|proxyautodetect)$|^dir($|::bin(::|$)|::etc(::|$))", re.IGNORECASE)
OPTIONS_KEY = re.compile(r"(^|::)options$", re.IGNORECASE)
# dpkg options that run a command; apt passes DPkg::Options on to dpkg.
DPKG_COMMAND_OPTIONS = ("pre-invoke", "post-invoke", "status-logger")


def read_apt_file(path: str) -> List[Tuple[str, List[str]]]:
    """Every key one apt configuration file sets, with its values, as apt parses it;
    raises ValueError when apt could not parse it."""
    import apt_pkg  # python3-apt: a C extension of the system's apt
    config = apt_pkg.Configuration()
    try:
        apt_pkg.read_config_file(config, path)
    except SystemError as error:
        raise ValueError(str(error).strip()) from None
    return [(key, [config.get(key), *config.value_list(key)]) for key in config.keys()]


def apt_commands(settings: Sequence[Tuple[str, List[str]]]) -> List[str]:
    """The keys among `settings` that name a command or move apt's programs or files."""
    found = []
    for key, values in settings:
        named = key.rstrip(":")
        if APT_COMMAND_KEY.search(named) and any(values):
            found.append(named)
        elif OPTIONS_KEY.search(named) and any(
                _dpkg_command_option(value.lstrip("-")) for value in values):
            found.append(named)
    return sorted(set(found))


def _dpkg_command_option(option: str) -> bool:
    name = re.split(r"[=\s]", option.strip(), maxsplit=1)[0].lower()
    return name in DPKG_COMMAND_OPTIONS


def dpkg_commands(text: str) -> List[str]:
    """The command-running options a dpkg.cfg file sets (dpkg.cfg(5): "option[=value]")."""
    options = (line.strip().lstrip("-") for line in text.splitlines())
    return sorted({re.split(r"[=\s]", option, maxsplit=1)[0] for option in options
                   if option and not option.startswith("#") and _dpkg_command_option(option)})


def _parts(patterns: Sequence[str], name: Pattern[str],
           ignored: Optional[Pattern[str]] = None) -> List[str]:
    """The files apt (or dpkg) reads: the main file, and the parts whose names it takes."""
    paths = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            base = os.path.basename(path)
            if "*" in pattern and (not name.match(base) or (ignored and ignored.search(base))):
                continue
            if os.path.isfile(path):
                paths.append(path)
    return paths


def problems(files: Dict[str, str]) -> List[str]:
    """apt's and dpkg's configuration files, not as a package installed them, that run
    commands: one finding each, with the settings and how to remove them."""
    found = []
    for path in _parts(APT_FILES, APT_PART_NAME, APT_IGNORED):
        if as_installed(path, files):
            continue
        try:
            keys = apt_commands(read_apt_file(path))
        except (OSError, ValueError) as error:
            found.append(f"apt configuration {path} cannot be read as apt reads it ({error}); "
                         "fix or remove it")
            continue
        if keys:
            found.append(f"apt configuration {path} runs commands as root at every apt run "
                         f"and no package installed it so: {', '.join(keys)} (remove the file "
                         "or those settings)")
    for path in _parts(DPKG_FILES, DPKG_PART_NAME):
        if as_installed(path, files):
            continue
        try:
            options = dpkg_commands(Path(path).read_text(encoding="utf-8", errors="replace"))
        except OSError as error:
            found.append(f"dpkg configuration {path} cannot be read ({error}); fix or remove it")
            continue
        if options:
            found.append(f"dpkg configuration {path} runs commands as root at every dpkg run "
                         f"and no package installed it so: {', '.join(options)} (remove the "
                         "file or those options)")
    return found
