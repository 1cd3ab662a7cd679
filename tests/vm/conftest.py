"""pytest fixtures of the VM suite: cached images, a local apt repository, booted guests.

Each test gets guests on fresh copy-on-write overlays; their console logs stay under
build/vm-artifacts/<test>/ and the tail is shown in the report of a failing test.

One run covers every release: each test runs on the first of --suites, the tests marked
every_release on the others too, and those marked later_releases on the others instead, so
that the workers share all of the work. Every
VM test declares what it costs (`cost` marker, seconds measured on 2 cores with two guests
running); the run starts with the most expensive, so that no long test is left for the
end of a worker's queue.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import pytest

from harness.vm import image, snapshot, vtpm
from harness.vm.driver import Guest, SavedGuest

ARTIFACTS = image.ROOT / "build" / "vm-artifacts"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--deb", action="store", type=Path, help="the statemesh-node .deb to test")
    parser.addoption("--suites", action="store", default="bookworm,trixie",
                     help="Debian releases of the guests, comma-separated: every test runs on "
                          "the first, the every_release tests on all of them")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "every_release: also run on the other supported releases (make vm-test "
        "runs the whole suite on bookworm and these tests on trixie, from the same .deb)")
    config.addinivalue_line(
        "markers", "later_releases: run on the releases after the first instead (what the "
        "first release's run of another test already does there; on the first when it is "
        "the only one)")
    config.addinivalue_line(
        "markers", "cost(seconds): what the test costs, measured (2 cores, two guests at once); "
        "the most expensive run first")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "suite" not in metafunc.fixturenames:
        return
    suites = metafunc.config.getoption("--suites").split(",")
    marked = metafunc.definition.get_closest_marker
    if marked("every_release"):
        metafunc.parametrize("suite", suites)
    elif marked("later_releases"):  # the first release's only when it is the only one
        metafunc.parametrize("suite", suites[1:] or suites)
    else:
        metafunc.parametrize("suite", suites[:1])


def _cost(item: pytest.Item) -> float:
    marker = item.get_closest_marker("cost")
    return float(marker.args[0]) if marker else 0.0


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    """Most expensive first; a test that boots a guest must say what it costs."""
    undeclared = [item.nodeid for item in items
                  if "suite" in getattr(item, "fixturenames", ()) and not _cost(item)]
    if undeclared:
        raise pytest.UsageError("VM tests without a cost marker: " + ", ".join(undeclared))
    items.sort(key=_cost, reverse=True)


@pytest.fixture(scope="session")
def deb(pytestconfig: pytest.Config) -> Path:
    path = pytestconfig.getoption("--deb")
    if path is None or not path.exists():
        raise pytest.UsageError("the VM suite needs --deb PATH to a built statemesh-node .deb")
    return path.resolve()


@pytest.fixture
def vm_image(suite: str) -> image.Image:
    """The cached image of this test's release (built by the first test that asks)."""
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
def provisioned_node(vm_image: image.Image, deb: Path, repo_disk: Path) -> SavedGuest:
    """A booted guest ready to install (node.conf written, apt's index read), saved running:
    guest_factory(saved=provisioned_node) restores it instead of a cold boot."""
    return snapshot.provisioned_node(vm_image, deb, repo_disk)


@pytest.fixture
def installed_node(vm_image: image.Image, deb: Path, repo_disk: Path) -> SavedGuest:
    """A node installed from `deb` without a TPM (weak), saved running: guest_factory(
    saved=installed_node) restores it in seconds instead of booting and installing."""
    return snapshot.installed_node(vm_image, deb, repo_disk, tpm=False)


@pytest.fixture
def installed_tpm_node(vm_image: image.Image, deb: Path, repo_disk: Path) -> SavedGuest:
    """As installed_node, with a TPM whose CA (its tpm_ca) the node trusts: `tpm` class."""
    return snapshot.installed_node(vm_image, deb, repo_disk, tpm=True)


@pytest.fixture
def guest_factory(request: pytest.FixtureRequest, vm_image: image.Image, repo_disk: Path,
                  tpm_ca: vtpm.LocalCa) -> Iterator[Callable[..., Guest]]:
    """Make booted guests: guest_factory(tpm=False, extra_disks_mib=(), kernel_args="",
    forward_ports=(), repo=None, saved=None) where repo is another repository disk (upgrade
    tests) and saved a SavedGuest to restore instead of booting."""
    guests: List[Guest] = []
    request.node.statemesh_guests = guests
    base = _artifact_dir(request)

    def make(tpm: bool = False, extra_disks_mib: Sequence[int] = (), kernel_args: str = "",
             forward_ports: Sequence[int] = (), repo: Path = None,
             saved: Optional[SavedGuest] = None) -> Guest:
        workdir = base / f"guest{len(guests)}"
        workdir.mkdir()
        guest = Guest(vm_image, workdir, repo or repo_disk,
                      tpm_ca=tpm_ca if tpm else None,
                      extra_disks_mib=extra_disks_mib, kernel_args=kernel_args,
                      forward_ports=forward_ports, saved=saved)
        guests.append(guest)
        guest.boot()
        return guest

    yield make
    for guest in guests:
        guest.close()
        for disk in [guest.overlay, *guest.extra_disks]:
            disk.unlink(missing_ok=True)


MEASURED = "measured"
TIMELINE = "timeline"


@pytest.fixture
def measured(record_property: Callable[[str, object], None]) -> Callable[[str, str], None]:
    """measured(what, figure): a figure for the notes, listed at the end of the run (as a
    user property it travels from pytest-xdist workers with the test's report)."""
    return lambda what, figure: record_property(MEASURED, f"{what}: {figure}")


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """List every figure the VM tests measured, with the test that measured it, and each
    release's share of the workers' time (set-up, call and tear-down of its tests)."""
    reports = [report for kind in ("passed", "failed", "error", "skipped")
               for report in terminalreporter.stats.get(kind, []) if hasattr(report, "when")]
    lines = [f"{report.nodeid}: {value}" for report in reports if report.when == "call"
             for name, value in report.user_properties if name == MEASURED]
    if lines:
        terminalreporter.section("measured in the guests")
        for line in lines:
            terminalreporter.write_line(line)
    suites = config.getoption("--suites").split(",")
    shares: Dict[str, List[float]] = {}
    counts: Dict[str, int] = {}
    for report in reports:
        suite = _suite_of(report.nodeid, suites)
        if suite:
            shares.setdefault(suite, []).append(report.duration)
            counts[suite] = counts.get(suite, 0) + (report.when == "call")
    if shares:
        terminalreporter.section("workers' time by release")
        for suite, durations in shares.items():
            terminalreporter.write_line(
                f"{suite}: {counts[suite]} tests, {sum(durations) / 60:.1f} min")
    _write_timeline(terminalreporter, reports)


def _write_timeline(terminalreporter, reports: Sequence[pytest.TestReport]) -> None:
    """Each worker's tests in the order it ran them, in minutes from the suite's start, and
    the time it sat idle at the end: where the wall time exceeds the workers' time / 2."""
    runs = sorted((value[1], value[2], value[0], report.nodeid) for report in reports
                  for name, value in report.user_properties if name == TIMELINE)
    if not runs:
        return
    origin, end = runs[0][0], max(stop for _start, stop, _worker, _test in runs)
    terminalreporter.section("timeline (minutes from the first test's start)")
    for worker in sorted({worker for _start, _stop, worker, _test in runs}):
        mine = [run for run in runs if run[2] == worker]
        for start, stop, _worker, test in mine:
            terminalreporter.write_line(
                f"{worker} {(start - origin) / 60:5.1f}-{(stop - origin) / 60:5.1f} {test}")
        terminalreporter.write_line(
            f"{worker} idle at the end: {(end - mine[-1][1]) / 60:.1f} min")


def _suite_of(nodeid: str, suites: Sequence[str]) -> Optional[str]:
    """The release in a test id's parameters ("test_x[bookworm]", "test_y[trixie-weak]")."""
    found = re.search(r"\[([^\]]*)\]$", nodeid)
    words = found.group(1).split("-") if found else []
    return next((word for word in words if word in suites), None)


@pytest.fixture
def guest(guest_factory: Callable[..., Guest]) -> Guest:
    return guest_factory()


@pytest.fixture
def installed_guest(guest_factory: Callable[..., Guest], installed_node: SavedGuest) -> Guest:
    """A running installed node (weak), restored from the saved one."""
    return guest_factory(saved=installed_node)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """When a test fails: keep each live guest's journal, show the end of each console and
    the node's own units' lines of the journal (CI keeps only what the report prints)."""
    outcome = yield
    report = outcome.get_result()
    if call.when == "setup":
        item.statemesh_started = call.start
    elif call.when == "call":  # (the terminal keeps passed set-ups' and tear-downs' apart)
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        report.user_properties.append(
            (TIMELINE, [worker, getattr(item, "statemesh_started", call.start), call.stop]))
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


def pytest_xdist_make_scheduler(config: pytest.Config, log) -> object:
    """Workers take the tests one at a time in the order above (most expensive first)."""
    from xdist.scheduler import LoadScheduling  # the VM suite always runs under xdist

    class LongestFirst(LoadScheduling):
        """xdist's load scheduling hands out chunks of consecutive tests, which puts the two
        most expensive tests on one worker, one after the other. Here each worker holds the
        test it runs and the next one (pytest needs to know the next test), no more."""

        AHEAD = 2

        def schedule(self) -> None:
            if self.collection is None:
                if not self._check_nodes_have_same_collection():
                    self.log("**Different tests collected, aborting run**")
                    return
                self.collection = list(self.node2collection.values())[0]
                self.pending[:] = range(len(self.collection))
            for _ in range(self.AHEAD):
                for node in self.nodes:
                    self.check_schedule(node)

        def check_schedule(self, node, duration: float = 0) -> None:
            if node.shutting_down:
                return
            if not self.pending:
                node.shutdown()
            elif len(self.node2pending[node]) < self.AHEAD:
                self._send_tests(node, 1)

    return LongestFirst(config, log)
