"""Commands in network configuration, which packaged services run as root later.

The network's own programs run commands their configuration names, as root, with no
terminal: ifupdown (Debian's default networking) the `up`, `down` and pre-/post- options of
an interface's stanza whenever the interface goes up or down, at every boot, and a
mapping's `script`; wg-quick the PreUp, PostUp, PreDown and PostDown of a WireGuard
interface (wg-quick@NAME); OpenVPN the scripts and plugins its `up`, `down`,
`client-connect` and kindred options name (openvpn@NAME and the client and server units).
These files are the operator's (installers and administrators write them; no package ships
them so), so whether they are as a package installed them tells nothing. What they say
does: a command in one is a way back in as root once the node is locked down, and
preflight refuses it, naming the file and its lines.

ifupdown's files are read as ifupdown reads them (interfaces(5)): a line beginning with `#`
is a comment (dropped before a line ending in `\\` is joined to the next), and `source`
(shell patterns) and `source-directory` (any word starting `source-dir`; the names run-parts
accepts) read other files; a relative path is read from the including file's directory and
from /etc/network both, whichever ifupdown meant. ifupdown pastes every option's value into
the commands it runs with /bin/sh, so a value with shell syntax in it (`mtu 1500;/root/x`)
is a command too; ifupdown2 spells options with `_` as well. wg-quick takes its keys in any
case; OpenVPN's options may carry the command line's `--`, quotes, or a byte order mark
before them. Only regular files are read: a FIFO or a device would hold the reader, and is
named instead (its program reads whatever is written into it, or waits at boot).

Honest limit: these are three programs' ways to run commands; a program of another name
that runs what its configuration says (a VPN client, a monitoring agent, ifupdown2's Mako
templates, a PPP peer file) is not read here.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Dict, Iterator, List, Sequence, Set, Tuple

from statemesh import replaceable, safefile
from statemesh.planted import named

INTERFACES = "/etc/network/interfaces"
# ifupdown's options that run a command (post-up is up's other name, pre-down down's), and
# a mapping stanza's script; ifupdown2 spells them with "_" too.
IFUPDOWN_COMMANDS = frozenset({"pre-up", "up", "post-up", "down", "pre-down", "post-down",
                               "script"})
# ifupdown pastes every option's value into the commands of its methods, run by /bin/sh
# (`mtu 1500;/root/x`): a value holding what a shell takes for more than words runs it.
SHELL_SYNTAX = re.compile(r"[;&|`$()<>\\\n]")
SOURCE_DIRECTORY_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
WIREGUARD_FILES = ("/etc/wireguard/*.conf",)
WIREGUARD_COMMAND = re.compile(r"^\s*(preup|postup|predown|postdown)\s*=", re.IGNORECASE)
OPENVPN_FILES = ("/etc/openvpn/*.conf", "/etc/openvpn/client/*.conf",
                 "/etc/openvpn/server/*.conf")
# OpenVPN's options that run a program or load one (plugin, providers), or read more
# options (config).
OPENVPN_COMMANDS = frozenset({"up", "down", "route-up", "route-pre-down", "ipchange",
                              "client-connect", "client-disconnect", "client-crresponse",
                              "learn-address", "auth-user-pass-verify", "tls-verify",
                              "tls-crypt-v2-verify", "iproute", "dns-updown", "plugin",
                              "pkcs11-providers", "providers", "config"})
# A file's lines named in a finding: each is something to remove before installing.
LINES_SHOWN = 5

# (file, line number, option) of one command found.
Found = Tuple[str, int, str]


def _logical_lines(text: str) -> Iterator[Tuple[int, str]]:
    """ifupdown's lines: (number of the first physical line, text). A comment line is
    dropped before continuations are joined, as ifupdown drops it."""
    pending, first = "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("#"):
            continue
        if not pending:
            first = number
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        yield first, pending + line
        pending = ""
    if pending:
        yield first, pending


def _replaceable(path: str, found: List[Found]) -> None:
    """Into `found` when someone other than root could change the file later (a link into
    /tmp reads as nothing today)."""
    why = replaceable.by_others(path)
    if why:
        found.append((path, 0, f"{why} (its program runs the commands written there)"))


def _read(path: str, found: List[Found]) -> str:
    """A regular file's whole text (a command after any amount of padding still counts).
    A FIFO or a device is never waited on: it goes into `found` (its program would read
    whatever is written into it, or hang at boot), and "" is its text."""
    try:
        return safefile.read_text(path, errors="replace")
    except safefile.NotRegularFile as error:
        found.append((path, 0, f"{error.kind}, not a regular file (its program reads "
                               "whatever is written into it)"))
    except OSError:
        pass
    return ""


def _sourced(kind: str, targets: Sequence[str], bases: Sequence[str]) -> List[str]:
    """The files a `source` or `source-directory` line reads: each of its words (quotes
    removed, as ifupdown's word expansion does), a shell pattern, from `bases` when
    relative."""
    files: List[str] = []
    for target in (word.replace('"', "").replace("'", "") for word in targets):
        for base in dict.fromkeys([""] if os.path.isabs(target) else bases):
            for place in sorted(glob.glob(os.path.join(base, target))):
                if kind == "source":
                    files.append(place)
                    continue
                try:
                    names = sorted(os.listdir(place))
                except OSError:
                    continue
                files += [os.path.join(place, name) for name in names
                          if SOURCE_DIRECTORY_NAME.match(name)]
    return files


def _source_kind(word: str) -> str:
    """"source", "source-directory" (ifupdown takes any word starting "source-dir"), or ""."""
    if word == "source":
        return word
    return "source-directory" if word.startswith("source-dir") else ""


def ifupdown_commands(path: str = INTERFACES) -> List[Found]:
    """The command options of ifupdown's configuration, and values a shell would run, in
    every file it reads."""
    found: List[Found] = []
    pending: List[str] = [path]
    seen: Set[str] = set()
    while pending:
        current = pending.pop(0)
        real = os.path.realpath(current)
        if real in seen:
            continue
        seen.add(real)
        _replaceable(current, found)
        if not os.path.exists(real) or os.path.isdir(real):
            continue
        for number, line in _logical_lines(_read(current, found)):
            words = line.split()
            if not words:
                continue
            option = words[0].replace("_", "-")
            source = _source_kind(option)
            if option in IFUPDOWN_COMMANDS:
                found.append((current, number, option))
            elif source:
                pending += _sourced(source, words[1:],
                                    [os.path.dirname(current), os.path.dirname(path)])
            elif SHELL_SYNTAX.search(line):
                found.append((current, number, f"{option} (shell syntax in its value)"))
    return found


def _files(patterns: Sequence[str]) -> List[str]:
    return sorted({path for pattern in patterns for path in glob.glob(pattern)})


def wireguard_commands(patterns: Sequence[str] = WIREGUARD_FILES) -> List[Found]:
    """wg-quick's PreUp, PostUp, PreDown and PostDown, in any case."""
    found: List[Found] = []
    for path in _files(patterns):
        _replaceable(path, found)
        for number, line in enumerate(_read(path, found).splitlines(), start=1):
            match = WIREGUARD_COMMAND.match(line)
            if match:
                found.append((path, number, match.group(1)))
    return found


def openvpn_commands(patterns: Sequence[str] = OPENVPN_FILES) -> List[Found]:
    """OpenVPN's options that run or load a program, or read more options, however the
    option is spelled (the command line's `--`, quoted, after a byte order mark)."""
    found: List[Found] = []
    for path in _files(patterns):
        _replaceable(path, found)
        for number, line in enumerate(_read(path, found).lstrip("\ufeff").splitlines(),
                                      start=1):
            words = line.split()
            if not words or words[0].startswith(("#", ";")):
                continue
            option = words[0].strip("\"'").lstrip("-")
            if option in OPENVPN_COMMANDS:
                found.append((path, number, option))
    return found


def _described(found: Sequence[Found]) -> str:
    by_file: Dict[str, List[str]] = {}
    for path, number, option in found:
        by_file.setdefault(path, []).append(f"{option} (line {number})" if number else option)
    return "; ".join(f"{path}: {named(options, LINES_SHOWN)}" for path, options in by_file.items())


def problems(interfaces: str = INTERFACES,
             wireguard: Sequence[str] = WIREGUARD_FILES,
             openvpn: Sequence[str] = OPENVPN_FILES) -> List[str]:
    """One line per program whose configuration names commands it would run as root."""
    kinds = (
        (ifupdown_commands(interfaces), "ifupdown runs as root whenever an interface goes up "
         "or down, at every boot"),
        (wireguard_commands(wireguard), "wg-quick runs as root whenever its interface goes up "
         "or down"),
        (openvpn_commands(openvpn), "OpenVPN runs or loads as root at its connections"),
    )
    return [f"network configuration names commands {what}: {_described(found)} (remove "
            "those lines, or the file)" for found, what in kinds if found]
