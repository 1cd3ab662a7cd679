"""pytest fixtures of the VM suite: cached images, a local apt repository, booted guests.

Each test gets guests on fresh copy-on-write overlays; their console logs stay under
build/vm-artifacts/<test>/ and the tail is shown in the report of a failing test.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable, Iterator, List, Sequence

import pytest

from tests.vm import image, vtpm
from tests.vm.driver import Guest

ARTIFACTS = image.ROOT / "build" / "vm-artifacts"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--deb", action="store", type=Path, help="the statemesh-node .deb to test")
    parser.addoption("--suite", action="store", default="bookworm",
                     help="Debian release of the guests (bookworm or trixie)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "every_release: also run on the other supported releases (make vm-test "
        "runs the whole suite on bookworm and these tests on trixie, from the same .deb)")


@pytest.fixture(scope="session")
def deb(pytestconfig: pytest.Config) -> Path:
    path = pytestconfig.getoption("--deb")
    if path is None or not path.exists():
        raise pytest.UsageError("the VM suite needs --deb PATH to a built statemesh-node .deb")
    return path.resolve()


@pytest.fixture(scope="session")
def suite(pytestconfig: pytest.Config) -> str:
    return pytestconfig.getoption("--suite")


@pytest.fixture(scope="session")
def vm_image(suite: str) -> image.Image:
    return image.build(suite)


@pytest.fixture(scope="session")
def repo_disk(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image.build_repo_disk([deb], tmp_path_factory.mktemp("repo") / "repo.img")


@pytest.fixture(scope="session")
def tpm_ca(tmp_path_factory: pytest.TempPathFactory) -> vtpm.LocalCa:
    """The private CA that signs the EK certificates of guests' TPMs."""
    return vtpm.LocalCa(tmp_path_factory.mktemp("tpm-ca"))


def _artifact_dir(request: pytest.FixtureRequest) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)
    directory = ARTIFACTS / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


@pytest.fixture
def guest_factory(request: pytest.FixtureRequest, vm_image: image.Image, repo_disk: Path,
                  tpm_ca: vtpm.LocalCa) -> Iterator[Callable[..., Guest]]:
    """Make booted guests: guest_factory(tpm=False, extra_disks_mib=(), kernel_args="",
    forward_ports=(), repo=None) where repo is another repository disk (upgrade tests)."""
    guests: List[Guest] = []
    request.node.statemesh_guests = guests
    base = _artifact_dir(request)

    def make(tpm: bool = False, extra_disks_mib: Sequence[int] = (), kernel_args: str = "",
             forward_ports: Sequence[int] = (), repo: Path = None) -> Guest:
        workdir = base / f"guest{len(guests)}"
        workdir.mkdir()
        guest = Guest(vm_image, workdir, repo or repo_disk,
                      tpm_ca=tpm_ca if tpm else None,
                      extra_disks_mib=extra_disks_mib, kernel_args=kernel_args,
                      forward_ports=forward_ports)
        guests.append(guest)
        guest.boot()
        return guest

    yield make
    for guest in guests:
        guest.close()
        for disk in [guest.overlay, *guest.extra_disks]:
            disk.unlink(missing_ok=True)


MEASURED = "measured"


@pytest.fixture
def measured(record_property: Callable[[str, object], None]) -> Callable[[str, str], None]:
    """measured(what, figure): a figure for the notes, listed at the end of the run (as a
    user property it travels from pytest-xdist workers with the test's report)."""
    return lambda what, figure: record_property(MEASURED, f"{what}: {figure}")


def pytest_terminal_summary(terminalreporter) -> None:
    """List every figure the VM tests measured, with the test that measured it."""
    lines = [f"{report.nodeid}: {value}"
             for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", [])
             if report.when == "call"
             for name, value in report.user_properties if name == MEASURED]
    if lines:
        terminalreporter.section("measured in the guests")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
def guest(guest_factory: Callable[..., Guest]) -> Guest:
    return guest_factory()


@pytest.fixture
def installed_guest(guest: Guest) -> Guest:
    guest.install()
    return guest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """When a test fails: keep each live guest's journal, show the end of each console and
    the node's own units' lines of the journal (CI keeps only what the report prints)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for index, guest in enumerate(getattr(item, "statemesh_guests", [])):
            tail = "\n".join(guest.console_log().splitlines()[-80:])
            report.sections.append((f"guest{index} console ({guest.console_path})", tail))
            journal = guest.save_journal()
            if journal is not None:
                ours = [line for line in journal.read_text(encoding="utf-8").splitlines()
                        if "statemesh" in line]
                report.sections.append((f"guest{index} journal, statemesh lines ({journal})",
                                        "\n".join(ours[-80:])))
