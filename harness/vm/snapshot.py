"""Installed nodes saved once and restored per test: the VM suite's main saving.

Booting a TCG guest and installing the package costs minutes; restoring a saved running
guest costs seconds. A saved installed node is built once per .deb, release and kind (with
or without a TPM), kept in the image cache keyed by everything that went into it (the base
image, the .deb's bytes, the node's configuration, the harness files), and restored on a
fresh copy-on-write overlay for every test that needs an installed node but does not test
the installation itself. Tests that prove something across a real boot still boot.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

from harness.vm import image, vtpm
from harness.vm.driver import Guest, SavedGuest
from harness.vm.image import CACHE, HERE, Image

MESH_PORT = 7443
HOST_AS_SEEN_BY_GUEST = "10.0.2.2/32"
# What a provisioner writes before installing: a zone whose only peer is the host (so the
# mesh port answers the host's verifier through a forward), and a volume small enough for
# the guest's disk.
NODE_CONF = (f"Zone: test-zone\nMesh-Port: {MESH_PORT}\nZone-Peers: {HOST_AS_SEEN_BY_GUEST}\n"
             "Storage-Size: 256M\n").encode()
HARNESS = ("driver.py", "qmp.py", "qga.py", "vtpm.py", "snapshot.py")


def _key(base: Image, deb: Path, name: str) -> str:
    digest = hashlib.sha256()
    digest.update(str(base.disk).encode())
    digest.update(hashlib.sha256(deb.read_bytes()).digest())
    digest.update(NODE_CONF + name.encode())
    for harness_file in HARNESS:
        digest.update((HERE / harness_file).read_bytes())
    # A migration stream and a TPM state load only into the QEMU and swtpm that wrote them.
    for tool in (["qemu-system-x86_64", "--version"], ["swtpm", "--version"]):
        digest.update(subprocess.run(tool, capture_output=True, check=True).stdout)
    return digest.hexdigest()[:16]


def _load(directory: Path, tpm: bool) -> SavedGuest:
    return SavedGuest(directory / "disk.qcow2", directory / "state", kernel_args="",
                      tpm_state=directory / "tpm" if tpm else None,
                      tpm_ca=vtpm.LocalCa(directory / "tpm-ca") if tpm else None)


Prepare = Callable[[Path, Optional[vtpm.LocalCa]], Guest]


def _cached(name: str, base: Image, deb: Path, tpm: bool, prepare: Prepare,
            cache: Path) -> SavedGuest:
    """The saved guest `name` for this .deb and release, made by `prepare` if not cached."""
    target = cache / f"{name}-{base.suite}-{_key(base, deb, name)}"
    if not (target / "state").exists():
        # Parallel test workers ask for it at once: one builds, the others wait.
        with open(cache / f".{name}-{base.suite}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "state").exists():
                _save(target, prepare, tpm, cache)
                image.prune(cache, f"{name}-{base.suite}", keep=target)
    return _load(target, tpm)


def _save(target: Path, prepare: Prepare, tpm: bool, cache: Path) -> None:
    with tempfile.TemporaryDirectory(dir=cache, prefix="build-") as work:
        staging = Path(work) / "saved"
        ca: Optional[vtpm.LocalCa] = vtpm.LocalCa(staging / "tpm-ca") if tpm else None
        guest = prepare(Path(work) / "guest", ca)
        try:
            saved = guest.save(staging / "node")
        finally:
            guest.close()
        for part in (saved.disk, saved.state, *([saved.tpm_state] if tpm else [])):
            shutil.move(str(part), staging / part.name)
        (staging / "node").rmdir()
        staging.rename(target)


@contextlib.contextmanager
def _closed_on_failure(guest: Guest) -> Iterator[Guest]:
    """A guest whose preparation fails is powered off: no QEMU outlives a failed build."""
    try:
        yield guest
    except BaseException:
        guest.close()
        raise


def provisioned_node(base: Image, deb: Path, repo_disk: Path, cache: Path = CACHE) -> SavedGuest:
    """A booted guest as a provisioner leaves it before installing (no TPM): node.conf
    written, apt's index of the repository read, sshd and a serial getty running. Tests of
    the installation itself start here instead of a cold boot."""

    def prepare(workdir: Path, ca: Optional[vtpm.LocalCa]) -> Guest:
        del ca
        with _closed_on_failure(Guest(base, workdir, repo_disk)) as guest:
            guest.boot()
            guest.wait_until_booted()
            _without_initramfs_leftovers(guest)
            guest.provision(NODE_CONF)
            guest.install_prepared()
        return guest

    return _cached("provisioned", base, deb, False, prepare, cache)


def _without_initramfs_leftovers(guest: Guest) -> None:
    """Only PID 1 in init.scope before the state is saved. The initramfs's udevd
    (`systemd-udevd --daemon`) is told to exit before the switch to the real root; on a slow
    emulated boot it was once seen still there, in init.scope, when a test installed from
    the saved state minutes later, and preflight rightly refused it as a program left
    running by hand. Waited for a while, then ended: the image, not the product, is wrong."""
    procs = "/sys/fs/cgroup/init.scope/cgroup.procs"
    try:
        guest.wait_for(f'[ "$(cat {procs})" = 1 ]', "the initramfs's processes to end", 30)
    except AssertionError:
        guest.run(f"grep -vx 1 {procs} | xargs -r kill -KILL", check=False)
        guest.wait_for(f'[ "$(cat {procs})" = 1 ]', "the initramfs's processes to end", 30)


def installed_node(base: Image, deb: Path, repo_disk: Path, tpm: bool,
                   cache: Path = CACHE) -> SavedGuest:
    """The saved installed node for this .deb and release, built first if not cached.

    Without `tpm`, it is the provisioned node, installed. With `tpm`, the guest's TPM has an
    EK certificate from a CA kept with the saved node (SavedGuest.tpm_ca), and the node
    trusts that CA: it is `tpm` class (a TPM is there from the first boot on, so this one
    boots and provisions itself)."""

    def prepare(workdir: Path, ca: Optional[vtpm.LocalCa]) -> Guest:
        if ca is None:
            guest = Guest(base, workdir, repo_disk,
                          saved=provisioned_node(base, deb, repo_disk, cache))
        else:
            guest = Guest(base, workdir, repo_disk, tpm_ca=ca)
        with _closed_on_failure(guest):
            guest.boot()
            if ca is not None:
                guest.wait_until_booted()
                guest.provision(NODE_CONF)
                guest.run("mkdir -p /etc/statemesh/tpm-ca.d")
                for path in ca.ca_certificates():  # made with the guest's EK certificate
                    guest.put(f"/etc/statemesh/tpm-ca.d/{path.name}", path.read_bytes())
            guest.install()
            guest.wait_until_booted()
            guest.run(f"for i in $(seq 300); do ss -Hltn 'sport = :{MESH_PORT}' | grep -q . "
                      "&& exit 0; sleep 0.2; done; exit 1", timeout=120)
        return guest

    return _cached("installed-tpm" if tpm else "installed-weak", base, deb, tpm, prepare, cache)
