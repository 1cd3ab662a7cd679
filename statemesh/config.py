"""Reading and validating /etc/statemesh/node.conf.

The file is deb822 (the format of apt's .sources files): one paragraph of `Key: value`
fields, values folded over indented continuation lines, `#` comments. One scan of the lines
checks the syntax, reads each value and remembers the line it starts on, so that every
error names file, line and key. Every command of the node loads this file, boot units
included; python-debian's Deb822, which this scan used to hand the values to, does not
report line numbers and its import (chardet, email) cost 0.7 s of each command's start
in an emulated guest.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

from statemesh import safefile

DEFAULT_PATH = Path("/etc/statemesh/node.conf")

IpNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class ConfigError(ValueError):
    """A configuration problem, located precisely enough for an operator to fix it."""

    def __init__(self, path: Path, line: Optional[int], key: Optional[str], message: str):
        self.path = path
        self.line = line
        self.key = key
        self.message = message
        where = f"{path}:{line}" if line else f"{path}"
        what = f"{key}: " if key else ""
        super().__init__(f"{where}: {what}{message}")


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """The node's configuration after validation; defaults apply to absent keys."""

    zone: str = "unassigned"
    zone_peers: Tuple[IpNetwork, ...] = ()
    mesh_port: int = 7443
    storage_device: Optional[Path] = None
    storage_dedicated: bool = False
    storage_size: Optional[int] = None  # None: 8G, or half the free space if less
    watchdog_exempt_units: Tuple[str, ...] = ()
    tpm_ca_dir: Path = Path("/etc/statemesh/tpm-ca.d")
    attestation_pcrs: Tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_ZONE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_UNIT_RE = re.compile(r"^[A-Za-z0-9:_.@-]+\.(service|scope|slice)$")
# Units whose exemption from the terminal watchdog would exempt logins themselves.
_LOGIN_UNIT_RE = re.compile(
    r"^(-\.slice|system\.slice|user\.slice|user-[0-9]+\.slice|user@.*\.service|init\.scope"
    r"|session-.*\.scope|(serial-|container-|console-)?getty@?.*\.service|autovt@.*\.service"
    r"|container-shell@.*\.service|sshd?(@.*)?\.service|run-.*\.(service|scope)"
    r"|statemesh-watchdog\.service)$"
)


def _parse_zone(value: str) -> str:
    if not _ZONE_RE.match(value):
        raise ValueError(f"not a zone name (lower-case letters, digits, '-'): {value!r}")
    return value


def _parse_networks(value: str) -> Tuple[IpNetwork, ...]:
    networks = []
    for word in value.split():
        try:
            networks.append(ipaddress.ip_network(word, strict=True))
        except ValueError as error:
            raise ValueError(f"not a CIDR network: {word!r} ({error})") from None
        if networks[-1].prefixlen == 0:
            raise ValueError(f"{word!r} is the whole address space, not a zone's peers")
    return tuple(networks)


def _parse_port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ValueError(f"not a port number (1-65535): {value!r}")
    return int(value)


def _parse_device(value: str) -> Optional[Path]:
    if not value:
        return None
    if not value.startswith("/dev/"):
        raise ValueError(f"not a block device path under /dev: {value!r}")
    return Path(value)


def _parse_bool(value: str) -> bool:
    if value in ("yes", "true"):
        return True
    if value in ("no", "false"):
        return False
    raise ValueError(f"not yes or no: {value!r}")


def _parse_size(value: str) -> int:
    match = re.fullmatch(r"([0-9]+)([KMGT]?)", value)
    if not match:
        raise ValueError(f"not a size such as 512M or 8G: {value!r}")
    size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if size < 64 * 1024**2:
        raise ValueError(f"smaller than the minimum of 64M: {value!r}")
    return size


def _parse_units(value: str) -> Tuple[str, ...]:
    for word in value.split():
        if not _UNIT_RE.match(word):
            raise ValueError(f"not a systemd service, scope or slice name: {word!r}")
        if _LOGIN_UNIT_RE.match(word):
            raise ValueError(f"{word!r} holds logins or every service: exempting it exempts shells")
    return tuple(value.split())


def _parse_path(value: str) -> Path:
    if not value.startswith("/"):
        raise ValueError(f"not an absolute path: {value!r}")
    return Path(value)


def _parse_pcrs(value: str) -> Tuple[int, ...]:
    pcrs = []
    for word in value.split():
        if not word.isdigit() or not 0 <= int(word) <= 23:
            raise ValueError(f"not a PCR index (0-23): {word!r}")
        pcrs.append(int(word))
    if not pcrs:
        raise ValueError("at least one PCR index is needed")
    return tuple(sorted(set(pcrs)))


# Each key: (field of NodeConfig, parser). The order is the order of the documentation.
SCHEMA: Dict[str, Tuple[str, Callable[[str], object]]] = {
    "Zone": ("zone", _parse_zone),
    "Zone-Peers": ("zone_peers", _parse_networks),
    "Mesh-Port": ("mesh_port", _parse_port),
    "Storage-Device": ("storage_device", _parse_device),
    "Storage-Dedicated": ("storage_dedicated", _parse_bool),
    "Storage-Size": ("storage_size", _parse_size),
    "Watchdog-Exempt-Units": ("watchdog_exempt_units", _parse_units),
    "TPM-CA-Dir": ("tpm_ca_dir", _parse_path),
    "Attestation-PCRs": ("attestation_pcrs", _parse_pcrs),
}

_FIELD_LINE = re.compile(r"^([^\s:#][^\s:]*):(.*)$")


@dataclasses.dataclass
class _Field:
    """A field as written: the line it starts on, and its value's lines joined."""

    line: int
    value: str


def _read_fields(path: Path, text: str) -> Dict[str, _Field]:
    """Check deb822 syntax line by line; return each field with the line it starts on."""
    fields: Dict[str, _Field] = {}
    current: Optional[_Field] = None
    paragraphs = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("#"):
            continue
        if not line.strip():
            current = None
            continue
        if line[0] in " \t":
            if current is None:
                raise ConfigError(path, number, None, "continuation line without a field before it")
            current.value += "\n" + line
            continue
        match = _FIELD_LINE.match(line)
        if not match:
            raise ConfigError(path, number, None, f"not a 'Key: value' line: {line!r}")
        if current is None:
            paragraphs += 1
        if paragraphs > 1:
            raise ConfigError(path, number, match.group(1), "only one paragraph is allowed")
        key = match.group(1)
        if key in fields:
            raise ConfigError(path, number, key, f"repeated (first on line {fields[key].line})")
        current = fields[key] = _Field(number, match.group(2))
    return fields


def _normalise(value: str) -> str:
    """Fold a deb822 value (possibly multi-line) into single-space-separated words."""
    return " ".join(value.split())


def parse(text: str, path: Path = DEFAULT_PATH) -> NodeConfig:
    """Validate the text of a node.conf and return the configuration it describes."""
    values: Dict[str, object] = {}
    for key, field in _read_fields(path, text).items():
        if key not in SCHEMA:
            known = ", ".join(SCHEMA)
            raise ConfigError(path, field.line, key, f"unknown key (known keys: {known})")
        field_name, parser = SCHEMA[key]
        try:
            values[field_name] = parser(_normalise(field.value))
        except ValueError as error:
            raise ConfigError(path, field.line, key, str(error)) from None
    return NodeConfig(**values)  # type: ignore[arg-type]


def load(path: Path = DEFAULT_PATH) -> NodeConfig:
    """Load node.conf; a missing file means the documented defaults. A FIFO or a device
    there is refused, never waited on (the operator writes this file)."""
    try:
        text = safefile.read_text(path)
    except FileNotFoundError:
        return NodeConfig()
    except UnicodeDecodeError as error:
        raise ConfigError(path, None, None, f"not UTF-8 text ({error.reason})") from None
    except OSError as error:
        raise ConfigError(path, None, None, f"cannot be read: {error.strerror}") from None
    return parse(text, path)


def as_dict(config: NodeConfig) -> Dict[str, object]:
    """The configuration keyed by node.conf's key names, values printable as JSON."""
    result: Dict[str, object] = {}
    for key, (field_name, _parser) in SCHEMA.items():
        value = getattr(config, field_name)
        if isinstance(value, tuple):
            value = [str(item) if not isinstance(item, int) else item for item in value]
        elif isinstance(value, Path):
            value = str(value)
        result[key] = value
    return result


def key_names() -> List[str]:
    """Every key node.conf accepts, in documentation order."""
    return list(SCHEMA)
