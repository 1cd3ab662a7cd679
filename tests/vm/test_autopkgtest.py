"""Run the package's autopkgtests (debian/tests) inside an installed guest.

autopkgtest's own qemu runner turns KVM on whenever /dev/kvm exists, and KVM hangs on
these machines, so the harness plays the testbed: it follows debian/tests/control's
semantics for the restrictions we use (a test passes when it exits 0 and, without
allow-stderr, writes nothing to stderr).
"""

from __future__ import annotations

from typing import List, Tuple

import pytest

from debian.deb822 import Deb822

from harness.vm.driver import Guest
from harness.vm.image import ROOT

TESTS_DIR = ROOT / "debian" / "tests"


def _tests() -> List[Tuple[str, List[str]]]:
    found = []
    for paragraph in Deb822.iter_paragraphs((TESTS_DIR / "control").read_text().splitlines()):
        restrictions = paragraph.get("Restrictions", "").replace(",", " ").split()
        for name in paragraph["Tests"].replace(",", " ").split():
            found.append((name, restrictions))
    return found


def test_control_lists_every_test_script() -> None:
    scripts = {p.name for p in TESTS_DIR.iterdir() if p.name != "control"}
    assert {name for name, _ in _tests()} == scripts


@pytest.mark.cost(20)
def test_autopkgtests_pass_in_an_installed_guest(installed_guest: Guest) -> None:
    for name, restrictions in _tests():
        path = f"/tmp/autopkgtest-{name}"
        installed_guest.put(path, (TESTS_DIR / name).read_bytes(), mode=0o755)
        result = installed_guest.run(path, check=False, timeout=300)
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
        if "allow-stderr" not in restrictions:
            assert result.stderr == "", f"{name} wrote to stderr: {result.stderr}"
