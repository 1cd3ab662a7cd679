"""Guest images for the VM suite: built with mmdebstrap, cached by what they contain.

The guest has no network, so its image carries every runtime dependency of the package
(read from debian/control) plus what a real server has (openssh-server enabled, gettys,
unattended-upgrades). Images are keyed by suite, package list and the harness files that
go into them, so a change to any of those builds a new image and nothing stale is reused.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Sequence

from debian.deb822 import Deb822, PkgRelation

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
GUEST_FILES = HERE / "guest"
CACHE = Path(os.environ.get("STATEMESH_VM_CACHE", "/var/cache/statemesh-vm"))
MIRROR = "http://deb.debian.org/debian"
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}

# What a typical server has, beyond the package's own dependencies.
SERVER_PACKAGES = [
    "systemd", "systemd-sysv", "udev", "dbus", "libpam-systemd", "linux-image-amd64",
    "openssh-server", "unattended-upgrades", "python3", "iproute2", "procps", "kmod",
    "util-linux", "systemd-container", "tpm2-tools", "ca-certificates", "less",
    # A hypervisor's agent, as most VMs run one (its virtio port is given to every guest):
    # the agents guarantee must lock it away.
    "qemu-guest-agent",
    # What operators install in, so that a dropped connection does not end apt.
    "tmux", "screen",
    # What cloud images install with: user-data's runcmd at first boot, without a terminal.
    # It runs only at a boot whose NoCloud seed a test wrote (see the test agent below).
    "cloud-init",
]

# Device names the harness hands to QEMU; fstab in the guest refers to the labels.
ROOT_LABEL = "smroot"
REPO_LABEL = "smrepo"
REPO_MOUNT = "/srv/statemesh-repo"


@dataclasses.dataclass(frozen=True)
class Image:
    """A cached guest image: a qcow2 root disk, the kernel and initrd to boot it, and the
    same tree as a tar for chroot tests."""

    suite: str
    disk: Path
    kernel: Path
    initrd: Path
    rootfs: Path


def runtime_relations(control: Path = ROOT / "debian" / "control") -> List[str]:
    """The binary package's Depends and Recommends, every alternative, without
    substitution variables: what `apt-get install` brings with its default settings (the
    first alternatives and the Recommends), so that the guests' own apt has nothing to
    fetch, and the other alternatives, to stand in when a test removes a first one (as
    Ubuntu 22.04 lacks it)."""
    paragraphs = Deb822.iter_paragraphs(control.read_text().splitlines())
    binary = next(p for p in paragraphs if p.get("Package") == "statemesh-node")
    parts = [part.strip() for field in ("Depends", "Recommends")
             for part in binary.get(field, "").split(",")]
    relations = PkgRelation.parse_relations(", ".join(p for p in parts if p and "${" not in p))
    return sorted({alternative["name"] for group in relations for alternative in group})


def packages() -> List[str]:
    return sorted(set(SERVER_PACKAGES) | set(runtime_relations()))


def image_key(suite: str) -> str:
    digest = hashlib.sha256()
    digest.update(suite.encode())
    digest.update("\n".join(packages()).encode())
    for path in sorted([Path(__file__), *GUEST_FILES.iterdir()]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _customize_script() -> str:
    """Shell run by mmdebstrap on the finished tree ($1): make it a bootable test guest."""
    return f"""set -e
root="$1"
# The test agent is a package of its own, as anything a provisioner leaves running must be:
# preflight refuses services no package installed.
agent="$root/tmp/statemesh-test-agent"
install -D -m 0755 {GUEST_FILES}/statemesh-test-agent "$agent/usr/sbin/statemesh-test-agent"
install -D -m 0644 {GUEST_FILES}/statemesh-test-agent.service \
    "$agent/usr/lib/systemd/system/statemesh-test-agent.service"
# The initrd needs only to find the root disk (virtio, ext4): MODULES=list makes it 6 MB
# instead of 36 MB (every storage driver), unpacked at every boot: 3-5 s less under TCG.
# initramfs-tools sources conf.d as shell, so preflight refuses one no package installed.
install -d "$agent/etc/initramfs-tools/conf.d"
echo MODULES=list > "$agent/etc/initramfs-tools/conf.d/statemesh-test.conf"
# cloud-init looks for local seeds only (NoCloud's, a config drive's): a guest without one
# boots with cloud-init disabled (ds-identify finds nothing), instead of waiting for clouds'
# metadata services. Two entries, because ds-identify takes a list of one as found without
# looking: cloud-init then ran at every boot on its fallback datasource (30 s of a TCG
# boot; at first boot it also made a user and new SSH host keys).
install -d "$agent/etc/cloud/cloud.cfg.d"
echo 'datasource_list: [ NoCloud, ConfigDrive ]' > "$agent/etc/cloud/cloud.cfg.d/90-statemesh-test.cfg"
mkdir -p "$agent/DEBIAN"
cat > "$agent/DEBIAN/control" <<CONTROL
Package: statemesh-test-agent
Version: 1
Architecture: all
Maintainer: StateMesh test harness <harness@statemesh.invalid>
Description: StateMesh VM test harness agent (virtio-serial), initrd size and cloud-init's datasource, never on a real node
CONTROL
dpkg-deb --root-owner-group -Zgzip --build "$agent" "$root/tmp/statemesh-test-agent.deb" >/dev/null
chroot "$root" dpkg -i /tmp/statemesh-test-agent.deb >/dev/null
rm -rf "$agent" "$root/tmp/statemesh-test-agent.deb"
chroot "$root" systemctl enable statemesh-test-agent.service
mkdir -p "$root{REPO_MOUNT}"
install -m 0644 {GUEST_FILES}/50-dhcp.network "$root/etc/systemd/network/50-dhcp.network"
cat > "$root/etc/fstab" <<FSTAB
LABEL={ROOT_LABEL} / ext4 errors=remount-ro 0 1
LABEL={REPO_LABEL} {REPO_MOUNT} ext4 ro,nofail,x-systemd.device-timeout=300s 0 0
FSTAB
echo statemesh-guest > "$root/etc/hostname"
printf '127.0.0.1 localhost\\n127.0.1.1 statemesh-guest\\n' > "$root/etc/hosts"
rm -f "$root/etc/apt/sources.list"
echo 'deb [trusted=yes] file:{REPO_MOUNT} ./' > "$root/etc/apt/sources.list.d/statemesh-local.list"
chroot "$root" sh -c 'echo root:statemesh | chpasswd'
chroot "$root" systemctl enable systemd-networkd.service ssh.service
# The guest has no network: apt's daily timers would only hold the dpkg lock during tests.
# e2scrub_reap removes e2scrub's LVM snapshots, of which the guest has none; it took 8-12 s
# of TCG CPU at every boot, beside the boot the tests wait for.
chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_reap.service
printf 'virtio_pci\nvirtio_blk\next4\ncrc32c_generic\n' >> "$root/etc/initramfs-tools/modules"
chroot "$root" update-initramfs -u -k all
cp -L "$root/vmlinuz" "$root/../kernel"
cp -L "$root/initrd.img" "$root/../initrd"
"""


def build(suite: str, cache: Path = CACHE) -> Image:
    """Return the cached image for `suite`, building it first if it does not exist."""
    target = cache / f"{suite}-{image_key(suite)}"
    image = Image(suite, target / "disk.qcow2", target / "kernel", target / "initrd",
                  target / "rootfs.tar")
    if image.disk.exists():
        return image
    cache.mkdir(parents=True, exist_ok=True)
    # Parallel test workers (pytest -n) all ask for the image: one builds, the others wait.
    with open(cache / f".{suite}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not image.disk.exists():
            _build_into(target, suite, cache)
    return image


def _build_into(target: Path, suite: str, cache: Path) -> None:
    with tempfile.TemporaryDirectory(dir=cache, prefix="build-") as work:
        work_dir = Path(work)
        tree = work_dir / "tree"
        hook = work_dir / "customize.sh"
        hook.write_text(_customize_script())
        # In a mount namespace of its own: mmdebstrap mounts /proc, /sys, /dev/pts and
        # /dev/shm inside the tree, and a build killed halfway (an interrupted test run) left
        # them mounted under the cache, where the next cleanup's rm -rf walked into them.
        # Here they end with the namespace, however mmdebstrap ends.
        _run([
            "unshare", "--mount", "--propagation", "private",
            "mmdebstrap", "--variant=apt", "--mode=root", "--components=main",
            "--include=" + ",".join(packages()),
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            f"--customize-hook=sh {hook} \"$1\"",
            suite, str(tree), MIRROR,
        ])
        raw = work_dir / "disk.raw"
        _run(["mkfs.ext4", "-q", "-L", ROOT_LABEL, "-d", str(tree), str(raw), "4G"])
        staging = work_dir / "image"
        staging.mkdir()
        _run(["tar", "-C", str(tree), "--numeric-owner", "-cf", str(staging / "rootfs.tar"), "."])
        _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(staging / "disk.qcow2")])
        shutil.move(str(work_dir / "kernel"), staging / "kernel")
        shutil.move(str(work_dir / "initrd"), staging / "initrd")
        staging.rename(target)
    prune(cache, suite, keep=target)


def prune(cache: Path, kind: str, keep: Path, spare: int = 2) -> None:
    """Remove all but the newest cached entries named `kind`-KEY (each is a gigabyte or more)."""
    others = sorted((p for p in cache.glob(f"{kind}-*") if p != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in others[spare - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def build_repo_disk(debs: Sequence[Path], output: Path) -> Path:
    """A small ext4 image holding a flat apt repository of `debs`, mounted by the guest."""
    with tempfile.TemporaryDirectory() as work:
        repo = Path(work) / "repo"
        repo.mkdir()
        for deb in debs:
            shutil.copy2(deb, repo / Path(deb).name)
        packages_index = _run(["apt-ftparchive", "packages", "."], cwd=repo).stdout
        (repo / "Packages").write_bytes(packages_index)
        release = _run(["apt-ftparchive", "-o", "APT::FTPArchive::Release::Origin=StateMesh",
                        "-o", "APT::FTPArchive::Release::Label=StateMesh",
                        "-o", "APT::FTPArchive::Release::Suite=stable",
                        "-o", "APT::FTPArchive::Release::Codename=statemesh",
                        "release", "."], cwd=repo).stdout
        (repo / "Release").write_bytes(release)
        output.unlink(missing_ok=True)
        _run(["mkfs.ext4", "-q", "-L", REPO_LABEL, "-d", str(repo), str(output), "64M"])
    return output


def _run(argv: Sequence[str], cwd: Path = None) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), cwd=cwd, env=CLEAN_ENV, capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"{argv[0]} failed ({result.returncode}):\n{result.stderr.decode(errors='replace')[-4000:]}"
        )
    return result


def main(suites: Sequence[str]) -> int:
    """Build (or find cached) every suite's image at once: `make check` runs this beside
    lintian and the host tests, so that the VM suite's workers find their images ready."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(suites) or 1) as pool:
        builds = {suite: pool.submit(build, suite) for suite in suites}
    failed = 0
    for suite, done in builds.items():
        try:
            print(f"{suite}: {done.result().disk.parent}")
        except (OSError, RuntimeError) as error:  # each suite's failure is told, not the first
            print(f"{suite}: {error}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
