"""ufw's boot-time files: the scripts ufw.service runs as root and the rules it loads into
the kernel, at every boot.

ufw.service runs `/lib/ufw/ufw-init start` at every boot; `ufw enable` runs it too, and the
firewall guarantee's reload runs `ufw-init force-reload`. ufw-init runs /etc/ufw/before.init
and after.init as root whenever they are executable (by anyone: root's `test -x`), with no
terminal, so an operator who writes commands into one and makes it executable has them run
at every boot of the locked-down node. Before anything else it sources /etc/default/ufw and
/etc/ufw/ufw.conf as shell: a command there runs as root too, and so does a setting of its
own (PATH, for the programs it runs after); they pass while they hold ufw's settings only,
literal values whoever wrote them (statemesh.shsettings). It loads before.rules,
before6.rules, after.rules and after6.rules into ufw's own chains with iptables-restore,
chains the firewall check does not read (it reads INPUT and ufw's user chain): an accept
added to before.rules opens a port that the firewall's finding would not name. It loads
user.rules and user6.rules too, which ufw writes itself: a line root adds there (while the
installing session is spared, after `ufw enable` wrote them) reaches any chain as well.

ufw's postinst copies each of these files from its template (/usr/share/ufw/before.init,
/usr/share/ufw/iptables/before.rules, ...), files of the ufw package. So an init script
passes when it is not executable (ufw-init never runs it) or holds its template's bytes
(which do nothing), and a rules file when it holds its template's bytes; a template counts
only as the ufw package installed it (statemesh.dpkgdb), since root could have edited both.
A users' rules file passes when each line is one ufw writes there.
A link is judged by where it leads, and so is /etc/ufw itself (statemesh.replaceable); a
FIFO or a device is named, never read (statemesh.safefile). Without ufw-init nothing runs or
loads these files: there is nothing to judge, and the firewall guarantee names ufw missing.

Only reads files.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from statemesh import replaceable, safefile, shsettings
from statemesh.dpkgdb import as_installed

PACKAGES = ("ufw",)  # whose files the templates are
INIT_SCRIPTS = ("before.init", "after.init")
RULES_FILES = ("before.rules", "before6.rules", "after.rules", "after6.rules")
# Any execute bit: root's `test -x`, which ufw-init asks, is true for each.
EXECUTABLE = stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
RUNS = "ufw.service runs it as root at every boot while it is executable"
SOURCES = "ufw.service sources it as shell, as root, at every boot"
# The sysctl file ufw-init applies at every boot (IPT_SYSCTL, as shipped): the one whose
# settings statemesh.kernelhelpers reads for programs the kernel would run as root.
UFW_SYSCTL = "/etc/ufw/sysctl.conf"
# ufw's settings (ufw-framework(8)), the only names its sourced files may assign, each
# with its own values: ufw-init splits and globs some of them unquoted, from / (`modprobe
# $m` for each word of IPT_MODULES: a word starting with "-" is an option, a "*" matches a
# file root left there, so `--config=x*` reads root's modprobe.conf and its install
# commands), so a value is a plain word of that setting's kind, a module list only quoted.
_MODULE = "[A-Za-z0-9_][A-Za-z0-9_-]*"
_UFW_VALUES = {
    "(?:IPV6|MANAGE_BUILTINS|ENABLED)": shsettings.literal("[A-Za-z]*"),
    "LOGLEVEL": shsettings.literal("[a-z]*"),
    "DEFAULT_(?:INPUT|OUTPUT|FORWARD|APPLICATION)_POLICY": shsettings.literal("[A-Z]*"),
    "IPT_SYSCTL": shsettings.literal("(?:/[A-Za-z0-9_.-]+)*"),
    "IPT_MODULES": shsettings.literal(f"(?:{_MODULE})?", f"(?:{_MODULE}(?: +{_MODULE})*)?"),
}
UFW_SETTING = re.compile("|".join(f"(?:{shsettings.setting_pattern(name, value=value).pattern})"
                                  for name, value in _UFW_VALUES.items()))
LOADS = "ufw.service loads it into the kernel at every boot"
# ufw's users' rules files: written by ufw itself (`ufw allow`, `ufw enable`), from no
# template, and loaded at every boot like the others. What ufw writes in them: the filter
# table, its chains' declarations, rules in its user chains (which the firewall check reads
# live, from ufw-user-input on) and, in its logging chains, LOG or RETURN rules made of the
# options below only (a rule's own matches, conntrack, limit and the log prefix).
USER_RULES_FILES = ("user.rules", "user6.rules")
_USER_CHAIN = re.compile(r"ufw6?-user-(?:input|output|forward|limit|limit-accept)")
_LOGGING_CHAIN = re.compile(
    r"ufw6?-(?:(?:before|after|user)-logging-(?:input|output|forward)|logging-(?:deny|allow))")
_DECLARATION = re.compile(r":([^ ]+) - \[[0-9]+:[0-9]+\]")
_PRINTABLE = re.compile(r"[ -~]*")  # what ufw writes: no tab, no control character
# Each takes one value; spelled out in full (getopt takes `--jum` for --jump).
_LOGGING_OPTIONS = frozenset({"-p", "-s", "-d", "-i", "-o", "--sport", "--dport", "--sports",
                              "--dports", "-m", "--ctstate", "--limit", "--limit-burst",
                              "--log-prefix", "--comment", "-j"})
_LOGGING_MODULES = frozenset({"conntrack", "limit", "multiport", "comment"})
_LOGGING_TARGETS = frozenset({"LOG", "RETURN"})
# iptables-restore reads a line into a buffer of 10240 bytes (fgets): a longer one is read as
# two, the second unseen by a check of the first (a comment, say). ufw writes short lines.
RESTORE_LINE_MAX = 4096
SHOWN_MAX = 200  # characters of a line a finding quotes


@dataclasses.dataclass(frozen=True)
class Places:
    """Where ufw-init, ufw's boot-time files and their templates are (tests give
    stand-ins)."""

    init: str = "/lib/ufw/ufw-init"
    etc: str = "/etc/ufw"
    defaults: str = "/etc/default/ufw"
    templates: str = "/usr/share/ufw"

    def file(self, name: str) -> str:
        return os.path.join(self.etc, name)

    def sourced(self) -> Tuple[str, str]:
        """The files ufw-init sources as shell, in its order."""
        return (self.defaults, self.file("ufw.conf"))

    def script_template(self, name: str) -> str:
        return os.path.join(self.templates, name)

    def rules_template(self, name: str) -> str:
        return os.path.join(self.templates, "iptables", name)


UFW = Places()


def _not_regular(path: str) -> Optional[str]:
    """`path` named as what it leads to when that is no regular file (a FIFO, a device):
    never opened. None for a regular file, or nothing there."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else f"{path} is {safefile.kind_of(mode)}, not a regular file"


def _misplaced(path: str) -> Optional[str]:
    """Why what is at `path` is not a file of root's that ufw-init could read as it is: a
    link others could fill later (into /tmp), a file others may write, a FIFO or a device."""
    return replaceable.by_others(path) or _not_regular(path)


def _unvouched(template: str, files: Dict[str, str]) -> Optional[str]:
    """Why `template` is no measure of what ufw's package meant (None when it is one)."""
    if as_installed(template, files):
        return None
    return f"cannot be compared with {template}, which is not as the ufw package installed it"


def _same(path: str, template: str) -> bool:
    """Whether the regular file at `path` holds exactly the template's bytes."""
    try:
        return safefile.read_bytes(path) == safefile.read_bytes(template)
    except OSError:  # swapped for a FIFO since it was looked at, or unreadable: not the same
        return False


def script_problem(path: str, template: str, files: Dict[str, str]) -> Optional[str]:
    """The finding for an init script ufw-init runs, if any: a missing or non-executable one
    is never run, and one holding its template's bytes does nothing."""
    misplaced = _misplaced(path)
    if misplaced:
        return f"{misplaced}: {RUNS} (rm {path})"
    try:
        if not os.stat(path).st_mode & EXECUTABLE:
            return None
    except FileNotFoundError:
        return None
    unvouched = _unvouched(template, files)
    if unvouched:
        return f"{path} is executable and {unvouched}: {RUNS} (chmod -x {path})"
    if not _same(path, template):
        return (f"{path} is executable and differs from the ufw package's {template}: {RUNS} "
                f"(chmod -x {path})")
    return None


def rules_problem(path: str, template: str, files: Dict[str, str]) -> Optional[str]:
    """The finding for a rules file ufw-init loads, if any. A missing one is one too: ufw's
    command refuses to run without it ("Couldn't stat"), so the installation could not set
    the firewall, and ufw-init loads the other files without it and fails, ufw.service with
    it, at every boot."""
    restore = f"cp {template} {path}"
    misplaced = _misplaced(path)
    if misplaced:
        return f"{misplaced}: {LOADS} (rm {path}, then {restore})"
    if not os.path.exists(path):
        return f"{path} is missing: {LOADS}, and ufw refuses to run without it ({restore})"
    unvouched = _unvouched(template, files)
    if unvouched:
        return f"{path} {unvouched}: {LOADS} (apt-get install --reinstall ufw, then {restore})"
    if not _same(path, template):
        return f"{path} differs from the ufw package's {template}: {LOADS} ({restore})"
    return None


def restore_words(line: str) -> List[str]:
    """The words iptables-restore makes of a rule line (add_param_to_argv): split at spaces,
    tabs and newlines outside double quotes, which it takes off, a backslash escaping the
    next character inside them; a closing quote ends a word."""
    words: List[str] = []
    word: List[str] = []
    quoted = escaped = False
    for char in line:
        if quoted:
            if escaped:
                word.append(char)
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
                words.append("".join(word))
                word = []
            else:
                word.append(char)
        elif char == '"':
            quoted = True
        elif char in " \t\n":
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(char)
    if word:
        words.append("".join(word))
    return words


def is_ufws_own_line(line: str) -> bool:
    """Whether a line of a users' rules file is one ufw writes there, as iptables-restore
    reads it: an accept in a chain of ufw's own that the check does not read, another table,
    a policy, a target hidden in a quoted word or behind an abbreviated option, is not."""
    if len(line) >= RESTORE_LINE_MAX or not _PRINTABLE.fullmatch(line):
        return False  # read as two lines; a tab, a control character: ufw writes none
    if not line or line.startswith("#") or line in ("*filter", "COMMIT"):
        return True
    declared = _DECLARATION.fullmatch(line)
    if declared:
        return bool(_USER_CHAIN.fullmatch(declared.group(1))
                    or _LOGGING_CHAIN.fullmatch(declared.group(1)))
    words = restore_words(line)
    if len(words) < 2 or words[0] not in ("-A", "-I"):
        return False
    if _USER_CHAIN.fullmatch(words[1]):
        return True
    return bool(_LOGGING_CHAIN.fullmatch(words[1])) and _logs_or_returns(words[2:])


def _logs_or_returns(words: Sequence[str]) -> bool:
    """Whether a logging chain's rule, past its chain, is options ufw writes there, each
    with its value, jumping once, to LOG or RETURN."""
    options, values = words[0::2], words[1::2]
    if len(options) != len(values) or not set(options) <= _LOGGING_OPTIONS:
        return False
    pairs = list(zip(options, values))
    targets = [value for option, value in pairs if option == "-j"]
    modules = {value for option, value in pairs if option == "-m"}
    return len(targets) == 1 and targets[0] in _LOGGING_TARGETS and modules <= _LOGGING_MODULES


def user_rules_problem(path: str) -> Optional[str]:
    """The finding for a users' rules file ufw-init loads, if any: each line must be one
    ufw writes (a missing file is ufw's own to make again, at `ufw enable`)."""
    misplaced = _misplaced(path)
    if misplaced:
        return f"{misplaced}: {LOADS} (rm {path}, then ufw --force enable)"
    try:
        text = safefile.read_text(path)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        return f"{path} cannot be read ({error}): {LOADS}"
    foreign = [line.strip() for line in text.split("\n") if not is_ufws_own_line(line)]
    if not foreign:
        return None
    shown = "; ".join(repr(line if len(line) <= SHOWN_MAX else line[:SHOWN_MAX] + "...")
                      for line in foreign[:3])
    more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
    return (f"{path} holds lines ufw does not write there: {shown}{more}: {LOADS}, into chains "
            f"the firewall check does not read (delete them, or `ufw --force enable`, which "
            f"writes the file again from ufw's own rules)")


def sourced_problem(path: str) -> Optional[str]:
    """The finding for a file ufw-init sources, if any: anything but ufw's settings with
    literal values (a missing one stops ufw-init before it loads anything, which the
    firewall guarantee names)."""
    misplaced = _misplaced(path)
    if misplaced:
        return f"{misplaced}: {SOURCES} (rm {path}, then reinstall ufw)"
    if not os.path.exists(path) or shsettings.settings_only(Path(path), UFW_SETTING):
        return None
    return (f"{path} holds more than ufw's settings with literal values: {SOURCES} (keep only "
            "lines such as ENABLED=yes, and comments)")


def _last_value(path: str, name: str) -> Optional[str]:
    """The value a settings-only file (shsettings) leaves in `name`, quotes and comment
    taken off; None when it sets none."""
    value = None
    try:
        lines = safefile.read_text(path).split("\n")
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        found = re.match(rf"^[ \t]*(?:export[ \t]+)?{name}=(.*)$", line)
        if found:
            value = re.sub(r"[ \t]+#.*$", "", found.group(1)).strip().strip("\"'")
    return value


def sysctl_file_problem(sourced: Sequence[str]) -> Optional[str]:
    """The finding when ufw-init would apply another sysctl file than its own at every boot
    (`sysctl -p $IPT_SYSCTL`), as the last of the files it sources leaves IPT_SYSCTL."""
    values = [(path, _last_value(path, "IPT_SYSCTL")) for path in sourced]
    path, value = next(((path, value) for path, value in reversed(values)
                        if value is not None), ("", None))
    if value in (None, "", UFW_SYSCTL):
        return None
    return (f"{path} sets IPT_SYSCTL={value}: ufw.service applies it with sysctl, as root, "
            f"at every boot, where only {UFW_SYSCTL} is read for what it sets "
            f"(IPT_SYSCTL={UFW_SYSCTL})")


def installed(places: Places = UFW) -> bool:
    """Whether ufw-init is there to run or load anything."""
    return os.path.exists(places.init)


def rules_problems(files: Dict[str, str], places: Places = UFW) -> Dict[str, str]:
    """Each rules file ufw.service would load other than as the ufw package meant it, and
    /etc/ufw itself when others could put files in it later, with its finding."""
    if not installed(places):
        return {}
    found = {}
    directory = replaceable.by_others(places.etc)
    if directory:
        found[places.etc] = (f"{directory}: ufw.service runs and loads the files in it at every "
                             f"boot (make {places.etc} a directory only root may write)")
    for name in RULES_FILES:
        path = places.file(name)
        problem = rules_problem(path, places.rules_template(name), files)
        if problem:
            found[path] = problem
    for name in USER_RULES_FILES:
        path = places.file(name)
        problem = user_rules_problem(path)
        if problem:
            found[path] = problem
    return found


def script_problems(files: Dict[str, str], places: Places = UFW) -> List[str]:
    """Each init script ufw.service would run as root that its package did not write so,
    and each file it sources that holds more than settings."""
    if not installed(places):
        return []
    found = [script_problem(places.file(name), places.script_template(name), files)
             for name in INIT_SCRIPTS]
    sourced = [sourced_problem(path) for path in places.sourced()]
    found += sourced
    if not any(sourced):  # settings only: what they leave in IPT_SYSCTL can be read
        found.append(sysctl_file_problem(places.sourced()))
    return [problem for problem in found if problem]


def problems(files: Dict[str, str], places: Places = UFW) -> List[str]:
    """Every finding about ufw's boot-time files, given what dpkg installed."""
    return script_problems(files, places) + list(rules_problems(files, places).values())
