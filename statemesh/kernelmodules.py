"""Kernel code of root's own, found before installing and by status: a module the kernel
holds that no key it trusts signed, and module files no package installed, which modprobe
loads at the next request or boot.

A module runs in the kernel: whatever it does (spawn a root shell at a network packet,
hide a process) nothing of the lockdown sees. Root before installing can load one
(`insmod`), or leave one for later: a file under /lib/modules/VERSION, loaded at boot by a
modules-load.d line or on demand by an alias (a socket of an unusual protocol family,
which a tenant's unprivileged workload can ask for).

Loaded: the kernel marks each module it could not vouch for, in its own taint flags
(/sys/module/NAME/taint) and, for good, in the kernel's (/proc/sys/kernel/tainted), which
an unload does not clear: E, not signed by a key the kernel trusts (Debian's and Ubuntu's
kernels sign every module they ship, and load an unsigned one all the same, marked, unless
Secure Boot enforces signatures); F, loaded by force. Root cannot take a mark back. O
(built outside the kernel's tree) is not judged: it is the module's own word (a module
says it was built in the tree, or not), and Ubuntu's packaged, signed NVIDIA drivers carry
it. Not caught: a module signed by a key the kernel trusts, such as a Machine Owner Key
the operator enrolled under Secure Boot.

On disk: every *.ko file (compressed or not) under lib/modules that dpkg has no record of,
DKMS's modules built on this machine among them (Debian's NVIDIA driver: without an
enrolled key, unsigned too). A packaged module's file replaced by another is not read here
(hashing thousands of modules at every status would cost seconds): loaded, it is marked E,
unless signed as above.

Only reads files; `root` stands in for / in tests.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

from statemesh import safefile
from statemesh.planted import named

ROOT = Path("/")
TAINTED = "proc/sys/kernel/tainted"
SYS_MODULE = "sys/module"
# The kernel's taint bits a module sets (include/linux/panic.h), with its letter for each.
MODULE_TAINTS = {1: "F", 13: "E"}
MEANINGS = {"F": "loaded by force", "E": "not signed by a key the kernel trusts"}
# Where modprobe finds modules: /lib/modules on Debian 12 (/usr/lib/modules through the
# /usr merge), /usr/lib/modules as Debian 13 ships them.
MODULE_DIRECTORIES = ("lib/modules", "usr/lib/modules")
MODULE_FILE = re.compile(r"\.ko(\.xz|\.zst|\.gz)?$")
# A kernel's links to its headers and sources, which depmod does not search.
DEPMOD_SKIPS = ("build", "source")


def _letters(flags: str) -> str:
    return "".join(letter for letter in flags if letter in MEANINGS)


def _module_marks(root: Path) -> Dict[str, str]:
    """Each loaded module the kernel marked, with its marks among F and E."""
    marks = {}
    directory = root / SYS_MODULE
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return marks
    for name in names:
        try:
            letters = _letters(safefile.read_text(directory / name / "taint").strip())
        except (OSError, UnicodeDecodeError):  # built in: no taint file
            continue
        if letters:
            marks[name] = letters
    return marks


def _kernel_marks(root: Path) -> str:
    """The letters among F and E the kernel carries since boot."""
    try:
        tainted = int(safefile.read_text(root / TAINTED).strip())
    except (OSError, ValueError):
        return ""
    return "".join(letter for bit, letter in sorted(MODULE_TAINTS.items())
                   if tainted >> bit & 1)


def _explained(letters: str) -> str:
    return ", ".join(f"{letter}: {MEANINGS[letter]}" for letter in letters)


def loaded_problems(root: Path = ROOT) -> List[str]:
    """Modules in the kernel that it could not vouch for; a mark left by one since unloaded."""
    marks = _module_marks(root)
    if marks:
        shown = [f"{name} ({_explained(letters)})" for name, letters in marks.items()]
        return [f"kernel modules loaded that the distribution's kernel does not vouch for, "
                f"running in the kernel with no check seeing what they do: {named(shown)} "
                "(rmmod them and reboot, or remove them and their DKMS package and reboot)"]
    left = _kernel_marks(root)
    if left:
        return [f"the kernel is marked since this boot by a module it could not vouch for, "
                f"since unloaded ({_explained(left)}): what it changed in the kernel stays "
                "until the next boot (reboot)"]
    return []


def _module_files(root: Path) -> List[str]:
    """Every module file under the module directories, as a path from `root` ("/lib/...").
    Each directory is walked once, however many ways lead to it (/lib/modules and
    /usr/lib/modules are one after the /usr merge), and a link to a directory is followed
    as depmod follows it: a module in /root reached through a link in /lib/modules loads."""
    found: List[str] = []
    seen: Set[Tuple[int, int]] = set()
    prefix = len(str(root).rstrip("/"))
    for directory in MODULE_DIRECTORIES:
        for here, dirs, names in os.walk(root / directory, followlinks=True):
            try:
                status = os.stat(here)
            except OSError:
                dirs.clear()
                continue
            if (status.st_dev, status.st_ino) in seen:
                dirs.clear()  # walked already, or a link back up the tree
                continue
            seen.add((status.st_dev, status.st_ino))
            if os.path.dirname(here) == str(root / directory):  # a kernel's own directory
                dirs[:] = [name for name in dirs if name not in DEPMOD_SKIPS]
            found += [os.path.join(here, name)[prefix:] for name in names
                      if MODULE_FILE.search(name)]
    return found


def _packaged(path: str, files: Dict[str, str]) -> bool:
    """Whether dpkg lists the file, under its own name or its /usr-merged twin."""
    twin = path[len("/usr"):] if path.startswith("/usr/") else "/usr" + path
    return path in files or twin in files


def file_problems(files: Dict[str, str], root: Path = ROOT) -> List[str]:
    """Module files no package installed (DKMS's built here among them)."""
    foreign = sorted(f"{root}{path}" if str(root) != "/" else path
                     for path in _module_files(root) if not _packaged(path, files))
    if not foreign:
        return []
    return [f"kernel module files no package installed, which modprobe loads as kernel code "
            f"at a request or at boot: {named(foreign)} (remove them and run depmod -a, or "
            "remove the DKMS package that built them)"]


def problems(files: Dict[str, str], root: Path = ROOT) -> List[str]:
    """Kernel code of root's own, loaded or left for later, that preflight refuses."""
    return loaded_problems(root) + file_problems(files, root)
