"""Commands in network configuration (statemesh.networkhooks), on files in a temporary
directory: each way ifupdown, wg-quick and OpenVPN would run one is named with its line,
and configuration that runs nothing passes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List

import pytest

from statemesh import networkhooks

PLAIN_INTERFACES = """# The loopback network interface
auto lo
iface lo inet loopback

allow-hotplug ens3
iface ens3 inet dhcp
    # up /root/commented-out
"""


def problems(tmp_path: Path) -> List[str]:
    return networkhooks.problems(str(tmp_path / "interfaces"), (f"{tmp_path}/wireguard/*.conf",),
                                 (f"{tmp_path}/openvpn/*.conf", f"{tmp_path}/openvpn/client/*.conf"))


def test_configuration_that_runs_nothing_passes(tmp_path: Path) -> None:
    (tmp_path / "interfaces").write_text(PLAIN_INTERFACES)
    (tmp_path / "wireguard").mkdir()
    (tmp_path / "wireguard/wg0.conf").write_text(
        "[Interface]\nPrivateKey = x\nAddress = 10.0.0.2/24\n# PostUp = /root/way-in\n")
    (tmp_path / "openvpn").mkdir()
    (tmp_path / "openvpn/office.conf").write_text(
        "client\nremote vpn.example 1194\n# up /root/way-in\n; down /root/way-in\n")
    assert problems(tmp_path) == []
    assert problems(tmp_path / "nothing-here") == []


def test_each_ifupdown_command_is_named_in_every_file_ifupdown_reads(tmp_path: Path) -> None:
    (tmp_path / "interfaces.d").mkdir()
    (tmp_path / "more").mkdir()
    (tmp_path / "interfaces").write_text(
        PLAIN_INTERFACES + "    post-up ip route add 192.0.2.0/24 \\\n"
        "        via 10.0.0.1 || /root/way-in\n"
        "source interfaces.d/*\nsource-directory more\n")
    (tmp_path / "interfaces.d/extra").write_text("iface ens4 inet manual\n  pre-up /root/a\n"
                                                 "source /nonexistent/*\n")
    (tmp_path / "more/ok-name").write_text("mapping ens5\n  script /root/map\n")
    (tmp_path / "more/skipped.name").write_text("iface x inet manual\n  down /root/b\n")
    [line] = problems(tmp_path)
    assert line.startswith("network configuration names commands ifupdown runs as root "
                           "whenever an interface goes up or down, at every boot: ")
    assert f"{tmp_path}/interfaces: post-up (line 8)" in line, line
    assert f"{tmp_path}/interfaces.d/extra: pre-up (line 2)" in line, line
    assert f"{tmp_path}/more/ok-name: script (line 2)" in line, line
    assert "skipped.name" not in line  # source-directory reads run-parts' names only
    assert line.endswith("(remove those lines, or the file)")


def test_a_file_sourced_twice_or_itself_is_read_once(tmp_path: Path) -> None:
    (tmp_path / "interfaces").write_text(
        f"source {tmp_path}/interfaces\nsource interfaces\niface a inet manual\n  up /root/c\n")
    [line] = problems(tmp_path)
    assert line.count("up (line 4)") == 1, line


def test_wg_quick_and_openvpn_commands_in_any_spelling(tmp_path: Path) -> None:
    (tmp_path / "wireguard").mkdir()
    (tmp_path / "wireguard/wg0.conf").write_text(
        "[Interface]\nPrivateKey = x\npostup=/root/way-in\n  PreDown = true\n")
    (tmp_path / "openvpn/client").mkdir(parents=True)
    (tmp_path / "openvpn/client/c.conf").write_text(
        "client\nscript-security 2\n--up /root/way-in\nplugin /root/way-in.so\n")
    wireguard, openvpn = problems(tmp_path)
    assert f"{tmp_path}/wireguard/wg0.conf: postup (line 3), PreDown (line 4)" in wireguard
    assert "wg-quick runs as root whenever its interface goes up or down" in wireguard
    assert f"{tmp_path}/openvpn/client/c.conf: up (line 3), plugin (line 4)" in openvpn
    assert "OpenVPN runs or loads as root at its connections" in openvpn


def test_the_ways_round_a_reading_that_ifupdown_does_not_share(tmp_path: Path) -> None:
    """A comment ending in a backslash does not swallow the next line (ifupdown drops the
    comment first); a value a shell would run is named; ifupdown2's `post_up`; any word
    starting `source-dir`; every word of a `source` line, its quotes removed."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "interfaces").write_text(
        "iface eth0 inet static\n    # a note \\\n    up /root/hidden\n"
        "    address 10.0.0.2/24\n    mtu 1500;/root/x\n    post_up /root/y\n"
        "source-dirs a\nsource /nothing \"b\"/c\n")
    (tmp_path / "a/more").write_text("iface eth1 inet manual\n  pre-down /root/z\n")
    (tmp_path / "b/c").write_text("iface eth2 inet manual\n  down /root/w\n")
    [line] = problems(tmp_path)
    for named in ("interfaces: up (line 3)", "mtu (shell syntax in its value) (line 5)",
                  "post-up (line 6)", "a/more: pre-down (line 2)", "b/c: down (line 2)"):
        assert named in line, (named, line)
    assert "address" not in line


NOT_REGULAR = "not a regular file (its program reads whatever is written into it)"


@pytest.mark.usefixtures("returns_promptly")
def test_openvpn_options_quoted_after_a_byte_order_mark_and_files_that_are_no_files(
        tmp_path: Path) -> None:
    """A FIFO or a device named like a configuration file is named, never read nor waited
    on: wg-quick and OpenVPN would read whatever is written into it."""
    (tmp_path / "openvpn").mkdir()
    (tmp_path / "openvpn/bom.conf").write_text("\ufeffup /root/a\n\"iproute\" /root/b\n")
    os.mkfifo(tmp_path / "openvpn/fifo.conf")
    os.symlink("/dev/zero", tmp_path / "openvpn/zero.conf")
    (tmp_path / "wireguard").mkdir()
    os.mkfifo(tmp_path / "wireguard/wg1.conf")
    wireguard, openvpn = problems(tmp_path)
    assert f"{tmp_path}/wireguard/wg1.conf: a FIFO, {NOT_REGULAR}" in wireguard, wireguard
    for named in (f"{tmp_path}/openvpn/bom.conf: up (line 1), iproute (line 2)",
                  f"{tmp_path}/openvpn/fifo.conf: a FIFO, {NOT_REGULAR}",
                  f"{tmp_path}/openvpn/zero.conf: a character device, {NOT_REGULAR}"):
        assert named in openvpn, (named, openvpn)


@pytest.mark.usefixtures("returns_promptly")
def test_files_linked_into_a_directory_anyone_may_write_are_named(tmp_path: Path) -> None:
    """A source line, a wg-quick and an OpenVPN configuration, each a link to a file in a
    /tmp: nothing there today, anyone's commands after the next boot."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    (tmp_path / "interfaces").write_text(f"source {tmp_path}/interfaces.d/*\n")
    (tmp_path / "interfaces.d").mkdir()
    (tmp_path / "interfaces.d/eth1").symlink_to(tmp / "eth1")
    (tmp_path / "wireguard").mkdir()
    (tmp_path / "wireguard/wg0.conf").symlink_to(tmp / "wg0.conf")
    (tmp_path / "openvpn").mkdir()
    (tmp_path / "openvpn/office.conf").symlink_to(tmp / "office.conf")
    ifupdown, wireguard, openvpn = problems(tmp_path)
    for name, found in (("interfaces.d/eth1", ifupdown), ("wireguard/wg0.conf", wireguard),
                        ("openvpn/office.conf", openvpn)):
        assert (f"{tmp_path}/{name}: {tmp_path}/{name} is a link to {tmp}/{Path(name).name}, "
                f"and {tmp} is writable by others than root") in found, found


def test_a_fifo_ifupdown_reads_is_named(tmp_path: Path) -> None:
    """/etc/network/interfaces, or a file it sources, as a FIFO: ifupdown would wait on it
    at boot or run what a writer writes into it. It was passed over as no file."""
    os.mkfifo(tmp_path / "interfaces")
    [line] = problems(tmp_path)
    assert f"{tmp_path}/interfaces: a FIFO, {NOT_REGULAR}" in line, line
    os.unlink(tmp_path / "interfaces")
    (tmp_path / "interfaces").write_text(PLAIN_INTERFACES + "source sourced\n")
    os.mkfifo(tmp_path / "sourced")
    [line] = problems(tmp_path)
    assert f"{tmp_path}/sourced: a FIFO, {NOT_REGULAR}" in line, line


def test_a_command_after_any_amount_of_padding_is_named(tmp_path: Path) -> None:
    """The whole of a regular file is read: two mebibytes of comments hide nothing."""
    (tmp_path / "interfaces").write_text("# padding\n" * ((2 << 20) // 10) + "up /root/x\n")
    [line] = problems(tmp_path)
    assert ": up (line " in line, line
