"""Commands in network configuration (statemesh.networkhooks), on files in a temporary
directory: each way ifupdown, wg-quick and OpenVPN would run one is named with its line,
and configuration that runs nothing passes."""

from __future__ import annotations

from pathlib import Path
from typing import List

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
