"""Nothing of RAM reaches a disk, on a real installed node: the attacks themselves. With a
swap large enough to hibernate to, `systemctl hibernate` must not hibernate; a process that
crashes with core dumps unlimited must leave no core; the swap itself is named by status;
a kernel cannot be loaded for kexec.
(Purge giving core_pattern back is asserted by test_lockdown's end-to-end test, and a plain
swap refused before installing by its preflight test.)"""

from __future__ import annotations


import pytest

from harness.vm.driver import Guest
from tests.vm.kexec import load_a_kernel_for_kexec
from tests.vm.reports import guarantee_finding

SWAPFILE = "/root/swapfile"


def memory_finding(guest: Guest) -> dict:
    return guarantee_finding(guest, "memory")


@pytest.mark.cost(40)
def test_no_hibernation_no_core_dump_and_a_plain_swap_is_named(installed_guest: Guest) -> None:
    guest = installed_guest
    assert memory_finding(guest)["holds"]
    # Room for a hibernation image (the guest has 2 GiB of RAM, a few hundred MB in use).
    guest.run(f"fallocate -l 1G {SWAPFILE} && chmod 600 {SWAPFILE} && mkswap -q {SWAPFILE} "
              f"&& swapon {SWAPFILE}")
    finding = memory_finding(guest)
    assert not finding["holds"]
    assert finding["detail"] == (f"swap on {SWAPFILE} (not compressed RAM): workload pages "
                                 "reach a disk")

    boot_id = guest.boot_id
    hibernate = guest.run("systemctl hibernate", check=False, timeout=300)
    assert hibernate.returncode != 0, hibernate.stdout + hibernate.stderr
    started = guest.run("systemctl start hibernate.target", check=False, timeout=300)
    assert started.returncode != 0 and "masked" in started.stderr, started.stderr
    assert guest.run("cat /proc/sys/kernel/random/boot_id").stdout.strip() == boot_id
    assert guest.run("systemctl is-active hibernate.target", check=False).stdout.strip() != "active"

    crashed = guest.run("mkdir /root/crash && cd /root/crash && ulimit -c unlimited && "
                        "sh -c 'kill -SEGV $$'", check=False)
    assert crashed.returncode != 0  # the shell died of SIGSEGV...
    assert guest.run("ls -A /root/crash").stdout == ""  # ...and wrote no core
    assert guest.run("cat /proc/sys/kernel/core_pattern").stdout.strip() == "|/bin/false"

    guest.run(f"swapoff {SWAPFILE}")
    assert memory_finding(guest)["holds"]

    # A kernel started with kexec would find all of RAM, the volume key included: loading
    # one is turned off until the next boot, for root too.
    assert guest.run("cat /proc/sys/kernel/kexec_load_disabled").stdout.strip() == "1"
    assert load_a_kernel_for_kexec(guest) == "-1 1"
    assert guest.run("cat /sys/kernel/kexec_loaded").stdout.strip() == "0"
