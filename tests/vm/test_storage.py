"""The ephemeral encrypted /var/lib/statemesh on a real guest: dm-crypt, systemd, reboots.

What only a real kernel shows: the volume is LUKS2 with no keyslot left, a reboot brings a
new empty volume and leaves no trace of the old data or key on the disk, upgrades do not
touch the running volume, a failed setup leaves the mount point locked, an extra disk
configured as Storage-Device is used and one carrying a filesystem is refused unchanged.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import pytest

from harness.vm.driver import Guest
from tests.vm.reports import guarantee_finding

MOUNT = "/var/lib/statemesh"
BACKING = "/var/lib/statemesh-node/storage.img"
UNIT = "statemesh-storage.service"

# Run in the guest, or on the host over a copy of its disk: where each needle (hex in
# $NEEDLES, never in a file or argv) occurs in the given files or block devices, and in
# every file below the given directories, as JSON {needle: [path, ...]}.
SCAN = r'''
import json, os, sys
needles = [bytes.fromhex(h) for h in os.environ["NEEDLES"].split()]
longest = max(map(len, needles))
hits = {}

def scan(path):
    try:
        handle = open(path, "rb", buffering=0)
    except OSError:
        return
    tail = b""
    with handle:
        while True:
            chunk = handle.read(8 << 20)
            if not chunk:
                break
            window = tail + chunk
            for needle in needles:
                if needle in window:
                    paths = hits.setdefault(needle.hex(), [])
                    if path not in paths:
                        paths.append(path)
            tail = window[-longest:]

for target in sys.argv[1:]:
    if os.path.isdir(target):
        for root, dirs, files in os.walk(target):
            dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys", "/dev", "''' + MOUNT + r'''")]
            for name in files:
                path = os.path.join(root, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    scan(path)
    else:
        scan(target)
print(json.dumps(hits))
'''


def _install(guest: Guest, node_conf: str) -> None:
    """Provision node.conf, then install: the installer's transaction sets the volume up."""
    guest.provision(node_conf.encode())
    guest.install()


# The storage guarantee's revert(), as removal runs it (apply() ran in the installation).
GUARANTEE = b"""
from statemesh import config
from statemesh.guarantees import storage

storage.Storage(config.load()).revert({})
"""


def _conf(guest: Guest, text: str) -> None:
    guest.put("/etc/statemesh/node.conf", text.encode())
    guest.run("sync")  # the tests pull the plug: the configuration must be on the disk


def _root_disk(guest: Guest) -> str:
    """The root filesystem's device (virtio names depend on how many disks there are)."""
    return guest.run("findmnt -n -o SOURCE /").stdout.strip()


def _storage_finding(guest: Guest) -> Dict:
    return guarantee_finding(guest, "storage")


def _unit(guest: Guest, *props: str) -> Dict[str, str]:
    out = guest.run(f"systemctl show {UNIT} " + " ".join(f"-p {p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _assert_volume(guest: Guest, backing: str) -> Dict:
    storage = _storage_finding(guest)
    log = guest.run(f"journalctl -b -u {UNIT} --no-pager", check=False).stdout
    assert storage["holds"], f"{storage['detail']}\n{log}"
    facts = storage["facts"]
    assert facts["active_keyslots"] == 0 and facts["mounted"] is True
    assert facts["type"] == "LUKS2" and facts["cipher"] == "aes-xts-plain64"
    assert facts["key_bits"] == 512 and facts["backing"] == backing
    dump = guest.run(f"cryptsetup luksDump {facts['device']}").stdout
    assert "Keyslots:\nTokens:" in dump.replace("\t", "")  # an empty Keyslots section
    mount = guest.run(f"findmnt -n -o SOURCE,FSTYPE,OPTIONS {MOUNT}").stdout.split()
    assert mount[:2] == ["/dev/mapper/statemesh", "ext4"]
    assert {"nodev", "nosuid"} <= set(mount[2].split(","))
    assert guest.run(f"stat -c %U:%a {MOUNT}").stdout.strip() == "root:700"
    assert _unit(guest, "ActiveState")["ActiveState"] == "active"
    return facts


def _locked_when_unmounted(guest: Guest) -> None:
    assert guest.run(f"findmnt {MOUNT}", check=False).returncode == 1
    assert guest.run(f"stat -c %U:%a {MOUNT}").stdout.strip() == "root:0"
    assert "i" in guest.run(f"lsattr -d {MOUNT}").stdout.split()[0]
    assert guest.run(f"touch {MOUNT}/plaintext", check=False).returncode != 0


def _volume_key_reference(guest: Guest) -> str:
    """The key field of the live dm-crypt table (hex, or a kernel keyring reference)."""
    return guest.run("dmsetup table --showkeys statemesh").stdout.split()[4]


def _needles_env(needles: Sequence[bytes]) -> Dict[str, str]:
    return {"NEEDLES": " ".join(needle.hex() for needle in needles)}


def _found(guest: Guest, needles: Sequence[bytes], *targets: str) -> Dict[str, List[str]]:
    """Where the needles are in the guest's files, devices or directories."""
    guest.put("/root/scan.py", SCAN.encode())
    return json.loads(guest.run("python3 /root/scan.py " + " ".join(targets), timeout=900,
                                env=_needles_env(needles)).stdout)


def _found_on_the_disk(guest: Guest, needles: Sequence[bytes],
                       scratch: Path) -> Dict[str, List[str]]:
    """Where the needles are on the guest's root disk, every file and every freed block of
    it, read by the host from a copy, as whoever takes the disk out would read it. A canary
    written to a plain file first must be found: the scan sees what is on the disk."""
    canary = b"statemesh-canary-" + secrets.token_hex(16).encode()
    guest.put("/root/canary", canary)
    raw = guest.copy_root_disk(scratch / "root.raw")
    try:
        scan = subprocess.run([sys.executable, "-c", SCAN, str(raw)], capture_output=True,
                              text=True, check=True, env=_needles_env([canary, *needles]),
                              timeout=600)
    finally:
        raw.unlink()
    hits = json.loads(scan.stdout)
    assert hits.pop(canary.hex(), None) == [str(raw)], "the scan did not see the disk"
    return hits


@pytest.mark.cost(340)
def test_file_backed_volume_is_new_at_every_boot_and_the_old_one_leaves_no_trace(
        installed_guest: Guest, measured, tmp_path: Path) -> None:
    guest = installed_guest  # installed with Storage-Size: 256M (snapshot.NODE_CONF)
    assert _unit(guest, "UnitFileState")["UnitFileState"] == "static"  # the target wants it
    assert guest.run("systemctl is-enabled statemesh-node.target").stdout.strip() == "enabled"
    facts = _assert_volume(guest, f"file {BACKING}")
    assert facts["loop_file"] == BACKING and facts["size"] > 200 * 1024**2
    assert guest.run(f"stat -c %s {BACKING}").stdout.strip() == str(256 * 1024**2)

    marker = secrets.token_hex(16).encode()
    guest.put(f"{MOUNT}/marker", b"statemesh-marker-" + marker)
    guest.run("sync")
    key_field = _volume_key_reference(guest)
    needles = [marker] + ([bytes.fromhex(key_field)] if not key_field.startswith(":") else [])
    if key_field.startswith(":"):
        assert ":logon:" in key_field  # the volume key is in the kernel keyring, unreadable
    assert _found(guest, needles, BACKING) == {}

    # An upgrade (here: a reinstall, which runs prerm upgrade and postinst) never touches it.
    before = _unit(guest, "InvocationID", "ActiveEnterTimestampMonotonic")
    guest.run("apt-get install -y --reinstall statemesh-node",
              env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=600)
    assert _unit(guest, "InvocationID", "ActiveEnterTimestampMonotonic") == before
    assert guest.get(f"{MOUNT}/marker") == b"statemesh-marker-" + marker

    guest.reboot()
    guest.wait_until_booted()
    _assert_volume(guest, f"file {BACKING}")
    assert guest.run(f"ls -A {MOUNT}").stdout.split() == ["lost+found"]
    assert _volume_key_reference(guest) != key_field or key_field.startswith(":")
    # Neither the marker nor the old volume key anywhere: the raw root disk (every file
    # and every freed block of the root filesystem) and the tmpfs /run.
    assert _found_on_the_disk(guest, needles, tmp_path) == {}
    assert _found(guest, needles, "/run") == {}
    timing = _unit(guest, "ExecMainStartTimestampMonotonic", "ExecMainExitTimestampMonotonic")
    setup_s = (int(timing["ExecMainExitTimestampMonotonic"])
               - int(timing["ExecMainStartTimestampMonotonic"])) / 1e6
    measured("storage setup at boot (256M file, TCG guest)", f"{setup_s:.2f} s")

    # Stopping destroys it and locks the mount point; a setup that fails keeps it locked.
    guest.run(f"systemctl stop {UNIT}")
    _locked_when_unmounted(guest)
    assert guest.run(f"test -e {BACKING}", check=False).returncode == 1
    _conf(guest, "Storage-Size: 512G\n")
    assert guest.run(f"systemctl start {UNIT}", check=False).returncode != 0
    assert _unit(guest, "ActiveState")["ActiveState"] == "failed"
    log = guest.run(f"journalctl -b -u {UNIT} --no-pager").stdout
    assert "not enough free space for the 512.0G backing file" in log
    _locked_when_unmounted(guest)
    # The whole of status, on a node whose volume failed: it runs, and says so.
    report = json.loads(guest.run("statemesh-node status --json", check=False).stdout)
    assert not report["holds"]
    assert not next(g for g in report["guarantees"] if g["name"] == "storage")["holds"]

    # Power loss: the next boot starts clean with a new volume.
    _conf(guest, "Storage-Size: 256M\n")
    guest.power_off_hard()
    guest.boot()
    guest.wait_until_booted()
    _assert_volume(guest, f"file {BACKING}")
    assert guest.run(f"ls -A {MOUNT}").stdout.split() == ["lost+found"]


@pytest.mark.cost(120)
def test_extra_disk_is_used_and_a_disk_holding_a_filesystem_is_refused_unchanged(guest_factory):
    guest = guest_factory(extra_disks_mib=(256, 128))
    blank, used = "/dev/disk/by-id/virtio-extra0", "/dev/disk/by-id/virtio-extra1"
    _install(guest, f"Storage-Device: {blank}\n")
    facts = _assert_volume(guest, blank)
    assert facts["device"] == guest.run(f"readlink -f {blank}").stdout.strip()
    assert facts["loop_file"] is None
    assert guest.run(f"test -e {BACKING}", check=False).returncode == 1

    guest.put("/root/guarantee.py", GUARANTEE)
    guest.run("python3 /root/guarantee.py")  # what removal does, storage first
    assert _unit(guest, "ActiveState")["ActiveState"] == "inactive"
    assert guest.run(f"findmnt {MOUNT}", check=False).returncode == 1
    assert guest.run(f"test -e {MOUNT}", check=False).returncode == 1  # given back
    assert guest.run(f"wipefs --no-act {blank}").stdout.strip() == ""  # header wiped

    guest.run(f"mkfs.ext4 -q -L operator-data {used} && mkdir -p /mnt/d && mount {used} /mnt/d "
              "&& echo precious > /mnt/d/file && umount /mnt/d")
    checksum = guest.run(f"sha256sum {used}").stdout.split()[0]
    _conf(guest, f"Storage-Device: {used}\n")
    assert guest.run(f"systemctl start {UNIT}", check=False).returncode != 0
    log = guest.run(f"journalctl -b -u {UNIT} --no-pager").stdout
    assert "refusing to format Storage-Device" in log and "ext4 labelled 'operator-data'" in log
    assert guest.run(f"sha256sum {used}").stdout.split()[0] == checksum
    _locked_when_unmounted(guest)

    # The root disk is refused even when declared dedicated.
    _conf(guest, f"Storage-Device: {_root_disk(guest)}\nStorage-Dedicated: yes\n")
    assert guest.run(f"systemctl start {UNIT}", check=False).returncode != 0
    log = guest.run(f"journalctl -b -u {UNIT} --no-pager").stdout
    assert "it is on the disk of the root filesystem" in log
    _locked_when_unmounted(guest)
