"""The kernel's command line: what this boot ran with, and what GRUB boots with next.

Root before installing can put arguments on the kernel's command line that open a way in
at every boot, past everything the installation does: `init=/bin/sh` (no systemd: a root
shell on the console), `systemd.run=` (a command run as root by kernel-command-line.service,
which the boot wants), `systemd.setenv=` (the environment of every service: LD_PRELOAD),
`systemd.mask=` (the package's own units never started), `systemd.wants=`, a shell on a
crash or on tty9, a target or runlevel other than the normal ones. GRUB's settings are
where such arguments persist: update-grub, which the installation itself runs (the
rescue guarantee), writes them into grub.cfg.

Preflight refuses them in /proc/cmdline (this boot) and in the values GRUB_CMDLINE_LINUX
and GRUB_CMDLINE_LINUX_DEFAULT take from /etc/default/grub and /etc/default/grub.d/*.cfg,
read in update-grub's order without a shell: statemesh.jobs refuses a settings file that
does more than set GRUB_* variables to quoted or plain values, so the values are read here
as text (`$GRUB_X` expanded). status names them again (its planted line).

GRUB also reads /boot/grub/custom.cfg at every boot, when it exists (Debian's 41_custom
writes the line that sources it): menu entries and commands of root's own, which no
update-grub rewrites, so a non-empty one is refused. A grub.cfg edited by hand is rewritten
by the update-grub the installation runs (statemesh.guarantees.rescue). These are a
tripwire, not a boundary: grubenv, GRUB's modules and a configuration built into its core
image are not read here (README's honest limits).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from statemesh import planted, safefile

KERNEL_COMMAND_LINE = Path("/proc/cmdline")
GRUB_DEFAULTS = Path("/etc/default/grub")
GRUB_DEFAULTS_DIR = Path("/etc/default/grub.d")
GRUB_CUSTOM = Path("/boot/grub/custom.cfg")
# Where GRUB's scripts take the Linux command line from (the recovery entry's and Xen's
# too: a later drop-in can turn recovery entries on again).
# GRUB_DEVICE* too: grub-mkconfig probes them, then reads the settings files, which may set
# them, and 10_linux writes root=$GRUB_DEVICE when told not to use the UUID.
GRUB_COMMAND_LINES = ("GRUB_CMDLINE_LINUX", "GRUB_CMDLINE_LINUX_DEFAULT",
                      "GRUB_CMDLINE_LINUX_RECOVERY", "GRUB_CMDLINE_LINUX_XEN_REPLACE",
                      "GRUB_CMDLINE_LINUX_XEN_REPLACE_DEFAULT", "GRUB_DEVICE",
                      "GRUB_DEVICE_UUID", "GRUB_DEVICE_PARTUUID")
# The one GRUB variable a stock grub.cfg puts on a Linux line (Ubuntu's 10_linux).
GRUB_OWN_VARIABLES = frozenset({"$vt_handoff"})
# How much of custom.cfg is read: it is a short script, or it is something else.
CUSTOM_CFG_LIMIT = 1 << 20
# Arguments that run something as root, or keep the node's units from running, at boot
# (keys as systemd compares them: "-" and "_" alike). init= is refused but for systemd.
REFUSED_KEYS = frozenset({
    "init", "rdinit", "systemd.run", "systemd.run_success_action",
    "systemd.run_failure_action", "systemd.wants", "systemd.mask", "systemd.setenv",
    "systemd.ssh_listen", "systemd.ssh_auto", "systemd.set_credential",
    "systemd.set_credential_binary", "rd.systemd.run", "rd.systemd.wants",
    "rd.systemd.mask", "rd.break", "break",
    # The kernel runs these as root: on every module request, on every core dump ("|..."),
    # on every device event (kernel.hotplug, the uevent helper), at an orderly power-off. The
    # kernel takes "/" for "." in these keys (sysctl/kernel/hotplug), as the spelling below does.
    "sysctl.kernel.modprobe", "sysctl.kernel.core_pattern", "sysctl.kernel.hotplug",
    "sysctl.kernel.poweroff_cmd",
})
SYSTEMD_AS_INIT = frozenset({"/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd",
                             "/usr/sbin/init"})
# Switches that are harmless only when off (`systemd.debug_shell=0`, `rd.shell=0`).
REFUSED_SWITCHES = frozenset({"systemd.debug_shell", "systemd.crash_shell",
                              "systemd.confirm_spawn", "rd.systemd.debug_shell", "rd.shell"})
OFF = frozenset({"0", "no", "false", "off"})
# Single-user and emergency boots by runlevel or name (SysV style, and the initramfs's).
REFUSED_WORDS = frozenset({"single", "s", "S", "-s", "1", "emergency", "-b", "rescue",
                           "rd.break", "rd.shell", "rd.emergency", "rd.rescue", "break"})
NORMAL_TARGETS = frozenset({"default.target", "multi-user.target", "graphical.target",
                            "runlevel2.target", "runlevel3.target", "runlevel4.target",
                            "runlevel5.target"})
_ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?(GRUB_[A-Z0-9_]+)=(.*)$")
_EXPANSION = re.compile(r"\$\{?(GRUB_[A-Z0-9_]+)\}?")


def words_of(arguments: str) -> List[str]:
    """The words of a command line with their quoting taken off, as systemd reads its own
    arguments (and GRUB a Linux line, and sh a GRUB setting): `'init=/bin/sh'`,
    `i"n"it=/bin/sh` and `init\\=/bin/sh` are all init=/bin/sh, and a quoted blank joins.
    Unbalanced quoting: split at blanks, every quote and backslash dropped."""
    try:
        return shlex.split(arguments, posix=True)
    except ValueError:
        return [re.sub(r"[\"'\\]", "", word) for word in arguments.split()]


def _refused_word(word: str) -> bool:
    key, has_value, value = word.partition("=")
    if not has_value:
        return key in REFUSED_WORDS or key.replace("-", "_") in REFUSED_SWITCHES
    if "." not in key and planted.loads_code(key):
        return True  # for init's own environment (the kernel hands it NAME=value)
    key = key.replace("-", "_").replace("/", ".")
    if key == "init":
        return value not in SYSTEMD_AS_INIT
    if key in REFUSED_KEYS:
        return True
    if key in REFUSED_SWITCHES:
        return value.lower() not in OFF
    return key in ("systemd.unit", "rd.systemd.unit") and value not in NORMAL_TARGETS


def refused(arguments: str) -> List[str]:
    """The arguments of a kernel command line that open a way in at boot (unquoted, see
    words_of): those above; a variable for init's own environment that makes it load code
    (the kernel hands PID 1 any NAME=value without a dot: LD_PRELOAD=); everything after
    `--`, which is PID 1's own command line."""
    return _refused_among(words_of(arguments))


def _refused_among(words: List[str]) -> List[str]:
    end = words.index("--") if "--" in words else len(words)
    return [word for word in words[:end] if _refused_word(word)] + words[end:]


def refused_by_grub(arguments: str) -> List[str]:
    """What GRUB's settings would put on the command line that opens a way in: the words
    refused above, and words with a `$` (GRUB fills the variable in at boot, from its
    environment block, which root writes with grub-editenv)."""
    words = words_of(arguments)
    found = _refused_among(words)
    return found + [word for word in words
                    if "$" in word and word not in GRUB_OWN_VARIABLES and word not in found]


def _value(text: str, settings: Dict[str, str]) -> str:
    """A GRUB_* assignment's value as the shell would give it (see the module docstring)."""
    text = text.strip()
    if text.startswith("'"):
        return text[1:].split("'", 1)[0]
    if text.startswith('"'):
        quoted = text[1:].split('"', 1)[0]
        return _EXPANSION.sub(lambda m: settings.get(m.group(1), ""), quoted)
    return text.split("#", 1)[0].strip()


def settings_of(text: str, settings: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The GRUB_* variables a settings file's text sets, over `settings` (what the files
    before it set); lines as the shell splits them, at newlines only."""
    settings = dict(settings or {})
    for line in text.split("\n"):
        assignment = _ASSIGNMENT.match(line)
        if assignment and not assignment.group(2).startswith("`"):
            settings[assignment.group(1)] = _value(assignment.group(2), settings)
    return settings


def grub_settings(files: Sequence[Path]) -> Dict[str, str]:
    """The GRUB_* variables the files set, in order, later ones overriding."""
    settings: Dict[str, str] = {}
    for path in files:
        try:
            settings = settings_of(safefile.read_text(path, errors="replace"), settings)
        except OSError:  # a FIFO or a device too, never waited on (statemesh.jobs names it)
            continue
    return settings


def grub_files(defaults: Path = GRUB_DEFAULTS, directory: Path = GRUB_DEFAULTS_DIR) -> List[Path]:
    """update-grub's order: the defaults file, then the drop-ins by name (the shell's glob:
    no dotfiles)."""
    return [defaults, *sorted(path for path in directory.glob("*.cfg")
                              if not path.name.startswith("."))]


def _custom_cfg_problem(custom: Path) -> Optional[str]:
    """What GRUB's custom.cfg holds past blank lines and comments: "holds commands", or
    why it cannot be read (a loop of links, an I/O error, a FIFO or a device, never waited
    on), which counts as holding some; None when it holds none or is not there."""
    try:
        with safefile.open_regular(custom) as handle:
            text = handle.read(CUSTOM_CFG_LIMIT).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"cannot be read ({error.strerror}), so may hold commands"
    commands = any(line.strip() and not line.strip().startswith("#") for line in text.split("\n"))
    return "holds commands" if commands else None


def problems(cmdline: Path = KERNEL_COMMAND_LINE, files: Sequence[Path] = (),
             custom: Path = GRUB_CUSTOM) -> List[str]:
    """Preflight's lines for what this boot's command line and GRUB's next one hold."""
    found = []
    booted = refused(cmdline.read_text(encoding="utf-8", errors="replace"))
    if booted:
        found.append(f"this boot's kernel command line has {' '.join(booted)}, which runs "
                     "something as root at boot or keeps the node's units from running "
                     "(boot without it)")
    settings = grub_settings(files or grub_files())
    planted = refused_by_grub(" ".join(settings.get(name, "") for name in GRUB_COMMAND_LINES))
    if planted:
        found.append(f"GRUB's settings put {' '.join(planted)} on the kernel command line of "
                     "every boot, which runs something as root or keeps the node's units "
                     "from running (remove it from /etc/default/grub and "
                     "/etc/default/grub.d)")
    custom_problem = _custom_cfg_problem(custom)
    if custom_problem:
        found.append(f"{custom} {custom_problem}, which GRUB runs at every boot past what "
                     "update-grub writes (menu entries with a kernel command line of root's "
                     "choosing): remove it")
    return found
