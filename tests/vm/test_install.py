"""The package installs on a machine with a TPM from the local repository, from a cold boot,
as an operator would, and purges cleanly. (A machine without one, a weak node, is installed
and purged the same way by test_lockdown's end-to-end test, on every release.) On the first
release the saved TPM node (harness.vm.snapshot.installed_node) is installed so, from a cold
boot, and test_atls's TPM test checks it; this test runs on the later releases."""

from __future__ import annotations

import re

import pytest

from harness.vm.driver import GuestError, SavedGuest
from tests.vm import package
from tests.vm.kexec import load_a_kernel_for_kexec


@pytest.mark.cost(5)
def test_harness_reports_a_failing_guest_command(guest_factory,
                                                 provisioned_node: SavedGuest) -> None:
    guest = guest_factory(saved=provisioned_node)  # restored: no boot needed to prove this
    with pytest.raises(GuestError, match=r"failed \(1\)"):
        guest.run("echo to-stderr >&2; exit 1")
    result = guest.run("exit 3", check=False)
    assert result.returncode == 3


@pytest.mark.later_releases
@pytest.mark.cost(190)
def test_install_with_a_tpm_from_local_repository_then_purge_leaves_nothing(guest_factory) -> None:
    guest = guest_factory(tpm=True)
    guest.wait_until_booted()
    assert guest.run("systemctl is-active multi-user.target").stdout.strip() == "active"
    assert "/dev/tpm0" in guest.run("ls /dev/tpm* || true").stdout
    before = package.system_paths(guest)
    # kexec -l before installing, for a kexec -e afterwards: the installation unloads it.
    assert load_a_kernel_for_kexec(guest) == "0 0"
    assert guest.run("cat /sys/kernel/kexec_loaded").stdout.strip() == "1"

    installed = guest.install()
    assert guest.run("cat /sys/kernel/kexec_loaded").stdout.strip() == "0"
    assert "kexec-kernel-unloaded" in guest.run(
        "cat /var/lib/statemesh-node/journal.jsonl").stdout
    package.assert_installed_from_the_local_repository(guest, installed.stdout)
    said = installed.stdout + installed.stderr
    assert "statemesh-node:" not in said, said  # silent under DEBIAN_FRONTEND=noninteractive

    guest.run("apt-get purge -y statemesh-node", env={"DEBIAN_FRONTEND": "noninteractive"},
              timeout=600)
    assert sorted(set(package.system_paths(guest)) - set(before)) == []
    # The serial console is captured from the first kernel line on: systemd greets on it at
    # every boot (show_status=1). Multi-user is asserted above through systemd, not here:
    # once the console getty starts, systemd may print no more target lines on the console.
    console = re.sub(r"\x1b\[[0-9;]*m", "", guest.console_log())
    assert "Linux version" in console and "Welcome to Debian GNU/Linux" in console
