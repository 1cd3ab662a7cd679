"""Programs the kernel itself runs as root, found before installing: the module loader, the
uevent helper, binfmt_misc's interpreters, and the settings that name them at every boot.

The kernel runs these as root, with no terminal, whenever anyone asks, a tenant's
unprivileged workload included: kernel.modprobe at every module request (a socket of a
protocol family not loaded yet), the uevent helper (/sys/kernel/uevent_helper, which is
kernel.hotplug) at every device event (a loop device at every boot), and a binfmt_misc
registration's interpreter whenever a matching file is executed (with flag C as the file's
owner: root, for a setuid one). Root before installing can point any of them at a program
of its own, live or for every boot. Preflight refuses a machine where one names a program
not as a package installed it (statemesh.dpkgdb) or one others than root could replace
(statemesh.replaceable); a sysctl file not as a package installed it that sets one of them
or kernel.core_pattern (whose pipe the kernel runs at every crash: the memory guarantee's
own file, as it writes it, aside); a binfmt.d file not as a package installed it
(systemd-binfmt registers it at every boot); and a mount over the kernel's files that hides
what they say from these checks. binfmt_misc not mounted here holds no registration, but
for one kept from before an unmount (kernels before 6.7 keep them, and with them the
module in use): that is named too, since what it runs cannot be read.

Only reads files; `root` stands in for / in tests.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from statemesh import replaceable, safefile, volume
from statemesh.dpkgdb import as_installed
from statemesh.guarantees import memory
from statemesh.jobs import foreign, foreign_findings
from statemesh.planted import named

ROOT = Path("/")
# Programs the kernel runs as root, each named by a setting (with the kernel's default,
# which only the program that default leads to may replace): at every module request, at
# an orderly power-off (a hypervisor's shutdown request, a thermal event).
MODPROBE = "proc/sys/kernel/modprobe"
DEFAULT_MODULE_LOADER = "sbin/modprobe"  # kmod's link on Debian
POWEROFF_CMD = "proc/sys/kernel/poweroff_cmd"
DEFAULT_POWEROFF = "sbin/poweroff"
# At any process's crash, when core_pattern pipes (the memory guarantee keeps it so).
CORE_PATTERN = "proc/sys/kernel/core_pattern"
# And one by a fixed path: whenever any user asks for a key it does not hold.
REQUEST_KEY = "sbin/request-key"
UEVENT_HELPER = "sys/kernel/uevent_helper"
BINFMT_MISC = "proc/sys/fs/binfmt_misc"
BINFMT_CONTROL = frozenset({"register", "status"})  # binfmt_misc's own files, no registration
# In use while a binfmt_misc instance exists, mounted or not (an exec anywhere takes it
# for an instant); absent where binfmt_misc is built in.
BINFMT_MODULE_USERS = "sys/module/binfmt_misc/refcnt"
USERS_READS = 3
USERS_PAUSE = 0.01
MOUNTINFO = "proc/self/mountinfo"
# What may be mounted at the kernel's files read here or at a directory above them.
KERNEL_MOUNTS = {"/proc": ("proc",), "/sys": ("sysfs",),
                 f"/{BINFMT_MISC}": ("autofs", "binfmt_misc")}
# Read by systemd-sysctl at every boot (and procps's sysctl --system), and by ufw-init
# (IPT_SYSCTL in /etc/default/ufw, which statemesh.ufwfiles holds to this file); and
# systemd-binfmt's.
SYSCTL_FILES = ("etc/sysctl.conf", "etc/ufw/sysctl.conf", *(
    f"{base}/sysctl.d/*.conf" for base in ("etc", "run", "usr/local/lib", "usr/lib", "lib")))
BINFMT_FILES = tuple(f"{base}/binfmt.d/*.conf" for base in (
    "etc", "run", "usr/local/lib", "usr/lib", "lib"))
# The settings that name a program the kernel runs as root, as paths under /proc/sys.
HELPER_SETTINGS = ("kernel/modprobe", "kernel/hotplug", "kernel/core_pattern",
                   "kernel/poweroff_cmd")
# The characters of a key that is only a key; any other (a glob's, an escape, a blank)
# may match more than Python knows: glibc's glob() in systemd-sysctl, procps's own.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_./-]*")


def _kernel_text(path: Path, problems: List[str]) -> str:
    """A file of the kernel's, whole; "" when there is none (a kernel built without it).
    One that cannot be read (a FIFO put there: never waited on) goes into `problems`:
    what the kernel runs is then unknown."""
    try:
        return safefile.read_text(path, errors="surrogateescape")
    except FileNotFoundError:
        return ""
    except OSError as error:
        problems.append(f"cannot read {path} ({error.strerror}), so what the kernel runs as "
                        "root there is unknown (remove what hides it)")
        return ""


def _setting(text: str) -> str:
    """A string setting as the kernel shows it, without the newline it adds. Blanks stay:
    the kernel runs ' ' as '/ ', a file root could make."""
    return text[:-1] if text.endswith("\n") else text


def _not_packaged(program: str, files: Dict[str, str], root: Path) -> Optional[str]:
    """Why the program a kernel setting names is not one a package installed, as it
    installed it, that only root can change (None when it is)."""
    path = os.path.join(str(root), program.lstrip("/")) if program.startswith("/") else program
    why = replaceable.program_by_others(path, str(root))
    if why:
        return why
    return None if as_installed(path, files) else (
        f"{path} is not a program as a package installed it")


def _not_the_program(program: str, default: str, files: Dict[str, str],
                     root: Path) -> Optional[str]:
    """Why the program a kernel setting names is not the one its default leads to (kmod for
    /sbin/modprobe, systemctl for /sbin/poweroff), as installed: any other packaged program
    would run with the kernel's arguments, and an interpreter (python3 -q -- net-pf-NN, run
    from /) would run a file root left at that name."""
    why = _not_packaged(program, files, root)
    if why:
        return why
    path = os.path.join(str(root), program.lstrip("/"))
    if os.path.realpath(path) != os.path.realpath(root / default):
        return f"{path} is not the program /{default} leads to"
    return None


# The helpers a setting names whose default leads to one program: (the setting, that
# default, the setting's sysctl key, when the kernel runs it).
DEFAULTED_HELPERS = (
    (MODPROBE, DEFAULT_MODULE_LOADER, "kernel.modprobe", "at every module request, and anyone "
     "can make one (a socket of a protocol family not loaded yet)"),
    (POWEROFF_CMD, DEFAULT_POWEROFF, "kernel.poweroff_cmd", "at an orderly power-off (a "
     "hypervisor's shutdown request, a thermal event), and the node may live on after it"),
)


def _defaulted_helper_problems(files: Dict[str, str], root: Path, problems: List[str]) -> None:
    for setting, default, key, when in DEFAULTED_HELPERS:
        path = root / setting
        program = _setting(_kernel_text(path, problems))
        why = program and _not_the_program(program, default, files, root)
        if why:
            problems.append(f"{path} is {program!r}, which the kernel runs as root {when}: "
                            f"{why} (sysctl -w {key}=/{default})")


def _core_dump_handler_problem(files: Dict[str, str], root: Path, problems: List[str]) -> None:
    """The program a piped core_pattern names (the memory guarantee sets |/bin/false), run
    as root at any process's crash: a program as a package installed it, whatever it is."""
    core_pattern = root / CORE_PATTERN
    pattern = _setting(_kernel_text(core_pattern, problems))
    if not pattern.startswith("|"):
        return
    program = pattern[1:].split(" ", 1)[0]
    why = _not_packaged(program, files, root)
    if why:
        problems.append(f"{core_pattern} pipes core dumps to {program!r}, which the kernel runs "
                        f"as root at any process's crash: {why} (reinstall its package)")


def _request_key_problem(files: Dict[str, str], root: Path, problems: List[str]) -> None:
    request_key = root / REQUEST_KEY
    why = os.path.lexists(request_key) and _not_packaged(f"/{REQUEST_KEY}", files, root)
    if why:
        problems.append(f"the kernel runs {request_key} as root whenever any user asks for a "
                        f"key it does not hold: {why} (remove it, or reinstall keyutils)")


def _uevent_helper_problem(root: Path, problems: List[str]) -> None:
    uevent_helper = root / UEVENT_HELPER
    helper = _setting(_kernel_text(uevent_helper, problems))
    if helper:
        problems.append(f"{uevent_helper} is {helper!r}, which the kernel runs as root at "
                        f"every device event (a loop device at every boot) (echo > {uevent_helper})")


def helper_problems(files: Dict[str, str], root: Path = ROOT) -> List[str]:
    """The programs the kernel runs as root now, named by its settings or at fixed paths."""
    problems: List[str] = []
    for judge in (_defaulted_helper_problems, _core_dump_handler_problem, _request_key_problem):
        judge(files, root, problems)
    _uevent_helper_problem(root, problems)
    return problems


@dataclasses.dataclass(frozen=True)
class Registration:
    """A binfmt_misc registration as its file in binfmt_misc shows it."""

    enabled: bool
    interpreter: str
    flags: str

    @classmethod
    def read(cls, text: str) -> Registration:
        """From "enabled", "interpreter PATH", "flags: OC", ...: anything but "disabled"
        counts as enabled, a missing interpreter as none."""
        lines = text.split("\n")
        interpreter = next((line[len("interpreter "):] for line in lines
                            if line.startswith("interpreter ")), "")
        flags = next((line[len("flags:"):].strip() for line in lines
                      if line.startswith("flags:")), "")
        return cls(lines[0] != "disabled", interpreter, flags)


def registration_problems(files: Dict[str, str], root: Path = ROOT) -> List[str]:
    """Enabled binfmt_misc registrations whose interpreter is not a packaged program as
    installed, or that cannot be read."""
    directory = root / BINFMT_MISC
    if not (directory / "status").exists():  # not mounted (an automount mounts it here)
        return _unseen_registrations(directory, root / BINFMT_MODULE_USERS)
    found = []
    for name in sorted(set(_names(directory)) - BINFMT_CONTROL):
        try:
            entry = Registration.read(safefile.read_text(directory / name,
                                                         errors="surrogateescape"))
        except FileNotFoundError:  # removed meanwhile
            continue
        except OSError as error:  # a FIFO or a device too, never waited on
            found.append(f"{name} ({error.strerror})")
            continue
        why = entry.enabled and _not_packaged(entry.interpreter, files, root)
        if why:
            found.append(f"{name} (flags {entry.flags or 'none'}): {why}")
    if not found:
        return []
    return [f"binfmt_misc registrations whose interpreter the kernel runs whenever a matching "
            f"file is executed (as root for root's programs, and with flag C for a setuid "
            f"file): {named(found)} (echo -1 > {directory}/NAME for each)"]


def _names(directory: Path) -> List[str]:
    """Every name in the directory, dotfiles included; none when it cannot be listed."""
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _unseen_registrations(directory: Path, users: Path) -> List[str]:
    """binfmt_misc is not mounted here: a finding when the kernel still holds an instance
    (registrations survive an unmount before Linux 6.7, keeping the module in use)."""
    if not _in_use(users):
        return []
    return [f"binfmt_misc is not mounted at {directory}, but the kernel holds registrations "
            f"({users} is not 0): what they run cannot be read (mount -t binfmt_misc "
            f"binfmt_misc {directory} and run this again, or reboot)"]


def _in_use(users: Path) -> bool:
    """Whether a module's use count stays above 0 over a few reads (an exec anywhere
    takes binfmt_misc for an instant); False when it is not there to read."""
    for read in range(USERS_READS):
        if read:
            time.sleep(USERS_PAUSE)
        try:
            if int(safefile.read_text(users).strip()) <= 0:
                return False
        except (OSError, ValueError):
            return False
    return True


def _normalised(key: str) -> str:
    """A sysctl key as a path under /proc/sys (sysctl.d(5)): "/" or "." separate its
    names, and when the first separator is a dot, dots and slashes trade places; a
    leading "-" only lets it fail. `kernel//modprobe` names what `kernel/modprobe` does."""
    key = key.strip().lstrip("-")
    first = re.search(r"[./]", key)
    if first and first.group() == ".":
        key = key.translate(str.maketrans("./", "/."))
    return os.path.normpath(key).strip("/")


def _sets_a_helper(key: str) -> bool:
    """Whether a key may set one of the kernel's helper programs: one of them, or a key
    with more than plain characters (a glob as systemd-sysctl takes it, an escape) whose
    plain beginning could begin one."""
    plain = _PLAIN_KEY.match(key).group()
    if plain != key:
        return any(setting.startswith(plain) for setting in HELPER_SETTINGS)
    return key in HELPER_SETTINGS


def _helper_keys(text: str) -> List[str]:
    """The keys, as written, of the lines of a sysctl file that set a helper program."""
    keys = []
    for line in text.split("\n"):  # procps and systemd split at newlines only
        key, assigned, _value = line.strip().partition("=")
        if assigned and not key.startswith(("#", ";")) and _sets_a_helper(_normalised(key)):
            keys.append(key.strip())
    return keys


def _own_dropin(path: str, root: Path) -> bool:
    """The memory guarantee's sysctl drop-in, holding exactly what it writes."""
    own = root / memory.SYSCTL_DROPIN
    if path != str(own):
        return False
    try:
        return safefile.read_text(own) == memory.SYSCTL_SETTINGS
    except (OSError, UnicodeDecodeError):
        return False


def _patterns(root: Path, patterns: Sequence[str]) -> List[str]:
    return [str(root / pattern) for pattern in patterns]


def sysctl_problems(files: Dict[str, str], root: Path = ROOT) -> List[str]:
    """sysctl files not as a package installed them that set a helper program for every
    boot (a FIFO among them is named, never waited on)."""
    found = []
    for path in foreign(_patterns(root, SYSCTL_FILES), files):
        if _own_dropin(path, root):
            continue
        try:
            keys = _helper_keys(safefile.read_text(path, errors="surrogateescape"))
        except OSError as error:
            found.append(f"{path} ({error.strerror})")
            continue
        if keys:
            found.append(f"{path} ({', '.join(keys)})")
    if not found:
        return []
    return [f"sysctl files not as a package installed them set a program the kernel runs as "
            f"root (kernel.modprobe at module requests, kernel.hotplug at device events, "
            f"kernel.core_pattern at crashes) at every boot: {named(found)} (remove those "
            "lines, or the files)"]


def persistent_problems(files: Dict[str, str], root: Path = ROOT) -> List[str]:
    """What sets the kernel's helpers at every boot: sysctl files, binfmt.d files, and
    either kind where others than root could change it before then."""
    replaced = [why for pattern in _patterns(root, SYSCTL_FILES + BINFMT_FILES)
                for why in map(replaceable.by_others, sorted(glob.glob(pattern))) if why]
    problems = sysctl_problems(files, root) + foreign_findings(
        files, (_patterns(root, BINFMT_FILES), "binfmt.d files not as a package installed "
                "them, registered at every boot: the kernel runs their interpreters whenever "
                "a matching file is executed", "remove them, or reinstall their package"))
    if replaced:
        problems.append(f"sysctl or binfmt.d files others than root could change before the "
                        f"next boot: {named(replaced)} (remove them)")
    return problems


def mount_problems(root: Path = ROOT) -> List[str]:
    """Mounts over the kernel's files read here, or a directory above them, but for proc,
    sysfs and binfmt_misc's own (and its automount): one shows whatever its files say."""
    try:
        mountinfo = safefile.read_text(root / MOUNTINFO, errors="replace")
    except OSError:
        mountinfo = ""
    watched = [f"/{MODPROBE}", f"/{UEVENT_HELPER}", f"/{BINFMT_MISC}"]
    hiding = sorted({f"{mount.point} ({mount.fstype})"
                     for mount in volume.parse_mountinfo(mountinfo)
                     if any(_on_the_way(mount.point, path) for path in watched)
                     and mount.fstype not in KERNEL_MOUNTS.get(mount.point, ())})
    if not hiding:
        return []
    return [f"mounts over the kernel's files that name the programs it runs as root hide "
            f"them from these checks: {named(hiding)} (umount them)"]


def _on_the_way(point: str, path: str) -> bool:
    """Whether a mount at `point` changes what is read at `path`: at it, above it (but /)
    or below it."""
    return point != "/" and (point == path or path.startswith(point + "/")
                             or point.startswith(path + "/"))


def problems(files: Dict[str, str], root: Path = ROOT) -> List[str]:
    """Every program the kernel would run as root that preflight refuses, given what dpkg
    installed."""
    return (mount_problems(root) + helper_problems(files, root)
            + registration_problems(files, root) + persistent_problems(files, root))
