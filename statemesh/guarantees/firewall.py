"""Node isolation: ufw denies every incoming connection but the mesh port from the zone's peers.

The node must expose nothing but its attested mesh endpoint, and only to the peers of its
zone (node.conf: Mesh-Port, Zone, Zone-Peers), so that zones stay segmented. ufw is the
firewall Debian and Ubuntu ship, and its rules survive reboots by themselves: ufw.service
loads them early at every boot, then statemesh-firewall.service applies node.conf again over
them (its boot_unit: `statemesh-node firewall`), undoing whatever was changed while the node
was down.

What happens to the operator's rules: the node's firewall consists of our rules only. Every
other ufw user rule (allow, limit, deny, reject, route, application profiles) is reported by
`check()` (facts["foreign_rules"], shown by status) and `preflight_notes()`, and removed by
`apply()`. The previous ufw state as a whole (enabled or not, incoming/outgoing default
policies, the IPV6 setting and every user rule, in order) is remembered in the restore
record before anything changes, and `revert()` puts exactly that back at purge.

IPv6: with IPV6=no in /etc/default/ufw, ufw drops all IPv6 traffic and refuses IPv6 rules,
so IPv6 zone peers could never reach the node; `apply()` sets IPV6=yes (the previous value
is in the restore record). On a kernel without IPv6 there is nothing to reach over IPv6, and
IPv6 peers are skipped and reported.

The kernel is made to hold what ufw's files say: `apply()` reloads them the way
ufw.service loads them at boot whenever ufw's chains are in the kernel already (`ufw enable`
loads nothing then), so the check reads what the next boot will enforce.

What fills ufw's own chains is read where it comes from: ufw-init loads before.rules,
before6.rules, after.rules and after6.rules into them at every boot, and `check()` fails
while one of them is not its template as the ufw package installed it (statemesh.ufwfiles:
an accept added to before.rules; facts["ufw_files_changed"]); preflight refuses such a
machine beforehand, and one whose executable before.init or after.init (run as root by
ufw-init) is not the package's. The rules in ufw's chains in the kernel are not compared with
those files, only the files with ufw's package: that suffices because the installation loads
the kernel from the files as the next boot will (`_enable_as_at_boot`), every boot loads
them again, and after the installation's grace nobody is left to change the kernel by hand.

Limits, reported rather than hidden: ufw's own before.rules as shipped still accept ICMP,
DHCP replies and mDNS/UPnP multicast; forwarding is not checked (DEFAULT_FORWARD_POLICY in
/etc/default/ufw and IP forwarding in /etc/ufw/sysctl.conf are the operator's, so a prepared
node can route between zones), nor are /etc/default/ufw and ufw.conf beyond the settings
read here (ufw-init sources them as shell) or the sysctl file; rules added to the INPUT
chain with iptables outside ufw are not removed, but every one that is not one of ufw's hooks
and may accept (ACCEPT, or a jump to any other chain, one of ufw's own included) makes
`check()` fail while it exists (facts["rules_outside_ufw"]), and preflight names them
beforehand.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Pattern, Sequence, Tuple

from statemesh import dpkgdb, safefile, systemd, ufwfiles
from statemesh.config import IpNetwork, NodeConfig
from statemesh.guarantees import ufwboot
from statemesh.guarantees.base import FIREWALL_UNIT, Finding, Way
from statemesh.run import CommandError, have, run

NAME = "firewall"
# Comment carried by every rule this module adds, so that `ufw status` shows whose they are.
TAG = "statemesh-node"

UFW_CONF = Path("/etc/ufw/ufw.conf")
UFW_DEFAULTS = Path("/etc/default/ufw")
USER_RULES = (Path("/etc/ufw/user.rules"), Path("/etc/ufw/user6.rules"))
IPV6_PROC = Path("/proc/sys/net/ipv6")

# /etc/default/ufw stores iptables targets; the ufw command line speaks in these words.
_POLICY_WORDS = {"ACCEPT": "allow", "DROP": "deny", "REJECT": "reject"}
# The ufw chains its INPUT hooks jump to, per address family (what `ufw enable` loads).
_UFW_HOOK = {4: "ufw-before-input", 6: "ufw6-before-input"}
_USER_CHAIN = {4: "ufw-user-input", 6: "ufw6-user-input"}
_IPTABLES = {4: "iptables", 6: "ip6tables"}
# ufw itself puts this in INPUT when IPV6=no and never takes it out (MANAGE_BUILTINS=no);
# it accepts loopback only, which ufw's before rules accept anyway.
_LOOPBACK_ACCEPT = "-A INPUT -i lo -j ACCEPT"
# ufw's INPUT hooks exactly as its init script (ufw-init-functions) writes them; any other
# jump is someone else's, even to a chain named ufw*: ufw-user-limit-accept accepts.
_HOOK_CHAINS = ("before-logging-input", "before-input", "after-input", "after-logging-input",
                "reject-input", "track-input")
_UFW_INPUT_HOOKS = {family: frozenset(f"-A INPUT -j {prefix}-{chain}" for chain in _HOOK_CHAINS)
                    for family, prefix in ((4, "ufw"), (6, "ufw6"))}
# What ufw.service runs at boot; force-reload loads ufw's files as the next boot will.
UFW_INIT = Path(ufwfiles.UFW.init)
# Targets that cannot let a packet through when written in INPUT outside ufw.
_CLOSING_TARGETS = ("DROP", "REJECT", "LOG", "RETURN")


class FirewallError(RuntimeError):
    """The firewall could not be enforced or restored; the message says what is left to do."""


@dataclasses.dataclass(frozen=True)
class UfwState:
    """ufw's persistent configuration: what the restore record keeps and purge puts back."""

    enabled: bool
    incoming: str
    outgoing: str
    ipv6: Optional[str]
    rules: Tuple[str, ...]

    def as_record(self) -> Dict[str, Any]:
        record = dataclasses.asdict(self)
        record["rules"] = list(self.rules)
        return record

    @classmethod
    def from_record(cls, record: Dict[str, Any]) -> "UfwState":
        """Rebuild the state from the restore record, refusing one that is not ours."""
        try:
            state = cls(
                enabled=bool(record["enabled"]),
                incoming=str(record["incoming"]),
                outgoing=str(record["outgoing"]),
                ipv6=None if record["ipv6"] is None else str(record["ipv6"]),
                rules=tuple(str(rule) for rule in record["rules"]),
            )
        except (KeyError, TypeError) as error:
            raise FirewallError(f"the firewall's restore record is malformed: {error!r}") from None
        for policy in (state.incoming, state.outgoing):
            if policy not in _POLICY_WORDS.values():
                raise FirewallError(f"the firewall's restore record has a bad policy: {policy!r}")
        return state


@dataclasses.dataclass(frozen=True)
class Plan:
    """How to get from ufw's current user rules to the node's."""

    remove: Tuple[str, ...]
    add: Tuple[str, ...]
    skipped_peers: Tuple[IpNetwork, ...]


@dataclasses.dataclass(frozen=True)
class LiveFamily:
    """What the kernel enforces for one address family, read with iptables -S."""

    policy: str
    ufw_loaded: bool
    mesh_sources: Tuple[IpNetwork, ...]
    other_user_rules: Tuple[str, ...]
    outside_rules: Tuple[str, ...]


def _ufw(*args: str) -> str:
    return run(["ufw", *args]).stdout.decode(errors="replace")


def _rule_argv(rule: str) -> List[str]:
    """A rule as `ufw show added` prints it, back into ufw arguments."""
    try:
        return shlex.split(rule)
    except ValueError as error:
        raise FirewallError(f"cannot parse the ufw rule {rule!r}: {error}") from None


def _delete_argv(rule: str) -> List[str]:
    words = _rule_argv(rule)
    if words[:1] == ["route"]:
        return ["route", "delete", *words[1:]]
    return ["delete", *words]


def mesh_rule(network: IpNetwork, port: int) -> str:
    """The ufw rule (in `ufw show added` form) that opens the mesh port to one peer network."""
    return f"allow from {network} to any port {port} proto tcp comment '{TAG}'"


def _mesh_source(rule: str, port: int) -> Optional[IpNetwork]:
    """The peer network of a rule of ours for this port, None for any other rule."""
    try:
        words = shlex.split(rule)
    except ValueError:
        return None
    shape = ["allow", "from", "*", "to", "any", "port", str(port), "proto", "tcp", "comment", TAG]
    if len(words) != len(shape) or any(s not in ("*", w) for s, w in zip(shape, words)):
        return None
    try:
        return ipaddress.ip_network(words[2], strict=True)
    except ValueError:
        return None


def _read_config(path: Path) -> str:
    """One of ufw's configuration files; OSError when it cannot be read, FirewallError
    naming it when it is a FIFO or a device (root's to leave before installing: never
    waited on here, and ufw itself would wait on it)."""
    try:
        return safefile.read_text(path)
    except safefile.NotRegularFile as error:
        raise FirewallError(f"{path} is {error}") from None


def _read_assignments(path: Path) -> Dict[str, str]:
    """KEY=value lines of a shell-style configuration file, quotes removed."""
    values: Dict[str, str] = {}
    for line in _read_config(path).splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            values[key] = value.strip().strip("\"'")
    return values


def _set_assignment(path: Path, key: str, value: Optional[str]) -> None:
    """Set (or, for None, remove) one KEY=value line, replacing the file atomically."""
    lines = _read_config(path).splitlines(keepends=True)
    kept: List[str] = []
    written = False
    for line in lines:
        if line.strip().partition("=")[0] == key:
            if value is not None and not written:
                kept.append(f"{key}={value}\n")
                written = True
            continue
        kept.append(line)
    if value is not None and not written:
        kept.append(f"{key}={value}\n")
    temporary = path.with_name(f".{path.name}.statemesh-new")
    with open(temporary, "w", encoding="utf-8") as file:
        file.writelines(kept)
        file.flush()
        os.fchmod(file.fileno(), path.stat().st_mode & 0o7777)
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _show_added() -> Tuple[str, ...]:
    """ufw's user rules in order, in the command-line form ufw itself prints."""
    rules = []
    for line in _ufw("show", "added").splitlines():
        if line.startswith("ufw "):
            rules.append(line[len("ufw ") :])
    return tuple(rules)


def read_state() -> UfwState:
    """ufw's persistent configuration (needs root: ufw reads its rules files)."""
    defaults = _read_assignments(UFW_DEFAULTS)
    return UfwState(
        enabled=_enabled_at_boot(_read_config(UFW_CONF)),
        incoming=_policy(defaults, "DEFAULT_INPUT_POLICY"),
        outgoing=_policy(defaults, "DEFAULT_OUTPUT_POLICY"),
        ipv6=defaults.get("IPV6"),
        rules=_show_added(),
    )


def _policy(defaults: Dict[str, str], key: str) -> str:
    """A default policy as a ufw word; anything else could not be restored at purge."""
    value = defaults.get(key, "")
    if value not in _POLICY_WORDS:
        raise FirewallError(f"{UFW_DEFAULTS}: {key} is {value!r}, not ACCEPT, DROP or REJECT")
    return _POLICY_WORDS[value]


def _user_rules() -> Tuple[bytes, ...]:
    """ufw's user rules files as they are now, to tell whether ufw rewrote them."""
    return tuple(path.read_bytes() if path.is_file() else b"" for path in USER_RULES)


def _rule_lines(content: bytes) -> List[bytes]:
    """What iptables-restore reads of a rules file: its lines but blanks and comments."""
    lines = (line.strip() for line in content.splitlines())
    return [line for line in lines if line and not line.startswith(b"#")]


def _kept_in_order(old: Sequence[bytes], new: Sequence[bytes]) -> bool:
    """Whether every line of `old` is still in `new`, in the same order."""
    remaining = iter(new)
    return all(line in remaining for line in old)


def _enabled_at_boot(text: str) -> bool:
    """ENABLED as ufw-init takes it at boot: it sources ufw.conf and starts only on yes or YES
    (ufw's command line lowercases, so for it `Yes`, or a line ending in CR, is on)."""
    enabled = False
    for line in text.split("\n"):
        key, sep, value = line.partition("=")
        if sep and key == "ENABLED":
            value = value.split(" #", 1)[0].rstrip(" \t")
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            enabled = value in ("yes", "YES")
    return enabled


def _ufw_chains_loaded() -> bool:
    """What ufw-init start asks before it loads anything."""
    return run([_IPTABLES[4], "-L", _USER_CHAIN[4], "-n"], check=False).returncode == 0


def kernel_has_ipv6() -> bool:
    """ufw itself ignores IPv6 when the kernel has none (ipv6.disable=1)."""
    return IPV6_PROC.exists()


def plan(rules: Sequence[str], peers: Sequence[IpNetwork], port: int, ipv6: bool) -> Plan:
    """Rules to remove (everything not ours, stale ones of ours) and mesh rules to add."""
    wanted = [peer for peer in peers if ipv6 or peer.version == 4]
    present = set()
    remove = []
    for rule in rules:
        source = _mesh_source(rule, port)
        if source in wanted and source not in present:
            present.add(source)
        else:
            remove.append(rule)
    add = tuple(mesh_rule(peer, port) for peer in wanted if peer not in present)
    skipped = tuple(peer for peer in peers if peer not in wanted)
    return Plan(remove=tuple(remove), add=add, skipped_peers=skipped)


def _words(networks: Sequence[IpNetwork]) -> str:
    return " ".join(map(str, networks)) or "none"


def _options(words: Sequence[str]) -> Dict[str, str]:
    """iptables -S words as option -> value (flags without a value map to "")."""
    options: Dict[str, str] = {}
    for index, word in enumerate(words):
        if word.startswith("-"):
            following = words[index + 1] if index + 1 < len(words) else ""
            options[word] = "" if following.startswith("-") else following
    return options


def read_live(family: int, port: int) -> LiveFamily:
    """The filter table the kernel enforces for one family (needs root)."""
    output = run([_IPTABLES[family], "-S"]).stdout.decode(errors="replace")
    return parse_live(output.splitlines(), family, port)


def _may_accept(line: str, target: str, family: int) -> bool:
    """Whether an INPUT rule that is not one of ufw's hooks could let a packet in past ufw."""
    return (line not in _UFW_INPUT_HOOKS[family] and target not in _CLOSING_TARGETS
            and line != _LOOPBACK_ACCEPT)


def _mesh_rule(chain: str, port: int) -> Pattern[str]:
    """The mesh rule as `iptables -S` prints what ufw loads for it, word for word: any other
    rule is not one (a negated source or port, `! -s PEER ! --dport`, opens the rest)."""
    return re.compile(rf"-A {chain}(?: -s ([0-9a-f.:]+/[0-9]+))? -p tcp -m tcp "
                      rf"--dport {port} -j ACCEPT")


def parse_live(lines: Sequence[str], family: int, port: int) -> LiveFamily:
    """Policy, ufw hooks and user rules of one family's filter table, from iptables -S."""
    policy = "ACCEPT"
    hooked = False
    sources: List[IpNetwork] = []
    others: List[str] = []
    outside: List[str] = []
    anywhere = "0.0.0.0/0" if family == 4 else "::/0"
    mesh_rule = _mesh_rule(_USER_CHAIN[family], port)
    for line in lines:
        words = line.split()
        if words[:2] == ["-P", "INPUT"]:
            policy = words[2]
        elif words[:2] == ["-A", "INPUT"]:
            target = _options(words).get("-j", "")
            if line == f"-A INPUT -j {_UFW_HOOK[family]}":
                hooked = True
            elif _may_accept(line, target, family):
                outside.append(line)
        elif words[:2] == ["-A", _USER_CHAIN[family]]:
            mesh = mesh_rule.fullmatch(line)
            if mesh:
                sources.append(ipaddress.ip_network(mesh.group(1) or anywhere))
            else:
                others.append(line)
    return LiveFamily(policy, hooked, tuple(sources), tuple(others), tuple(outside))


class Firewall:
    """The firewall guarantee: ufw on, deny incoming, mesh port open to Zone-Peers only."""

    name = NAME
    # At every boot, after ufw.service has loaded the saved rules: catches what changed while
    # the node was down (ufw's files edited from other media, a node.conf an upgrade delivered).
    boot_unit = FIREWALL_UNIT
    tamper_watched = False
    holds_workload_data = False
    # Applying it on a node whose ufw runs means ufw-init force-reload: every chain deleted
    # and INPUT accepting until it loads them again (19 s of a 25 s apply in an emulated
    # Debian 12 guest, measured): at every unattended upgrade, the node open meanwhile. A
    # boot since the installation loaded ufw's chains from the files the check reads.
    kept_by_upgrades_while_holding = True

    def __init__(self, config: NodeConfig,
                 ufw_boot: Optional[ufwboot.BootUnit] = None):
        self.config = config
        self.ufw_boot = ufw_boot if ufw_boot is not None else ufwboot.SystemdBootUnit()

    def ways_in(self) -> Sequence[Way]:
        return ()

    def _families(self) -> Tuple[int, ...]:
        return (4, 6) if kernel_has_ipv6() else (4,)

    def check(self) -> Finding:
        """Read ufw's configuration and the kernel's live rules; change nothing."""
        port = self.config.mesh_port
        facts: Dict[str, Any] = {
            "zone": self.config.zone,
            "mesh_port": port,
            "configured_peers": [str(peer) for peer in self.config.zone_peers],
        }
        if not have("ufw"):
            return Finding(self.name, False, "ufw is not installed", facts)
        changed = ufwfiles.rules_problems(dpkgdb.installed_files(only=ufwfiles.PACKAGES))
        facts["ufw_files_changed"] = list(changed)
        try:
            state = read_state()
            live = {family: read_live(family, port) for family in self._families()}
            facts["ufw_unit"] = self.ufw_boot.state()
        except (CommandError, FirewallError, OSError, systemd.SystemdError) as error:
            return Finding(self.name, False, f"cannot read the firewall: {error}", facts)
        todo = plan(state.rules, self.config.zone_peers, port, 6 in live)
        allowed = [source for family in live.values() for source in family.mesh_sources]
        facts.update(
            enabled=state.enabled,
            active=all(f.ufw_loaded and f.policy == "DROP" for f in live.values()),
            incoming=state.incoming,
            outgoing=state.outgoing,
            ipv6=state.ipv6,
            allowed_peers=[str(source) for source in allowed],
            foreign_rules=list(todo.remove),
            skipped_peers=[str(peer) for peer in todo.skipped_peers],
            rules_outside_ufw=[rule for f in live.values() for rule in f.outside_rules],
        )
        problems = self._problems(state, live, todo, allowed, list(changed.values()))
        if facts["ufw_unit"] != ufwboot.ENABLED:
            problems.append(f"{ufwboot.UNIT} is {facts['ufw_unit']}: no boot loads ufw's rules "
                            "before the network is up, and every port answers until "
                            f"{FIREWALL_UNIT} applies them")
        if problems:
            return Finding(self.name, False, "; ".join(problems), facts)
        peers = " ".join(facts["allowed_peers"]) or "nobody (Zone-Peers is empty)"
        return Finding(self.name, True, f"ufw active, tcp/{port} open only to {peers}", facts)

    def _problems(
        self,
        state: UfwState,
        live: Dict[int, LiveFamily],
        todo: Plan,
        allowed: List[IpNetwork],
        changed_files: List[str],
    ) -> List[str]:
        problems = []
        if not state.enabled:
            problems.append("ufw is not enabled")
        if state.incoming != "deny" or state.outgoing != "allow":
            defaults = f"{state.incoming} incoming, {state.outgoing} outgoing"
            problems.append(f"ufw defaults are {defaults}, not deny incoming, allow outgoing")
        if 6 in live and state.ipv6 != "yes":
            problems.append("IPv6 is not managed by ufw (IPV6 is not yes in /etc/default/ufw)")
        for family, seen in live.items():
            if not seen.ufw_loaded or seen.policy != "DROP":
                problems.append(f"IPv{family} INPUT is not ufw's deny (policy {seen.policy})")
            for rule in seen.outside_rules + seen.other_user_rules:
                problems.append(f"IPv{family} rule not ours: {rule}")
        for rule in todo.remove:
            problems.append(f"operator rule to be removed: ufw {rule}")
        expected = [p for p in self.config.zone_peers if p not in todo.skipped_peers]
        if sorted(map(str, allowed)) != sorted(map(str, expected)):
            problems.append(f"mesh port open to {_words(allowed)}, Zone-Peers says {_words(expected)}")
        return problems + changed_files

    def apply(self, journal: Any) -> None:
        """Remember ufw's state, remove every rule but ours, deny incoming, enable ufw."""
        port = self.config.mesh_port
        state = read_state()
        unit_state = self.ufw_boot.state()
        journal.remember(self.name, {**state.as_record(), "ufw_unit": unit_state})
        if unit_state != ufwboot.ENABLED:
            self.ufw_boot.set(ufwboot.ENABLED)
            journal.record("firewall-boot-loading-enabled", previous=unit_state)
        todo = plan(state.rules, self.config.zone_peers, port, kernel_has_ipv6())
        if state.incoming != "deny":
            _ufw("default", "deny", "incoming")
        if state.outgoing != "allow":
            _ufw("default", "allow", "outgoing")
        if state.ipv6 != "yes":
            _set_assignment(UFW_DEFAULTS, "IPV6", "yes")
            journal.record("firewall-ipv6-managed", previous=state.ipv6)
            if state.enabled:
                # An active ufw builds its IPv6 chains only on reload; live rule changes need them.
                _ufw("reload")
        for rule in todo.remove:
            _ufw(*_delete_argv(rule))
            journal.record("firewall-rule-removed", rule=rule)
        for rule in todo.add:
            _ufw(*_rule_argv(rule))
            journal.record("firewall-rule-added", rule=rule)
        for peer in todo.skipped_peers:
            journal.record("firewall-peer-skipped", peer=str(peer), reason="kernel without IPv6")
        self._enable_as_at_boot()
        peers = [str(peer) for peer in self.config.zone_peers]
        journal.record("firewall-enabled", mesh_port=port, peers=peers)

    @staticmethod
    def _enable_as_at_boot() -> None:
        """Leave the kernel holding what ufw.service will load from ufw's files at the next
        boot, whatever was done to it by hand or planted in the files. `ufw enable` writes
        user.rules anew from ufw's own rule tuples (a line planted among them goes), after
        loading the files, and only while ufw's chains are not in the kernel: when they
        were, or when it took a line out of what it had loaded, ufw-init reloads them
        (ufw's own `reload` would too, in 20 s against 13 s in an emulated guest). What it
        adds to the files (the logging and rate limiting a pristine user6.rules lacks) it
        adds to the running firewall too."""
        loaded = _ufw_chains_loaded()
        _set_assignment(UFW_CONF, "ENABLED", "yes")  # ufw-init takes only yes or YES
        before = _user_rules()
        _ufw("--force", "enable")
        after = _user_rules()
        if loaded or not all(_kept_in_order(_rule_lines(old), _rule_lines(new))
                             for old, new in zip(before, after)):
            run([str(UFW_INIT), "force-reload"])

    def revert(self, record: Dict[str, Any]) -> None:
        """Put back the remembered ufw state: rules in order, defaults, IPV6, enabled or not."""
        if not record:
            return  # apply() never ran: nothing of ours to undo
        if not have("ufw"):
            return  # ufw was removed (forcibly, before us), and its rules with it
        previous = UfwState.from_record(record)
        current = read_state()
        if not previous.enabled and current.enabled:
            _ufw("disable")
        for rule in current.rules:
            _ufw(*_delete_argv(rule))
        if current.ipv6 != previous.ipv6:
            _set_assignment(UFW_DEFAULTS, "IPV6", previous.ipv6)
        if current.incoming != previous.incoming:
            _ufw("default", previous.incoming, "incoming")
        if current.outgoing != previous.outgoing:
            _ufw("default", previous.outgoing, "outgoing")
        failed = []
        for rule in previous.rules:
            try:
                _ufw(*_rule_argv(rule))
            except CommandError as error:
                failed.append(f"ufw {rule} ({error})")
        if previous.enabled and current.enabled:
            _ufw("reload")  # load the restored defaults and IPV6 setting into the kernel
        elif previous.enabled:
            _ufw("--force", "enable")
        # A record written before ufw.service was kept has none: left enabled.
        unit_state = record.get("ufw_unit", ufwboot.ENABLED)
        if unit_state != ufwboot.ENABLED and ufwboot.restorable(unit_state):
            self.ufw_boot.set(unit_state)
        if failed:
            raise FirewallError("could not restore these operator rules: " + "; ".join(failed))


def preflight_notes(config: NodeConfig) -> List[str]:
    """For preflight: the ufw rules an installation would remove (and purge put back), and
    the rules outside ufw it would leave, which make the firewall guarantee fail."""
    families = (4, 6) if kernel_has_ipv6() else (4,)
    try:
        todo = plan(read_state().rules, config.zone_peers, config.mesh_port, 6 in families)
        outside = [rule for f in families for rule in read_live(f, config.mesh_port).outside_rules]
    except (CommandError, FirewallError, OSError) as error:
        return [f"cannot read the firewall: {error}"]
    notes = [f"ufw rule to be removed (put back at purge): ufw {rule}" for rule in todo.remove]
    notes += [f"rule outside ufw, the firewall guarantee fails while it exists: {r}" for r in outside]
    return notes
