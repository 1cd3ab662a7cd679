"""Shared pytest set-up: the tests import the product from this checkout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--systemd-version", type=int, default=None, metavar="N",
                     help="the stand-in systemd and logind (tests/fakebus) behave as systemd N: "
                     "without the D-Bus members added after it (make test-jammy: 249)")


def pytest_report_header(config: pytest.Config) -> str:
    """Which TPM backend, D-Bus library and stand-in systemd this run tests (make test runs
    twice, make test-jammy once more)."""
    from statemesh import dbusconn
    from statemesh.attest import tpm
    systemd = config.getoption("systemd_version") or "newest"
    return (f"statemesh: TPM backend {tpm.chosen_backend()}, D-Bus library "
            f"{dbusconn.chosen_backend()}, stand-in systemd {systemd}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "system_libssl: opens a TLS connection, which needs pyOpenSSL on the "
        "system's libssl.so.3 (make test-jammy deselects these; see tests/test_atls.py)")
    config.addinivalue_line(
        "markers", "system_apt: reads apt's configuration (or dpkg's database as apt's parser "
        "does) with python3-apt, a C extension "
        "built against the system's libapt-pkg that PyPI does not carry (make test-jammy "
        "deselects these)")
    config.addinivalue_line(
        "markers", "esapi: needs tpm2-pytss, to compare the two TPM backends (Ubuntu 22.04 "
        "has no tpm2-pytss: make test-jammy deselects these)")


@pytest.fixture
def stopped_process() -> Iterator[int]:
    """A child of the test stopped by SIGSTOP (state T): a stand-in for a stopped daemon."""
    child = subprocess.Popen(["sleep", "600"])
    try:
        os.kill(child.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while psutil.Process(child.pid).status() != psutil.STATUS_STOPPED:
            assert time.monotonic() < deadline, "the child did not stop"
            time.sleep(0.01)
        yield child.pid
    finally:
        child.kill()
        child.wait()


# How long a test of a FIFO or a device may take before it counts as waiting on one.
PROMPT_SECONDS = 10


@pytest.fixture
def returns_promptly() -> Iterator[None]:
    """Fails a test still running after PROMPT_SECONDS: opening a FIFO a check reads waits
    for a writer for ever, and the suite must go on and say so rather than hang. pytest's
    failure is no Exception (TimeoutError would be an OSError, which the code under test
    may take for an unreadable file and go on)."""
    def waited(_signal: int, _frame: object) -> None:
        pytest.fail(f"still waiting after {PROMPT_SECONDS} s (on a FIFO or a device?)")

    previous = signal.signal(signal.SIGALRM, waited)
    signal.alarm(PROMPT_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def this_host_is_never_hardened(monkeypatch: pytest.MonkeyPatch) -> None:
    """Locking loginuids cannot be undone before a reboot: no host test may reach the kernel's
    switch, whatever a guarantee under test is given (tests pass a stand-in instead)."""
    from statemesh import audit

    def refuse() -> None:
        raise AssertionError("a host test tried to make this host's loginuids immutable")
    monkeypatch.setattr(audit, "make_loginuid_immutable", refuse)



@pytest.fixture(autouse=True)
def listener_state_of_the_test(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The tamper listener's record for status, in the test's own directory: a listener run
    by a host test must not write under this host's /run."""
    from statemesh.guarantees import tamper
    state = tmp_path / "listener.json"
    monkeypatch.setattr(tamper, "LISTENER_STATE", state)
    return state
