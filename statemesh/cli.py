"""The `statemesh-node` command: one argparse subcommand per operator-facing action.

Each command imports the modules it needs when it runs, not when this module loads: the
boot units run commands (storage setup in sysinit, the firewall, the vTPM's class check)
that need neither D-Bus nor the TPM stack, and importing everything cost each of them
seconds on a slow machine (half a second here, tens of seconds under emulation). psutil
too is loaded only by the commands that look at processes (a quarter second of every other
command's start under emulation: storage setup, the class check, the endpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from statemesh import __version__, config
from statemesh.guarantees.base import FIREWALL_UNIT, Finding

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def _print_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _print_findings(findings: List[Finding]) -> None:
    width = max((len(f.name) for f in findings), default=0)
    for finding in findings:
        mark = "ok  " if finding.holds else "FAIL"
        print(f"{mark} {finding.name:<{width}}  {finding.detail}")


def cmd_config(args: argparse.Namespace) -> int:
    """Validate node.conf and show the effective configuration."""
    node_config = config.load(args.config)
    if args.json:
        _print_json(config.as_dict(node_config))
    else:
        for key, value in config.as_dict(node_config).items():
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            print(f"{key}: {shown}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """Show, live, whether each guarantee holds; non-zero exit when any does not."""
    from statemesh import grace, guarantees, install, journal, ownunits, preflight
    from statemesh.guarantees import tamper
    node_config = config.load(args.config)
    with grace.pinned():
        installation = install.installation_finding(journal.Journal())
        ordered = guarantees.ordered(node_config)
        # The listener runs on an installed node, even while it still spares the installer.
        installed = installation.facts.get("state") == journal.INSTALLED
        listener = tamper.listener_finding(ordered, installed)
        units = ownunits.finding()
        planted = preflight.planted_finding()
        findings = [g.check() for g in ordered]
    holds = all(f.holds for f in (installation, listener, units, planted, *findings))
    if args.json:
        _print_json(
            {
                "version": __version__,
                "zone": node_config.zone,
                "holds": holds,
                "installation": installation.as_dict(),
                "tamper_listener": listener.as_dict(),
                "package_units": units.as_dict(),
                "planted": planted.as_dict(),
                "guarantees": [f.as_dict() for f in findings],
            }
        )
    else:
        print(f"statemesh-node {__version__}  zone {node_config.zone}")
        _print_findings([installation, listener, units, planted, *findings])
        print("all guarantees hold" if holds else "NOT all guarantees hold")
    return EXIT_OK if holds else EXIT_FAILED


def cmd_watchdog(args: argparse.Namespace) -> int:
    """Run the terminal watchdog (what statemesh-watchdog.service runs)."""
    from statemesh import grace
    from statemesh.watchdog import daemon, devicefilter
    node_config = config.load(args.config)
    settings = daemon.Settings(
        devpts=args.devpts,
        dev=args.dev,
        grace_path=args.grace_file or grace.GRACE_PATH,
        exempt_units=node_config.watchdog_exempt_units,
        logind=not args.no_logind,
        filter_cgroup=args.terminal_filter,
        filter_pins=args.terminal_filter_pins or devicefilter.PIN_DIRECTORY,
    )
    try:
        return daemon.main(settings)
    except daemon.WatchdogError as error:
        print(f"statemesh-node: {error}", file=sys.stderr)
        return EXIT_FAILED


def cmd_storage(args: argparse.Namespace) -> int:
    """Set up or destroy the encrypted /var/lib/statemesh (statemesh-storage.service runs it)."""
    from statemesh import journal, volume
    store = volume.Volume(config.load(args.config))
    try:
        if args.action == "setup":
            journal.require_clean_boot()  # teardown must always work: it destroys data
        steps = [store.setup()] if args.action == "setup" else store.teardown()
    except (volume.StorageError, volume.CommandError, journal.RebootRequiredError,
            OSError) as error:
        print(f"statemesh-node: storage {args.action} failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    for step in steps:
        print(f"storage: {step}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify a node's aTLS evidence: print its class, zone, PCRs and the verdict."""
    from statemesh.attest import endpoint
    return endpoint.verify(args.target, args.policy, config.load(args.config), args.json,
                           args.allow_weak)


def cmd_atls_serve(args: argparse.Namespace) -> int:
    """Serve this node's aTLS endpoint on the mesh port (statemesh-atls.service runs it).

    Unprivileged, it cannot read the installation's journal: the state service (root) tells
    it the node's state, a reboot required among what makes it "not ready"."""
    from statemesh.attest import endpoint
    return endpoint.serve(config.load(args.config))


def cmd_state_serve(args: argparse.Namespace) -> int:
    """Measure the node's state as root for the aTLS endpoint (statemesh-state.socket starts
    it at the endpoint's first request). It serves while a reboot is required too: status
    then says so, and the endpoint answers "not ready" with the reason."""
    from statemesh.attest import stateservice
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        listener = stateservice.activated()
    except stateservice.NotActivated as error:
        print(f"statemesh-node: {error}", file=sys.stderr)
        return EXIT_FAILED
    return stateservice.serve(listener)


def cmd_security_class(args: argparse.Namespace) -> int:
    """Show the node's security class (tpm or weak) and why."""
    from statemesh.guarantees import securityclass
    return securityclass.print_class(config.load(args.config), args.json, args.is_weak)


def cmd_preflight(args: argparse.Namespace) -> int:
    """Check whether this machine may become a node; list every reason to refuse."""
    from statemesh import preflight
    from statemesh.guarantees import firewall
    report = preflight.check()
    report.facts["firewall_notes"] = firewall.preflight_notes(config.load(args.config))
    if args.json:
        _print_json(report.as_dict())
    elif report.ok:
        print(f"preflight passed: {report.facts['os']}, no other interactive session")
    else:
        print("preflight refused:")
        for problem in report.problems:
            print(f"  - {problem}")
    for note in [] if args.json else report.facts["firewall_notes"]:
        print(f"  note: {note}")
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_firewall(args: argparse.Namespace) -> int:
    """Re-apply the firewall from node.conf on an installed node (statemesh-firewall.service)."""
    from statemesh import guarantees, install, journal
    from statemesh import systemd
    from statemesh.guarantees import firewall
    from statemesh.run import CommandError
    ordered = guarantees.ordered(config.load(args.config))
    try:
        findings = install.reapply_at_boot(journal.Journal(), ordered, FIREWALL_UNIT)
    except (journal.RebootRequiredError, firewall.FirewallError, CommandError,
            systemd.SystemdError) as error:
        print(f"statemesh-node: {error}", file=sys.stderr)
        return EXIT_FAILED
    if findings is None:
        print("statemesh-node: not installed; the installation applies the firewall")
        return EXIT_OK
    if args.json:
        for finding in findings:  # the firewall's alone: one JSON object, as before
            _print_json(finding.as_dict())
    else:
        _print_findings(findings)
    return EXIT_OK if all(f.holds for f in findings) else EXIT_FAILED


def cmd_selftest(args: argparse.Namespace) -> int:
    """Try every way in that is safe on a live node; non-zero exit if any is open."""
    from statemesh import selftest
    probes = selftest.run_all(config.load(args.config))
    blocked = all(p.blocked for p in probes)
    if args.json:
        _print_json({"blocked": blocked, "probes": [p.as_dict() for p in probes]})
    else:
        width = max(len(p.name) for p in probes)
        for probe in probes:
            print(f"{'blocked' if probe.blocked else 'OPEN   '} {probe.name:<{width}}  {probe.detail}")
        print("every way in is blocked" if blocked else "SOME way in is OPEN")
    return EXIT_OK if blocked else EXIT_FAILED


def cmd_install(args: argparse.Namespace) -> int:
    """Harden this machine through statemesh-harden.service (the postinst runs this)."""
    from statemesh import install
    config.load(args.config)
    return install.request_install(quiet=os.environ.get("DEBIAN_FRONTEND") == "noninteractive")


def cmd_harden(args: argparse.Namespace) -> int:
    """Run the installation transaction or boot-time lockdown (statemesh-harden.service)."""
    from statemesh import install
    return install.harden(config.load(args.config), listen=not args.no_listen)


def cmd_uninstall(args: argparse.Namespace) -> int:
    """Destroy the data, then give the machine back (the prerm runs this at removal)."""
    from statemesh import install
    return install.uninstall(config.load(args.config))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="statemesh-node",
        description="Turn this machine into a StateMesh node its operator cannot enter.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config", type=Path, default=config.DEFAULT_PATH, help="node configuration file"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands: Dict[str, Callable[[argparse.Namespace], int]] = {
        "status": cmd_status,
        "config": cmd_config,
        "watchdog": cmd_watchdog,
        "storage": cmd_storage,
        "verify": cmd_verify,
        "atls-serve": cmd_atls_serve,
        "state-serve": cmd_state_serve,
        "security-class": cmd_security_class,
        "preflight": cmd_preflight,
        "selftest": cmd_selftest,
        "install": cmd_install,
        "harden": cmd_harden,
        "uninstall": cmd_uninstall,
        "firewall": cmd_firewall,
    }
    for name, handler in commands.items():
        command = sub.add_parser(name, help=(handler.__doc__ or "").strip().splitlines()[0])
        command.add_argument("--json", action="store_true", help="print JSON")
        command.set_defaults(handler=handler)
    watchdog_args = sub.choices["watchdog"]
    watchdog_args.add_argument("--devpts", default="/dev/pts", help="devpts mount to watch")
    watchdog_args.add_argument("--dev", default="/dev", help="directory of terminal devices")
    watchdog_args.add_argument("--grace-file", type=Path,
                               help="installation grace record (default: the installation's)")
    watchdog_args.add_argument("--no-logind", action="store_true", help="leave logind alone")
    watchdog_args.add_argument("--terminal-filter", type=Path, metavar="CGROUP2_ROOT",
                               help="refuse terminal opens below this cgroup v2 root "
                                    "(the unit gives /sys/fs/cgroup)")
    watchdog_args.add_argument("--terminal-filter-pins", type=Path, metavar="BPFFS_DIRECTORY",
                               help="where the filter is pinned (default: /sys/fs/bpf)")
    sub.choices["storage"].add_argument("action", choices=("setup", "teardown"))
    sub.choices["verify"].add_argument("target", metavar="HOST:PORT", help="the node's aTLS endpoint")
    sub.choices["verify"].add_argument("--policy", type=Path, help="JSON verification policy")
    sub.choices["verify"].add_argument(
        "--allow-weak", action="store_true",
        help="built-in policy: accept weak nodes (software vTPM) too; they stay flagged")
    sub.choices["security-class"].add_argument(
        "--is-weak", action="store_true", help="exit 0 only if the node is weak")
    sub.choices["harden"].add_argument(
        "--no-listen", action="store_true", help="exit after hardening (no tamper listener)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    try:
        return args.handler(args)
    except config.ConfigError as error:
        print(f"statemesh-node: {error}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
