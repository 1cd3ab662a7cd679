"""Restored guests are fresh: the saved installed node is a starting point, never shared.

Most tests that need an installed node restore a saved one (harness/vm/snapshot.py) instead of
booting and installing. That is only sound if nothing one restored guest does reaches the
next: each restore runs on its own copy-on-write overlay, its own QEMU and its own TPM
state. (That a restored guest's TPM still answers is shown by the aTLS test of the tpm
class, whose quote is made after the restore.)
"""

from __future__ import annotations

from typing import Callable

import pytest

from harness.vm.driver import Guest, SavedGuest

MARKS = ("/root/restored-marker", "/var/lib/statemesh/restored-marker")


@pytest.mark.cost(15)
def test_a_restored_guest_sees_nothing_of_the_one_before(
        guest_factory: Callable[..., Guest], installed_node: SavedGuest) -> None:
    first = guest_factory(saved=installed_node)
    for path in MARKS:
        assert first.run(f"test -e {path}", check=False).returncode == 1
        first.put(path, b"written by the first restored guest\n")
    first.run("sync")
    first.shutdown()  # its overlay keeps what it wrote

    second = guest_factory(saved=installed_node)
    for path in MARKS:
        assert second.run(f"test -e {path}", check=False).returncode == 1, path
    # Both are the saved node, running: same boot, watchdog and volume as when it was saved.
    assert second.boot_id == first.boot_id
    assert second.run("statemesh-node status", check=False).returncode == 0
