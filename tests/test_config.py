"""node.conf: every key is validated with its file, line and key named, and read as typed.

The settings belong to several guarantees (the firewall's zone and mesh port, the storage
volume, the watchdog's exemptions), but one parser reads them all: their tests are here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from debian.deb822 import Deb822
from hypothesis import given
from hypothesis import strategies as st

from statemesh import config
from statemesh.config import ConfigError


# -- the firewall's zone and mesh port -------------------------------------------------------


@pytest.mark.parametrize(
    "text, key, line, message",
    [
        ("Zone: eu\nZone-Peers: 10.0.0.0/8\n  10.1.2.3/8\n", "Zone-Peers", 2, "not a CIDR network"),
        ("Zone: eu\nMesh-Port: 70000\n", "Mesh-Port", 2, "not a port number"),
        ("Zone: eu\nZone-Pears: 10.0.0.0/8\n", "Zone-Pears", 2, "unknown key"),
        ("Zone-Peers: 0.0.0.0/0\n", "Zone-Peers", 1, "whole"),
    ],
)
def test_config_errors_name_key_and_line(text: str, key: str, line: int, message: str):
    with pytest.raises(ConfigError) as caught:
        config.parse(text)
    assert (caught.value.key, caught.value.line) == (key, line)
    assert message in caught.value.message


# -- the storage volume ------------------------------------------------------------------


@pytest.mark.usefixtures("returns_promptly")
def test_a_fifo_as_node_conf_is_refused_not_waited_on(tmp_path: Path) -> None:
    """The operator writes node.conf: a FIFO there held the installation for ever."""
    node_conf = tmp_path / "node.conf"
    os.mkfifo(node_conf)
    with pytest.raises(ConfigError, match="node.conf: cannot be read: a FIFO, not a regular file"):
        config.load(node_conf)


@pytest.mark.parametrize("line, message", [
    ("Storage-Device: sdb", "not a block device path under /dev"),
    ("Storage-Size: 10M", "smaller than the minimum of 64M"),
    ("Storage-Size: 8GB", "not a size such as 512M or 8G"),
    ("Storage-Dedicated: maybe", "not yes or no"),
])
def test_storage_settings_are_validated_with_file_line_and_key(line, message):
    with pytest.raises(config.ConfigError) as error:
        config.parse(f"Zone: eu-west\n{line}\n", Path("/etc/statemesh/node.conf"))
    assert error.value.line == 2 and error.value.key == line.split(":")[0]
    assert message in str(error.value)


def test_storage_settings_are_read():
    parsed = config.parse("Storage-Device: /dev/disk/by-id/virtio-extra0\nStorage-Size: 512M\n"
                          "Storage-Dedicated: yes\n")
    assert parsed.storage_device == Path("/dev/disk/by-id/virtio-extra0")
    assert parsed.storage_size == 512 * 1024**2 and parsed.storage_dedicated


# -- the watchdog's exemptions --------------------------------------------------------------


@pytest.mark.parametrize("unit", ["user.slice", "system.slice", "-.slice", "session-4.scope",
                                  "getty@tty1.service", "serial-getty@ttyS0.service",
                                  "ssh.service", "run-u42.service", "container-shell@1.service",
                                  "user@0.service", "statemesh-watchdog.service"])
def test_config_refuses_exemptions_that_would_exempt_logins(unit: str) -> None:
    with pytest.raises(config.ConfigError, match="Watchdog-Exempt-Units: .* holds logins"):
        config.parse(f"Watchdog-Exempt-Units: {unit}\n")


def test_config_accepts_workload_units() -> None:
    parsed = config.parse("Watchdog-Exempt-Units: workload.service machine.slice pod-1.scope\n")
    assert parsed.watchdog_exempt_units == ("workload.service", "machine.slice", "pod-1.scope")


# -- the file's syntax -----------------------------------------------------------------------

_WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789./-", min_size=1, max_size=8)
_VALUE_LINES = st.lists(st.lists(_WORD, min_size=1, max_size=3).map(" ".join),
                        min_size=1, max_size=3)


@given(fields=st.dictionaries(st.sampled_from(list(config.key_names())), _VALUE_LINES,
                              min_size=1),
       comment=st.booleans(), indent=st.sampled_from([" ", "\t", "  "]))
def test_fields_are_read_as_python_debian_reads_them(fields, comment, indent) -> None:
    """The scan that locates each key also reads its value: the same words as Deb822's."""
    lines = ["# node.conf"] if comment else []
    for key, value_lines in fields.items():
        lines.append(f"{key}: {value_lines[0]}")
        lines.extend(indent + more for more in value_lines[1:])
    text = "\n".join(lines) + "\n"
    read = {key: config._normalise(field.value)
            for key, field in config._read_fields(Path("node.conf"), text).items()}
    expected = {key: config._normalise(value) for key, value in Deb822(text.splitlines()).items()}
    assert read == expected


def test_a_second_paragraph_and_a_repeated_key_are_refused_with_their_lines() -> None:
    with pytest.raises(ConfigError, match="node.conf:3: Mesh-Port: only one paragraph"):
        config.parse("Zone: eu\n\nMesh-Port: 7443\n", Path("node.conf"))
    with pytest.raises(ConfigError, match=r"node.conf:3: Zone: repeated \(first on line 1\)"):
        config.parse("Zone: eu\n# the zone again\nZone: us\n", Path("node.conf"))
    with pytest.raises(ConfigError, match="node.conf:1: continuation line"):
        config.parse("  eu\n", Path("node.conf"))
