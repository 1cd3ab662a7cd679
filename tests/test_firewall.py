"""The firewall guarantee against the real ufw and netfilter, in private namespaces.

This host's firewall and /etc are never touched: each test gets a network namespace and a
mount namespace of its own, in which /etc/ufw, /etc/default, /lib/ufw and /run are temporary
copies (ufw's sysctl file emptied), so that the real ufw and iptables work on a private
netns. A veth pair to a second namespace carries real TCP connections from a zone peer and
from outside the zone.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytest

from statemesh import config, ufwfiles
from statemesh.guarantees import firewall
from tests.fakebus import fakebus  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parent.parent
PORT = 7443

# Runs inside the namespaces with the real journal in a temporary state directory: one
# action, then check(), as JSON on stdout; refusals as {"error": ...} with exit status 2.
DRIVER = r'''
import json, sys
from pathlib import Path
from statemesh import config, install, journal
from statemesh.guarantees import firewall
from statemesh.guarantees.base import FIREWALL_UNIT


class FileBootUnit:
    """ufw.service's unit file state, kept in a file: the namespace has no systemd."""

    def __init__(self, path):
        self.path = path

    def state(self):
        return self.path.read_text() if self.path.exists() else "enabled"

    def set(self, state):
        self.path.write_text(state)


action, conf_path, state_dir = sys.argv[1:4]
book = journal.Journal(Path(state_dir))
try:
    node_config = config.load(Path(conf_path))
    guarantee = firewall.Firewall(node_config, FileBootUnit(Path(state_dir) / "ufw-unit"))
    if action == "apply":
        guarantee.apply(book)
    elif action == "revert":
        guarantee.revert(book.restore_record().get("firewall", {}))
    elif action == "reassert":
        if install.reapply_at_boot(book, [guarantee], FIREWALL_UNIT) is None:
            print(json.dumps({"reasserted": False}))
            sys.exit(0)
    elif action in (journal.INSTALLED, journal.FAILED):
        book.set_state(action)
        print(json.dumps({"state": action}))
        sys.exit(0)
    elif action == "preflight":
        print(json.dumps(firewall.preflight_notes(node_config)))
        sys.exit(0)
except (config.ConfigError, firewall.FirewallError, journal.RebootRequiredError) as error:
    print(json.dumps({"error": str(error)}))
    sys.exit(2)
print(json.dumps(guarantee.check().as_dict()))
'''

# Runs in the node namespace: listen on the given ports (both families) until killed.
LISTENER = r'''
import socket, sys, time
sockets = []
for port in sys.argv[1:]:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", int(port)))
    s.listen(16)
    sockets.append(s)
print("listening", flush=True)
while True:
    time.sleep(3600)
'''

# Runs in the peer namespace: try every (source, destination, port) at once; "open" or why not.
PROBE = r'''
import json, socket, sys
from concurrent.futures import ThreadPoolExecutor

def probe(target):
    source, destination, port = target
    family = socket.AF_INET6 if ":" in destination else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.bind((source, 0))
        try:
            s.connect((destination, port))
            return "open"
        except socket.timeout:
            return "dropped"
        except OSError as error:
            return error.strerror

targets = json.loads(sys.argv[1])
with ThreadPoolExecutor(len(targets)) as pool:
    print(json.dumps(list(pool.map(probe, targets))))
'''

VETH = """
ip netns add peer
ip link add smn0 type veth peer name smp0 netns peer
ip addr add 10.77.0.1/24 dev smn0
ip addr add 10.77.1.1/24 dev smn0
ip -6 addr add fd00:77::1/64 dev smn0 nodad
ip -6 addr add fd00:78::1/64 dev smn0 nodad
ip link set smn0 up
ip netns exec peer ip link set lo up
ip netns exec peer ip addr add 10.77.0.2/24 dev smp0
ip netns exec peer ip addr add 10.77.1.2/24 dev smp0
ip netns exec peer ip -6 addr add fd00:77::2/64 dev smp0 nodad
ip netns exec peer ip -6 addr add fd00:78::2/64 dev smp0 nodad
ip netns exec peer ip link set smp0 up
"""

ZONE_CONF = "Zone: eu-west\nMesh-Port: 7443\nZone-Peers: 10.77.0.0/24\n  fd00:77::/64\n"


class Namespace:
    """A private network + mount namespace with temporary copies of ufw's state."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.marker = secrets.token_hex(8)
        copies = {"/etc/ufw": "etc-ufw", "/etc/default": "etc-default", "/lib/ufw": "lib-ufw"}
        mounts = []
        for real, copy in copies.items():
            shutil.copytree(real, workdir / copy, symlinks=True)
            mounts.append(f"mount --bind {workdir / copy} {real}")
        (workdir / "etc-ufw" / "sysctl.conf").write_text("")  # no sysctl writes, even per-netns
        (workdir / "etc-ufw" / "statemesh-test-marker").write_text(self.marker)
        script = " && ".join(
            [*mounts, "mount -t tmpfs tmpfs /run", "ip link set lo up", "echo ready", "exec sleep infinity"]
        )
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--net", "--propagation", "private", "--", "sh", "-c", script],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("could not set up the private ufw namespace")
        self._assert_private()

    def _assert_private(self) -> None:
        """Refuse to go on unless ufw would really see the copies and a private netns."""
        inside = self.run(["cat", "/etc/ufw/statemesh-test-marker"]).stdout.strip()
        host_netns = os.readlink("/proc/self/ns/net")
        ns_netns = self.run(["readlink", "/proc/self/ns/net"]).stdout.strip()
        if inside != self.marker or ns_netns == host_netns:
            self.close()
            raise RuntimeError("the ufw namespace is not private: refusing to run ufw")

    def _enter(self, argv: Sequence[str]) -> List[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", "--", *argv]

    def run(self, argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "LC_ALL": "C.UTF-8"}
        result = subprocess.run(self._enter(argv), capture_output=True, text=True, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"{argv} failed ({result.returncode}): {result.stdout}{result.stderr}")
        return result

    def sh(self, script: str) -> str:
        return self.run(["sh", "-ec", script]).stdout

    def popen(self, argv: Sequence[str]) -> subprocess.Popen:
        return subprocess.Popen(self._enter(argv), stdout=subprocess.PIPE, text=True)

    def guarantee(self, action: str, conf: str, expect_error: bool = False) -> Dict[str, Any]:
        """Run apply/revert/check of the firewall guarantee inside the namespaces."""
        conf_path = self.workdir / "node.conf"
        conf_path.write_text(conf)
        driver = self.workdir / "driver.py"
        driver.write_text(DRIVER)
        result = self.run(
            ["/usr/bin/python3", str(driver), action, str(conf_path), str(self.state_dir)],
            check=False,
        )
        assert result.returncode == (2 if expect_error else 0), result.stdout + result.stderr
        return json.loads(result.stdout)

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def ufw_unit(self) -> Path:
        """ufw.service's unit file state as the driver's stand-in keeps it ("enabled" when
        absent)."""
        return self.state_dir / "ufw-unit"

    def events(self) -> List[Dict[str, Any]]:
        lines = (self.state_dir / "journal.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def restore_record(self) -> Dict[str, Any]:
        return json.loads((self.state_dir / "restore.json").read_text())

    def ufw_files(self) -> Dict[str, str]:
        """Everything ufw persists, as text, to compare before and after."""
        names = ["etc-ufw/ufw.conf", "etc-ufw/user.rules", "etc-ufw/user6.rules", "etc-default/ufw"]
        return {name: (self.workdir / name).read_text() for name in names}

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


@pytest.fixture
def ns(tmp_path: Path):
    namespace = Namespace(tmp_path)
    yield namespace
    namespace.close()


def added_rules(ns: Namespace) -> List[str]:
    return [line for line in ns.run(["ufw", "show", "added"]).stdout.splitlines() if line.startswith("ufw ")]


def set_operator_state(ns: Namespace) -> None:
    """A machine whose operator runs ufw with IPv6 off, incoming allowed and own rules."""
    ns.sh(
        "sed -i 's/^IPV6=.*/IPV6=no/; s/^DEFAULT_INPUT_POLICY=.*/DEFAULT_INPUT_POLICY=\"ACCEPT\"/' "
        "/etc/default/ufw\n"
        "ufw allow 22/tcp\n"
        "ufw limit from 192.0.2.0/24 to any port 8080 proto tcp comment 'operator web'\n"
        "ufw deny from 198.51.100.7\n"
        "ufw route allow in on eth0 out on eth1\n"
        "ufw allow from 10.77.0.0/24 to any port 9999 proto tcp comment 'statemesh-node'\n"
        "ufw --force enable\n"
    )


# --- pure logic --------------------------------------------------------------------------


def net(text: str) -> config.IpNetwork:
    return ipaddress.ip_network(text)


def test_plan_keeps_our_rules_removes_everything_else():
    peers = [net("10.0.2.2/32"), net("fd00:77::/64")]
    rules = [
        "allow 22/tcp",
        "allow from 10.0.2.2 to any port 7443 proto tcp comment 'statemesh-node'",
        "allow from 10.9.9.0/24 to any port 7443 proto tcp comment 'statemesh-node'",
        "allow from fd00:77::/64 to any port 7443 proto tcp",
        "route allow in on eth0 out on eth1",
    ]
    todo = firewall.plan(rules, peers, PORT, ipv6=True)
    assert todo.remove == (rules[0], rules[2], rules[3], rules[4])
    assert todo.add == ("allow from fd00:77::/64 to any port 7443 proto tcp comment 'statemesh-node'",)
    assert todo.skipped_peers == ()


def test_plan_skips_ipv6_peers_without_kernel_ipv6():
    todo = firewall.plan([], [net("10.0.0.0/8"), net("fd00::/8")], PORT, ipv6=False)
    assert todo.add == (firewall.mesh_rule(net("10.0.0.0/8"), PORT),)
    assert todo.skipped_peers == (net("fd00::/8"),)


def test_plan_of_applied_rules_is_empty():
    peers = [net("192.0.2.0/24"), net("2001:db8::/32")]
    rules = [firewall.mesh_rule(peer, PORT) for peer in peers]
    todo = firewall.plan(rules, peers, PORT, ipv6=True)
    assert (todo.remove, todo.add) == ((), ())


def test_parse_live_tells_mesh_rules_from_others():
    lines = [
        "-P INPUT DROP",
        "-A INPUT -j ufw-before-logging-input",
        "-A INPUT -j ufw-before-input",
        "-A INPUT -p tcp -m tcp --dport 8080 -j ACCEPT",
        "-A INPUT -s 198.51.100.7/32 -j DROP",
        "-A ufw-user-input -s 10.0.2.2/32 -p tcp -m tcp --dport 7443 -j ACCEPT",
        "-A ufw-user-input -p tcp -m tcp --dport 22 -j ACCEPT",
        "-A ufw-user-input -i eth0 -p tcp -m tcp --dport 7443 -j ACCEPT",
        # A reviewer's: negated, the peer's rule opens every other port to everyone.
        "-A ufw-user-input ! -s 10.1.2.3/32 -p tcp -m tcp ! --dport 7443 -j ACCEPT",
        "-A ufw-user-input ! -s 10.0.2.2/32 -p tcp -m tcp --dport 7443 -j ACCEPT",
        "-A ufw-user-input -p tcp -m tcp --dport 7443 -m conntrack --ctstate NEW -j ACCEPT",
    ]
    live = firewall.parse_live(lines, 4, PORT)
    assert (live.policy, live.ufw_loaded) == ("DROP", True)
    assert live.mesh_sources == (net("10.0.2.2/32"),)
    assert live.other_user_rules == tuple(lines[6:])
    assert live.outside_rules == (lines[3],)


def test_only_ufws_own_input_hooks_pass_and_a_jump_to_any_other_ufw_chain_is_named():
    hooks = [f"-A INPUT -j ufw{t}-{chain}" for t in ("", "6") for chain in (
        "before-logging-input", "before-input", "after-input", "after-logging-input",
        "reject-input", "track-input")]
    planted = [
        "-A INPUT -p tcp -m tcp --dport 22 -j ufw-user-limit-accept",  # ufw's, and it accepts
        "-A INPUT -j ufw-way-in",  # a chain of the operator's named like ufw's
        "-A INPUT -p tcp -m tcp --dport 22 -j ufw-before-input",  # a hook with a condition
        "-A INPUT -j ufw6-before-input",  # the other family's hook
    ]
    live = firewall.parse_live(["-P INPUT DROP", *hooks[:6], *planted], 4, PORT)
    assert live.ufw_loaded
    assert live.outside_rules == tuple(planted)
    assert firewall.parse_live(["-P INPUT DROP", *hooks[6:]], 6, PORT).outside_rules == ()


def test_enabled_as_ufw_init_reads_it_at_boot():
    assert firewall._enabled_at_boot("# ufw.conf\nENABLED=yes\nLOGLEVEL=low\n")
    assert firewall._enabled_at_boot('ENABLED="YES" # on\n')
    for off in ("ENABLED=Yes\n", "ENABLED=yes\r\n", "ENABLED=no\n", "# ENABLED=yes\n", ""):
        assert not firewall._enabled_at_boot(off), off
    assert not firewall._enabled_at_boot("ENABLED=yes\nENABLED=no\n")  # the last one counts


def test_a_line_taken_out_of_the_rules_files_is_told_from_lines_added():
    pristine = b"*filter\n:ufw6-user-input - [0:0]\n### RULES ###\n\n### END RULES ###\nCOMMIT\n"
    rewritten = (b"*filter\n:ufw6-user-input - [0:0]\n:ufw6-user-limit - [0:0]\n### RULES ###\n"
                 b"### tuple ### allow tcp 7443 ::/0 any fd00::/64 in\n-A ufw6-user-input -j ACCEPT\n"
                 b"### END RULES ###\n-A ufw6-user-limit -j REJECT\nCOMMIT\n")
    lines = firewall._rule_lines
    assert firewall._kept_in_order(lines(pristine), lines(rewritten))
    planted = pristine.replace(b"COMMIT", b"-A ufw6-before-input -j ACCEPT\nCOMMIT")
    assert not firewall._kept_in_order(lines(planted), lines(rewritten))
    reordered = [b"-A ufw6-user-limit -j ACCEPT", b"-A ufw6-user-limit -j REJECT"]
    assert not firewall._kept_in_order(reordered, reordered[::-1])


def test_restore_record_round_trip_and_malformed_records():
    state = firewall.UfwState(True, "allow", "allow", None, ("allow 22/tcp",))
    assert firewall.UfwState.from_record(json.loads(json.dumps(state.as_record()))) == state
    with pytest.raises(firewall.FirewallError, match="malformed"):
        firewall.UfwState.from_record({"enabled": True})
    with pytest.raises(firewall.FirewallError, match="bad policy"):
        firewall.UfwState.from_record(dict(state.as_record(), incoming="open"))


def test_set_assignment_replaces_adds_and_removes(tmp_path: Path):
    path = tmp_path / "ufw"
    path.write_text("# comment IPV6=no\nIPV6=no\nDEFAULT_INPUT_POLICY=\"DROP\"\n")
    path.chmod(0o640)
    firewall._set_assignment(path, "IPV6", "yes")
    assert path.read_text() == "# comment IPV6=no\nIPV6=yes\nDEFAULT_INPUT_POLICY=\"DROP\"\n"
    assert path.stat().st_mode & 0o777 == 0o640
    firewall._set_assignment(path, "IPV6", None)
    assert "IPV6" not in path.read_text().replace("# comment IPV6=no", "")
    firewall._set_assignment(path, "IPV6", "no")
    assert path.read_text().endswith("IPV6=no\n")


@pytest.mark.usefixtures("returns_promptly")
def test_a_fifo_as_ufws_configuration_is_named_and_never_waited_on(tmp_path: Path):
    """/etc/default/ufw and ufw.conf are root's to replace before installing: a FIFO there
    held the installation and status for ever."""
    path = tmp_path / "ufw"
    os.mkfifo(path)
    with pytest.raises(firewall.FirewallError, match=f"{path} is a FIFO, not a regular file"):
        firewall._read_assignments(path)
    with pytest.raises(firewall.FirewallError, match=f"{path} is a FIFO, not a regular file"):
        firewall._set_assignment(path, "IPV6", "yes")


# --- the real ufw in private namespaces --------------------------------------------------


def test_apply_on_fresh_ufw_opens_only_the_mesh_port_to_the_zone(ns: Namespace):
    before = ns.guarantee("check", ZONE_CONF)
    assert not before["holds"] and "ufw is not enabled" in before["detail"]

    after = ns.guarantee("apply", ZONE_CONF)
    assert after["holds"], after["detail"]
    assert sorted(after["facts"]["allowed_peers"]) == ["10.77.0.0/24", "fd00:77::/64"]
    assert after["facts"]["zone"] == "eu-west" and after["facts"]["foreign_rules"] == []

    v4 = ns.run(["iptables-save", "-t", "filter"]).stdout
    v6 = ns.run(["ip6tables-save", "-t", "filter"]).stdout
    assert ":INPUT DROP" in v4 and ":INPUT DROP" in v6 and ":OUTPUT ACCEPT" in v4
    assert "-A ufw-user-input -s 10.77.0.0/24 -p tcp -m tcp --dport 7443 -j ACCEPT" in v4
    assert "-A ufw6-user-input -s fd00:77::/64 -p tcp -m tcp --dport 7443 -j ACCEPT" in v6
    assert [line for line in v4.splitlines() if line.startswith("-A ufw-user-input")] == [
        "-A ufw-user-input -s 10.77.0.0/24 -p tcp -m tcp --dport 7443 -j ACCEPT"
    ]
    assert "ENABLED=yes" in ns.ufw_files()["etc-ufw/ufw.conf"]


def test_operator_rules_are_reported_removed_and_restored_by_revert(ns: Namespace):
    set_operator_state(ns)
    original_rules = added_rules(ns)
    original_defaults = ns.ufw_files()["etc-default/ufw"]

    report = ns.guarantee("check", ZONE_CONF)
    assert not report["holds"]
    assert "allow 22/tcp" in report["facts"]["foreign_rules"]
    assert "route allow in on eth0 out on eth1" in report["facts"]["foreign_rules"]
    assert "operator rule to be removed: ufw allow 22/tcp" in report["detail"]

    applied = ns.guarantee("apply", ZONE_CONF)
    assert applied["holds"], applied["detail"]
    assert added_rules(ns) == [
        "ufw allow from 10.77.0.0/24 to any port 7443 proto tcp comment 'statemesh-node'",
        "ufw allow from fd00:77::/64 to any port 7443 proto tcp comment 'statemesh-node'",
    ]
    assert "IPV6=yes" in ns.ufw_files()["etc-default/ufw"]
    removed = [e["rule"] for e in ns.events() if e["event"] == "firewall-rule-removed"]
    assert len(removed) == 5

    reverted = ns.guarantee("revert", ZONE_CONF)
    assert not reverted["holds"]
    assert added_rules(ns) == original_rules
    assert ns.ufw_files()["etc-default/ufw"] == original_defaults
    assert "ENABLED=yes" in ns.ufw_files()["etc-ufw/ufw.conf"]
    assert "-P INPUT ACCEPT" in ns.run(["iptables", "-S", "INPUT"]).stdout


@pytest.mark.parametrize("found", ["masked", "disabled", "masked-runtime", "enabled-runtime"])
def test_ufws_boot_unit_not_enabled_fails_the_check_apply_enables_it_and_purge_gives_it_back(
        ns: Namespace, found: str):
    """Masked or disabled before installing, ufw.service would load nothing at boot: the
    node open from the network's start until statemesh-firewall.service runs."""
    ns.guarantee("apply", ZONE_CONF)
    assert ns.guarantee("check", ZONE_CONF)["holds"]
    ns.ufw_unit.write_text(found)
    report = ns.guarantee("check", ZONE_CONF)
    assert not report["holds"] and report["facts"]["ufw_unit"] == found
    assert report["detail"] == (
        f"ufw.service is {found}: no boot loads ufw's rules before the network is up, and "
        "every port answers until statemesh-firewall.service applies them")
    ns.guarantee("revert", ZONE_CONF)
    ns.state_dir.joinpath("restore.json").unlink()  # a machine prepared so, not yet installed

    applied = ns.guarantee("apply", ZONE_CONF)
    assert applied["holds"], applied["detail"]
    assert ns.ufw_unit.read_text() == "enabled"
    assert [e["previous"] for e in ns.events()
            if e["event"] == "firewall-boot-loading-enabled"] == [found]
    ns.guarantee("revert", ZONE_CONF)
    assert ns.ufw_unit.read_text() == found


def test_ufw_is_wanted_by_the_boot_only_through_multi_user_targets_link(tmp_path: Path):
    """`systemctl disable ufw` and a link in zz.target.wants: systemd says "enabled", and no
    boot starts it."""
    from statemesh.guarantees import ufwboot
    link = tmp_path / "multi-user.target.wants" / "ufw.service"
    assert not ufwboot.wanted_by_the_boot(link)
    link.parent.mkdir()
    link.symlink_to("/lib/systemd/system/ufw.service")
    assert ufwboot.wanted_by_the_boot(link) == os.path.exists("/lib/systemd/system/ufw.service")
    link.unlink()
    link.symlink_to(tmp_path / "ufw.service")  # a unit file of root's, named like ufw's
    assert not ufwboot.wanted_by_the_boot(link)
    assert not ufwboot.restorable(ufwboot.NOT_BY_THE_BOOT)


def test_the_switch_asks_systemd_and_sets_each_state_it_gives_back(fakebus, tmp_path: Path):
    """Through systemd's D-Bus API (a stand-in systemd on a private bus)."""
    from statemesh.guarantees import ufwboot
    ufw = fakebus.systemd.add("ufw.service", masked=True)
    link = tmp_path / "ufw.service"
    link.symlink_to("/lib/systemd/system/ufw.service")  # what enabling it makes
    switch = ufwboot.SystemdBootUnit(link)
    assert switch.state() == "masked"
    switch.set("enabled")
    assert (ufw.masked, ufw.enabled, switch.state()) == (False, True, "enabled")
    switch.set("masked")
    assert (ufw.masked, ufw.enabled, switch.state()) == (True, False, "masked")
    switch.set("enabled")
    switch.set("disabled")
    assert (ufw.masked, ufw.enabled, switch.state()) == (False, False, "disabled")
    switch.set("enabled")
    link.unlink()  # enabled, but only through some other target's .wants
    assert switch.state() == ufwboot.NOT_BY_THE_BOOT


def test_a_restore_record_without_ufws_boot_unit_leaves_it_enabled(ns: Namespace):
    """A record written before the unit's state was kept has none to give back."""
    ns.guarantee("apply", ZONE_CONF)
    record = ns.restore_record()
    del record["firewall"]["ufw_unit"]
    ns.state_dir.joinpath("restore.json").write_text(json.dumps(record))
    ns.guarantee("revert", ZONE_CONF)
    assert not ns.ufw_unit.exists() or ns.ufw_unit.read_text() == "enabled"


def test_apply_is_idempotent_remembers_the_first_state_and_follows_the_zone(ns: Namespace):
    ns.guarantee("apply", ZONE_CONF)
    files = ns.ufw_files()
    events = len(ns.events())
    again = ns.guarantee("apply", ZONE_CONF)
    assert again["holds"], again["detail"]
    assert ns.ufw_files() == files
    new_events = [e["event"] for e in ns.events()[events:]]
    assert new_events == ["firewall-enabled"]
    assert ns.restore_record()["firewall"]["enabled"] is False

    changed = ns.guarantee("apply", "Zone: eu-west\nZone-Peers: 10.77.1.0/24\n")
    assert changed["holds"], changed["detail"]
    assert changed["facts"]["allowed_peers"] == ["10.77.1.0/24"]

    ns.guarantee("revert", ZONE_CONF)
    assert added_rules(ns) == []
    assert "ENABLED=no" in ns.ufw_files()["etc-ufw/ufw.conf"]


def test_reapply_repairs_the_kernel_and_check_sees_rules_outside_ufw(ns: Namespace):
    ns.guarantee("apply", ZONE_CONF)
    ns.sh("iptables -F ufw-user-input && ip6tables -P INPUT ACCEPT")
    tampered = ns.guarantee("check", ZONE_CONF)
    assert not tampered["holds"] and tampered["facts"]["allowed_peers"] == ["fd00:77::/64"]
    assert "IPv6 INPUT is not ufw's deny (policy ACCEPT)" in tampered["detail"]
    repaired = ns.guarantee("apply", ZONE_CONF)
    assert repaired["holds"], repaired["detail"]

    ns.run(["iptables", "-I", "INPUT", "-p", "tcp", "--dport", "8080", "-j", "ACCEPT"])
    report = ns.guarantee("check", ZONE_CONF)
    assert not report["holds"]
    assert report["facts"]["rules_outside_ufw"] == ["-A INPUT -p tcp -m tcp --dport 8080 -j ACCEPT"]


HAND_RULE = ["ufw-before-input", "-p", "tcp", "--dport", "2222", "-j", "ACCEPT"]
# A line in user.rules that is no ufw rule: `ufw show added` lists only ufw's tuples, and the
# check reads no chain of ufw's but the user chain; ufw-init loads it at every boot.
PLANTED_LINE = "-A ufw-before-input -p tcp --dport 2222 -j ACCEPT"


def plant_in_user_rules(ns: Namespace) -> None:
    ns.sh(f"sed -i 's/^### END RULES ###/{PLANTED_LINE}\\n&/' /etc/ufw/user.rules")
    assert "2222" not in ns.sh("ufw show added") and PLANTED_LINE in ns.sh("cat /etc/ufw/user.rules")


def assert_nothing_of_2222(ns: Namespace, case: str) -> None:
    kernel = ns.sh("iptables -S")
    assert "2222" not in kernel, f"{case}: {kernel}"
    assert "2222" not in ns.sh("cat /etc/ufw/user.rules"), case


@pytest.mark.parametrize("enabled", ["yes", "no", "Yes", "yes\\r"])
def test_apply_leaves_the_kernel_as_the_next_boot_loads_it_not_as_it_was_left(
        ns: Namespace, enabled: str):
    """A prepared operator: an accept by hand in one of ufw's own chains (check reads only
    INPUT and the user chain) and ENABLED as ufw-init does not start on (no: `ufw enable`
    loads nothing while ufw's chains are in the kernel; Yes: on for ufw's command line,
    off at boot)."""
    ns.sh("ufw --force enable >/dev/null")
    ns.run(["iptables", "-I", *HAND_RULE])
    ns.sh(f"sed -i 's/^ENABLED=.*/ENABLED={enabled}/' /etc/ufw/ufw.conf")
    if enabled != "yes":
        assert "ufw is not enabled" in ns.guarantee("check", ZONE_CONF)["detail"]
    applied = ns.guarantee("apply", ZONE_CONF)
    assert applied["holds"], applied["detail"]
    assert_nothing_of_2222(ns, enabled)
    assert "ENABLED=yes\n" in ns.sh("cat /etc/ufw/ufw.conf")
    ns.sh("/lib/ufw/ufw-init stop >/dev/null && /lib/ufw/ufw-init start >/dev/null")  # a boot
    assert ns.guarantee("check", ZONE_CONF)["holds"]


@pytest.mark.parametrize("chains_loaded", [True, False])
def test_a_line_planted_in_user_rules_is_loaded_nowhere(ns: Namespace, chains_loaded: bool):
    """The node's rules already there (a retry, an upgrade, or an operator who added them):
    no rule of ufw's changes, and ufw would not rewrite its files."""
    ns.guarantee("apply", ZONE_CONF)
    if not chains_loaded:
        ns.sh("ufw disable >/dev/null && /lib/ufw/ufw-init flush-all >/dev/null")
        ns.sh(f"rm -rf {ns.state_dir}")
    plant_in_user_rules(ns)
    applied = ns.guarantee("apply", ZONE_CONF)
    assert applied["holds"], applied["detail"]
    assert_nothing_of_2222(ns, f"chains loaded: {chains_loaded}")


@pytest.mark.parametrize("logging", ["off", "full"])
def test_what_ufw_writes_in_its_users_rules_passes_and_a_line_added_there_fails_the_check(
        ns: Namespace, logging: str):
    """user.rules is ufw's to write (no template to compare with): a line added while the
    installing session is spared, after the installation's `ufw enable` wrote the file,
    was loaded at the next boot into ufw-before-input, a chain the check does not read, while
    status said the firewall held."""
    set_operator_state(ns)  # allow, limit, deny, route rules
    ns.sh("sed -i 's/^IPV6=.*/IPV6=yes/' /etc/default/ufw && ufw reload >/dev/null\n"
          f"ufw logging {logging} >/dev/null\n"
          "ufw allow log 2200/tcp >/dev/null\n"
          "ufw allow log-all from 192.0.2.9 >/dev/null\n"
          "ufw limit log 2201/tcp >/dev/null\n"
          "ufw deny log from 198.51.100.0/24 to any port 53 proto udp >/dev/null\n"
          "ufw allow in on eth0 log to any port 80,443 proto tcp >/dev/null\n"
          "ufw route allow in on eth0 out on eth1 log-all to 10.9.0.0/24 >/dev/null\n"
          "ufw allow log 'WWW Full' >/dev/null\n"
          "ufw allow log-all from fd00:99::/64 to any port 2202 proto tcp >/dev/null\n")
    for name in ufwfiles.USER_RULES_FILES:
        assert ufwfiles.user_rules_problem(str(ns.workdir / "etc-ufw" / name)) is None
        written = (ns.workdir / "etc-ufw" / name).read_text()
        assert "-user-logging-input -p tcp --dport 2200" in written  # a logged rule's lines
    assert ns.guarantee("apply", ZONE_CONF)["holds"]

    plant_in_user_rules(ns)
    report = ns.guarantee("check", ZONE_CONF)
    assert not report["holds"]
    assert (f"/etc/ufw/user.rules holds lines ufw does not write there: '{PLANTED_LINE}'"
            in report["detail"]), report["detail"]
    assert list(report["facts"]["ufw_files_changed"]) == ["/etc/ufw/user.rules"]


def test_an_accept_added_to_ufws_before_rules_fails_the_check(ns: Namespace):
    """ufw-init loads before.rules into ufw's own chains, which the check does not read: the
    port was open while the finding said "tcp/7443 open only to" the zone."""
    before_rules = ns.workdir / "etc-ufw" / "before.rules"
    pristine = before_rules.read_text()
    before_rules.write_text(pristine.replace("\nCOMMIT\n", f"\n{PLANTED_LINE}\nCOMMIT\n"))
    applied = ns.guarantee("apply", ZONE_CONF)
    assert "-A ufw-before-input -p tcp -m tcp --dport 2222 -j ACCEPT" in ns.sh("iptables -S")
    assert not applied["holds"]
    assert applied["facts"]["ufw_files_changed"] == ["/etc/ufw/before.rules"]
    template = "/usr/share/ufw/iptables/before.rules"
    assert applied["detail"] == (
        f"/etc/ufw/before.rules differs from the ufw package's {template}: ufw.service loads "
        f"it into the kernel at every boot (cp {template} /etc/ufw/before.rules)")
    ns.sh(f"cp {template} /etc/ufw/before.rules")  # what the finding says to do
    repaired = ns.guarantee("apply", ZONE_CONF)
    assert repaired["holds"], repaired["detail"]
    assert repaired["facts"]["ufw_files_changed"] == []
    assert_nothing_of_2222(ns, "before.rules as ufw's package wrote it")


def test_bad_config_is_refused_and_changes_nothing(ns: Namespace):
    ns.run(["ufw", "allow", "22/tcp"])
    files = ns.ufw_files()
    refused = ns.guarantee("apply", "Zone: eu-west\nMesh-Port: 7443\nZone-Peers: 10.77.0.0/33\n", expect_error=True)
    assert "node.conf:3: Zone-Peers: not a CIDR network" in refused["error"]
    refused = ns.guarantee("apply", "Mesh-Port: 0\n", expect_error=True)
    assert "node.conf:1: Mesh-Port: not a port number" in refused["error"]
    assert ns.ufw_files() == files
    assert not ns.state_dir.exists()


def test_revert_without_record_changes_nothing(ns: Namespace):
    ns.run(["ufw", "allow", "22/tcp"])
    files = ns.ufw_files()
    ns.guarantee("revert", ZONE_CONF)
    assert ns.ufw_files() == files


def test_revert_restores_what_it_can_and_names_what_it_cannot(ns: Namespace):
    record = firewall.UfwState(False, "deny", "allow", "yes", ("allow NoSuchProfile", "allow 22/tcp"))
    ns.state_dir.mkdir()
    (ns.state_dir / "restore.json").write_text(json.dumps({"firewall": record.as_record()}))
    ns.guarantee("apply", ZONE_CONF)
    failed = ns.guarantee("revert", ZONE_CONF, expect_error=True)
    assert "ufw allow NoSuchProfile" in failed["error"]
    assert added_rules(ns) == ["ufw allow 22/tcp"]


def test_preflight_notes_and_boot_reassert_on_installed_nodes_only(ns: Namespace):
    ns.run(["ufw", "allow", "22/tcp"])
    ns.run(["iptables", "-A", "INPUT", "-i", "virbr0", "-p", "udp", "--dport", "53", "-j", "ACCEPT"])
    notes = ns.guarantee("preflight", ZONE_CONF)
    assert notes == [
        "ufw rule to be removed (put back at purge): ufw allow 22/tcp",
        "rule outside ufw, the firewall guarantee fails while it exists: "
        "-A INPUT -i virbr0 -p udp -m udp --dport 53 -j ACCEPT",
    ]
    ns.run(["iptables", "-F", "INPUT"])
    files = ns.ufw_files()
    assert ns.guarantee("reassert", ZONE_CONF) == {"reasserted": False}  # not installed
    assert ns.ufw_files() == files

    ns.guarantee("apply", ZONE_CONF)
    ns.guarantee("installed", ZONE_CONF)
    ns.run(["ufw", "allow", "8080/tcp"])  # what an edit from other media would leave
    reasserted = ns.guarantee("reassert", ZONE_CONF)
    assert reasserted["holds"], reasserted["detail"]
    assert [e["applied"] for e in ns.events() if e["event"] == "firewall-reasserted"] == [["firewall"]]

    files = ns.ufw_files()  # a boot that finds the firewall holding changes nothing
    assert ns.guarantee("reassert", ZONE_CONF)["holds"]
    assert [e["applied"] for e in ns.events() if e["event"] == "firewall-reasserted"] == [["firewall"], []]
    assert ns.ufw_files() == files

    ns.guarantee("failed", ZONE_CONF)  # an installation interrupted in this boot
    refused = ns.guarantee("reassert", ZONE_CONF, expect_error=True)
    assert refused["error"].startswith("reboot required")


def probe(ns: Namespace, targets: Sequence[Sequence[Any]]) -> List[str]:
    result = ns.run(["ip", "netns", "exec", "peer", "/usr/bin/python3", "-c", PROBE, json.dumps(targets)])
    return json.loads(result.stdout)


def test_only_zone_peers_reach_the_mesh_port_over_tcp(ns: Namespace):
    ns.sh(VETH)
    listener: Optional[subprocess.Popen] = ns.popen(["/usr/bin/python3", "-c", LISTENER, "7443", "8080"])
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
        targets = [
            ("10.77.0.2", "10.77.0.1", 7443),  # zone peer, mesh port
            ("fd00:77::2", "fd00:77::1", 7443),
            ("10.77.0.2", "10.77.0.1", 8080),  # zone peer, another listening port
            ("fd00:77::2", "fd00:77::1", 8080),
            ("10.77.1.2", "10.77.1.1", 7443),  # outside the zone, mesh port
            ("fd00:78::2", "fd00:78::1", 7443),
        ]
        assert probe(ns, targets) == ["open"] * 6  # everything answers without the firewall
        ns.guarantee("apply", ZONE_CONF)
        assert probe(ns, targets) == ["open", "open"] + ["dropped"] * 4
        ns.guarantee("revert", ZONE_CONF)
        assert probe(ns, targets) == ["open"] * 6
    finally:
        listener.kill()
        listener.wait()
