"""Code planted to be loaded by root's programs later, found before installing.

The operator is root before installing and can leave code that programs load by themselves
once the node is locked down, with no terminal and no login: the dynamic linker's preload
list and search path, the service manager's environment (every service inherits it), and
Python's startup hooks and module directories outside Debian's packages. The node's own
processes run isolated from Python's environment and site (statemesh-node is
`python3 -IS`), but the system's other root programs (unattended-upgrades, apt's hooks, any
timer) are not, so preflight refuses such a machine, naming each thing and how to remove
it. What dpkg installed, as it installed it (md5sums and conffiles), is never a finding.

Only reads files and dpkg's database.
"""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path
from typing import Dict, Iterable, List, Sequence

from debian.deb822 import Deb822

LD_SO_PRELOAD = Path("/etc/ld.so.preload")
LD_SO_CONF_D = Path("/etc/ld.so.conf.d")
# What the dynamic linker and Python take from a variable of a program's environment.
LOADER_VARIABLES = ("LD_PRELOAD", "LD_AUDIT", "LD_LIBRARY_PATH")
PYTHON_VARIABLE_PREFIX = "PYTHON"
DPKG_INFO = Path("/var/lib/dpkg/info")
DPKG_STATUS = Path("/var/lib/dpkg/status")
# Searched before Debian's own: a module or library here shadows the packaged one.
LOCAL_LIBRARY_DIRS = ("/usr/local/lib", "/usr/local/lib/x86_64-linux-gnu",
                      "/usr/local/lib/aarch64-linux-gnu")
LOCAL_PYTHON_GLOBS = ("/usr/local/lib/python3*/dist-packages",
                      "/usr/local/lib/python3*/site-packages",
                      "/root/.local/lib/python3*/site-packages")
# Run at every start of Python, unless -S: .pth files and these modules.
PYTHON_HOOK_GLOBS = ("/usr/lib/python3*/dist-packages/*.pth",
                     "/usr/lib/python3*/sitecustomize.py", "/usr/lib/python3*/usercustomize.py",
                     "/usr/lib/python3*/dist-packages/sitecustomize.py",
                     "/usr/lib/python3*/dist-packages/usercustomize.py")
SHOWN = 3  # paths named per finding; the rest are counted


def packaged_files(info: Path = DPKG_INFO, status: Path = DPKG_STATUS) -> Dict[str, str]:
    """Every file dpkg installed, with the md5 it installed it with: its packages' md5sums
    and its conffiles (a conffile's is the package's version, not the admin's)."""
    files: Dict[str, str] = {}
    for md5sums in info.glob("*.md5sums"):
        for line in md5sums.read_text(encoding="utf-8", errors="replace").splitlines():
            digest, _, path = line.partition("  ")
            if path:
                files["/" + path] = digest
    try:
        with open(status, encoding="utf-8") as database:
            for paragraph in Deb822.iter_paragraphs(database):
                for line in paragraph.get("Conffiles", "").splitlines():
                    words = line.split()
                    if len(words) >= 2:
                        files[words[0]] = words[1]
    except OSError:
        pass
    return files


def as_packaged(path: str, packaged: Dict[str, str]) -> bool:
    """The file is dpkg's and unchanged (a symlink is judged by the file it names)."""
    real = os.path.realpath(path)
    digest = packaged.get(path) or packaged.get(real)
    if digest is None:
        return False
    try:
        return hashlib.md5(Path(real).read_bytes()).hexdigest() == digest
    except OSError:
        return False


def named(paths: Sequence[str]) -> str:
    """The first few of `paths` and how many more: a finding stays one readable line."""
    shown = ", ".join(paths[:SHOWN])
    return shown if len(paths) <= SHOWN else f"{shown} and {len(paths) - SHOWN} more"


def preload_problems(path: Path = LD_SO_PRELOAD) -> List[str]:
    """A preload list loads its libraries into every program started, as root too."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as error:
        return [f"cannot read {path}: {error.strerror}"]
    libraries = [word for line in text.splitlines() for word in line.split("#", 1)[0].split()]
    if not libraries:
        return []
    return [f"{path} loads {named(libraries)} into every program, root's included "
            f"(remove {path})"]


def environment_problems(environment: Iterable[str]) -> List[str]:
    """What the service manager passes to every service that makes it load other code."""
    problems = []
    for assignment in environment:
        name = assignment.partition("=")[0]
        if name in LOADER_VARIABLES or name.startswith(PYTHON_VARIABLE_PREFIX):
            problems.append(f"the service manager's environment sets {name}, which every "
                            f"service inherits (systemctl unset-environment {name}, and "
                            "remove it from DefaultEnvironment= where it is set)")
    return problems


def library_problems(packaged: Dict[str, str],
                     local_dirs: Sequence[str] = LOCAL_LIBRARY_DIRS,
                     conf_d: Path = LD_SO_CONF_D) -> List[str]:
    """Shared libraries the dynamic linker finds before Debian's, and search paths added."""
    problems = []
    for directory in local_dirs:
        libraries = sorted(glob.glob(f"{directory}/*.so*"))
        if libraries:
            problems.append(f"shared libraries in {directory}, searched before the system's: "
                            f"{named(libraries)} (remove them, then run ldconfig)")
    added = sorted(str(conf) for conf in conf_d.glob("*.conf")
                   if not as_packaged(str(conf), packaged))
    if added:
        problems.append(f"library search paths not from a package: {named(added)} "
                        "(remove them, then run ldconfig)")
    return problems


def python_problems(packaged: Dict[str, str],
                    local_globs: Sequence[str] = LOCAL_PYTHON_GLOBS,
                    hook_globs: Sequence[str] = PYTHON_HOOK_GLOBS) -> List[str]:
    """Python code outside Debian's packages that root's Python programs would run."""
    problems = []
    for pattern in local_globs:
        for directory in sorted(glob.glob(pattern)):
            modules = sorted(str(entry) for entry in Path(directory).iterdir())
            if modules:
                problems.append(f"Python modules in {directory} come before Debian's for "
                                f"root's Python programs: {named(modules)} (remove them)")
    hooks = sorted({path for pattern in hook_globs for path in glob.glob(pattern)
                    if not as_packaged(path, packaged)})
    if hooks:
        problems.append(f"Python startup hooks not as a package installed them, run by every "
                        f"Python program: {named(hooks)} (remove them, or reinstall "
                        "their package)")
    return problems


def problems(environment: Iterable[str], packaged: Dict[str, str]) -> List[str]:
    """Every planted thing preflight refuses, given the service manager's environment and
    what dpkg installed."""
    return (preload_problems() + environment_problems(environment)
            + library_problems(packaged) + python_problems(packaged))
