"""node.conf: every key is validated with its file, line and key named, and read as typed.

The settings belong to several guarantees (the firewall's zone and mesh port, the storage
volume, the watchdog's exemptions), but one parser reads them all: their tests are here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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
