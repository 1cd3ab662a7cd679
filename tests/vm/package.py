"""The package as apt sees it in a guest, for the tests that install and purge it: where
it came from, and the paths a purge must leave as it found them."""

from __future__ import annotations

from typing import List

from harness.vm.driver import Guest
from harness.vm.image import REPO_MOUNT

# What purge may leave changed: apt's and dpkg's own bookkeeping (dpkg's daily backup of
# its database among it), logs and caches.
PATHS = (
    "find /etc /usr /opt /srv /var -xdev "
    "\\( -path /var/lib/dpkg -o -path /var/lib/apt -o -path /var/backups -o -path /var/cache "
    "-o -path /var/log -o -path /var/tmp -o -path /var/lib/systemd -o -path /etc/ld.so.cache "
    "\\) -prune -o -print | sort"
)


def system_paths(guest: Guest) -> List[str]:
    """Every path of the system outside what PATHS leaves out."""
    return guest.run(PATHS).stdout.splitlines()


def assert_installed_from_the_local_repository(guest: Guest, apt_output: str) -> None:
    """apt set the package up from the test's repository, and its command works."""
    assert "Setting up statemesh-node" in apt_output
    assert f"file:{REPO_MOUNT}" in guest.run("apt-cache policy statemesh-node").stdout
    assert guest.run("statemesh-node --version").stdout.startswith("statemesh-node ")
    assert guest.run("test -f /etc/statemesh/node.conf && statemesh-node config").returncode == 0
