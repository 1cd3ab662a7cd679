"""Host tests of the encrypted storage: probing, refusals, key handling, config.

This host has no device-mapper and its block devices are off limits, so signatures are
probed on image files with the real wipefs/cryptsetup, and the setup flow runs against
fake cryptsetup/losetup/mkfs/mount programs placed first on the volume module's search
path: they log every command line and what came through stdin, so the tests can check
where the key went. The real flow runs in the VM (tests/vm/test_storage.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from statemesh import blockdev, cli, config, volume
from statemesh.guarantees import storage
from statemesh.run import SAFE_PATH, CommandError

ROOT = Path(__file__).resolve().parent.parent

FAKE = r'''#!/usr/bin/python3
"""Stand-in for cryptsetup, losetup, mkfs.ext4, mount, umount and chattr: logs and obeys.
cryptsetup first checks its command line as cryptsetup 2.4.3 (Ubuntu 22.04) does, the
oldest the package supports, and answers luksDump in 2.4.3's layout."""
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
ALIASES = {"luksOpen": "open", "luksErase": "erase", "luksClose": "close", "remove": "close"}

def refused_by_cryptsetup_2_4_3(args):
    actions, options = set(), {}
    for line in open(os.path.join(here, "..", "cryptsetup-cli.txt")):
        kind, _, rest = line.partition(" ")
        if kind == "action":
            actions.add(rest.strip())
        elif kind == "option":
            option, takes, allowed = rest.split()
            options[option] = (takes == "value", allowed.split(","))
    given, positional, rest = [], [], list(args)
    while rest:
        arg = rest.pop(0)
        if not arg.startswith("-"):
            positional.append(arg)
            continue
        option, equals, _ = arg.lstrip("-").partition("=")
        if not arg.startswith("--") or option not in options:
            return f"{arg}: unknown option"
        if options[option][0] and not equals:
            rest.pop(0)
        given.append(option)
    action = ALIASES.get(positional[0], positional[0]) if positional else ""
    if action not in actions:
        return "Unknown action."
    for option in given:
        if options[option][1] != ["*"] and action not in options[option][1]:
            return f"Option --{option} is not allowed with {action} action."

stdin = b""
if name == "cryptsetup" and "--key-file=-" in args:
    stdin = sys.stdin.buffer.read()
with open(os.path.join(here, "..", "log.jsonl"), "a") as log:
    log.write(json.dumps({"argv": [name] + args, "stdin": stdin.hex()}) + "\n")
if name == "cryptsetup" and refused_by_cryptsetup_2_4_3(args):
    sys.stderr.write(refused_by_cryptsetup_2_4_3(args) + "\n")
    sys.exit(1)
fail = open(os.path.join(here, "..", "fail-on")).read().split() if os.path.exists(
    os.path.join(here, "..", "fail-on")) else []
if args[:1] and args[0] in fail:
    sys.stderr.write(f"{name}: {args[0]} failed as the test asked\n")
    sys.exit(1)
if name == "cryptsetup" and args[:1] == ["status"]:
    sys.exit(4)
if name == "cryptsetup" and args[:1] == ["luksDump"]:
    print(ERASED_DUMP_2_4_3, end="")
if name == "losetup" and "--show" in args:
    print("/dev/loop7")
'''.replace("ERASED_DUMP_2_4_3", repr(
    # lib/luks2/luks2_json_metadata.c of 2.4.3 (LUKS2_hdr_dump) for a header whose keyslots
    # luksErase destroyed: the data segment's "  0:" line is not a keyslot.
    "LUKS header information\nVersion:       \t2\nEpoch:         \t5\n"
    "Metadata area: \t16384 [bytes]\nKeyslots area: \t16744448 [bytes]\n"
    "UUID:          \t6a1e1c3e-3b3f-4b7e-9d55-3b0c3f1f2a10\nLabel:         \tstatemesh-ephemeral\n"
    "Subsystem:     \t(no subsystem)\nFlags:       \t(no flags)\n\n"
    "Data segments:\n  0: crypt\n\toffset: 16777216 [bytes]\n\tlength: (whole device)\n"
    "\tcipher: aes-xts-plain64\n\tsector: 512 [bytes]\n\n"
    "Keyslots:\nTokens:\nDigests:\n"))
CRYPTSETUP_2_4_3 = ROOT / "tests" / "data" / "cryptsetup-2.4.3-cli.txt"

FAKED = ("cryptsetup", "losetup", "mkfs.ext4", "mount", "umount", "chattr")


class Fakes:
    """A directory of fake programs and the log they write."""

    def __init__(self, root: Path):
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        program = self.bin / "fake"
        program.write_text(FAKE)
        program.chmod(0o755)
        for name in FAKED:
            (self.bin / name).symlink_to("fake")
        (root / "cryptsetup-cli.txt").write_text(CRYPTSETUP_2_4_3.read_text())
        self.log = root / "log.jsonl"
        self.fail_file = root / "fail-on"

    @property
    def search_path(self) -> str:
        return f"{self.bin}:{SAFE_PATH}"

    def fail_on(self, subcommand: str) -> None:
        self.fail_file.write_text(subcommand)

    def calls(self) -> List[Dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def argvs(self, program: str) -> List[List[str]]:
        return [call["argv"] for call in self.calls() if call["argv"][0] == program]


@pytest.fixture
def fakes(tmp_path: Path) -> Fakes:
    return Fakes(tmp_path / "fakes")


@pytest.fixture
def layout(tmp_path: Path, fakes: Fakes) -> volume.Layout:
    node = tmp_path / "node"
    node.mkdir()
    return volume.Layout(mount_point=node / "statemesh",
                          backing_file=node / "state" / "storage.img",
                          mapper="statemesh-test", search_path=fakes.search_path)


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> List[volume.Key]:
    """Every Key the code creates, with a copy of its random bytes taken at birth."""
    made: List[volume.Key] = []

    class RecordedKey(volume.Key):
        def __enter__(self) -> bytearray:
            buffer = super().__enter__()
            self.original = bytes(buffer)
            made.append(self)
            return buffer

    monkeypatch.setattr(volume, "Key", RecordedKey)
    return made


def _image(path: Path, size_mib: int = 64) -> Path:
    with open(path, "wb") as image:
        image.truncate(size_mib * 1024 * 1024)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sh(*argv: str, stdin: bytes = b"") -> None:
    subprocess.run(list(argv), input=stdin, check=True, capture_output=True,
                   env={"PATH": SAFE_PATH, "LC_ALL": "C.UTF-8"})


def _luks(path: Path, label: str = "") -> Path:
    _sh("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", *(["--label", label] if label else []),
        "--key-file=-", str(path), stdin=os.urandom(32))
    return path


def _real(dedicated: bool = False) -> volume.Volume:
    """A Storage using the real tools, for read-only probing of image files."""
    return volume.Volume(config.NodeConfig(storage_dedicated=dedicated), volume.Layout())


# -- refusing data-carrying backing stores ------------------------------------------------


@pytest.mark.parametrize("make, found", [
    (lambda p: _sh("mkfs.ext4", "-q", "-F", str(p)), "filesystem or other signature ext4"),
    (lambda p: _sh("sfdisk", "-q", str(p), stdin=b"label: dos\n"), "partition table dos"),
    (lambda p: _sh("sfdisk", "-q", str(p), stdin=b"label: gpt\n"), "partition table gpt"),
    (lambda p: _luks(p), "encrypted volume crypto_LUKS"),
], ids=["ext4", "dos", "gpt", "foreign-luks"])
def test_a_store_carrying_data_is_refused_by_name_and_left_unchanged(tmp_path, make, found):
    image = _image(tmp_path / "disk.img")
    make(image)
    before = _sha(image)
    with pytest.raises(volume.StorageError) as refused:
        _real().check_signatures(image)
    message = str(refused.value)
    assert str(image) in message and found in message and "Storage-Dedicated: yes" in message
    assert _sha(image) == before


def test_a_luks_header_with_our_label_but_a_live_keyslot_is_not_ours(tmp_path):
    image = _luks(_image(tmp_path / "disk.img"), label=volume.LUKS_LABEL)
    with pytest.raises(volume.StorageError, match="crypto_LUKS labelled 'statemesh-ephemeral'"):
        _real().check_signatures(image)


def test_our_own_erased_header_from_an_earlier_boot_may_be_reformatted(tmp_path):
    image = _luks(_image(tmp_path / "disk.img"), label=volume.LUKS_LABEL)
    _sh("cryptsetup", "luksErase", "--batch-mode", str(image))
    found = _real().check_signatures(image)
    assert {s.type for s in found} == {"crypto_LUKS"}


def test_a_blank_store_is_accepted_and_a_dedicated_one_whatever_it_carries(tmp_path):
    blank = _image(tmp_path / "blank.img")
    assert _real().check_signatures(blank) == ()
    used = _image(tmp_path / "used.img")
    _sh("mkfs.ext4", "-q", "-F", str(used))
    assert [s.type for s in _real(dedicated=True).check_signatures(used)] == ["ext4"]


def test_wipefs_output_is_parsed_and_garbage_is_an_error():
    output = b'{"signatures": [{"device": "x", "offset": "0x438", "type": "ext4", "uuid": null, "label": "data"}]}'
    assert blockdev.parse_wipefs(output) == (blockdev.Signature("ext4", "0x438", "data"),)
    assert blockdev.parse_wipefs(b"") == ()
    with pytest.raises(ValueError, match="unexpected wipefs output"):
        blockdev.parse_wipefs(b'{"nothing": 1}')


# -- devices the system uses ----------------------------------------------------------------


def _sysfs(root: Path) -> blockdev.Sysfs:
    """A fake /sys: disk vda (252:0, partition vda1 252:1 held by dm-0) and disk vdb (252:16)."""
    devices = root / "devices"
    vda, vdb, dm0 = devices / "vda", devices / "vdb", devices / "dm-0"
    for node, number in ((vda, "252:0"), (vda / "vda1", "252:1"), (vdb, "252:16"), (dm0, "253:0")):
        node.mkdir(parents=True)
        (node / "dev").write_text(number + "\n")
        (node / "holders").mkdir()
        (node / "slaves").mkdir()
    (vda / "vda1" / "partition").write_text("1\n")
    (vda / "vda1" / "holders" / "dm-0").symlink_to(dm0)
    (dm0 / "slaves" / "vda1").symlink_to(vda / "vda1")
    (root / "dev" / "block").mkdir(parents=True)
    for node, number in ((vda, "252:0"), (vda / "vda1", "252:1"), (vdb, "252:16"), (dm0, "253:0")):
        (root / "dev" / "block" / number).symlink_to(node)
    return blockdev.Sysfs(root)


def test_the_disks_under_a_root_on_device_mapper_are_found(tmp_path):
    sysfs = _sysfs(tmp_path)
    assert sysfs.underlying_disks((253, 0)) == {(252, 0)}
    assert sysfs.disk_of((252, 1)) == (252, 0)


def test_a_device_in_use_is_refused_for_each_reason(tmp_path):
    sysfs = _sysfs(tmp_path)
    mountinfo = "36 1 252:16 / /mnt rw - ext4 /dev/vdb rw\n"
    swaps = "Filename Type Size Used Priority\n/dev/vdb partition 1 0 -2\n"
    problems = blockdev.usage_problems(Path("/dev/vdb"), (252, 16), sysfs, mountinfo, swaps, set())
    assert problems == ["it is mounted", "it is in use as swap"]
    problems = blockdev.usage_problems(Path("/dev/vda"), (252, 0), sysfs, "", "", {(252, 0)})
    assert problems == ["it has 1 partition(s)", "it is held by dm-0",
                        "it is on the disk of the root filesystem"]
    assert blockdev.usage_problems(Path("/dev/vdb"), (252, 16), sysfs, "", "", {(252, 0)}) == []


def test_a_storage_device_that_is_not_a_block_device_is_refused_untouched(tmp_path, layout, fakes):
    image = _image(tmp_path / "not-a-device.img")
    before = _sha(image)
    store = volume.Volume(config.NodeConfig(storage_device=image), layout)
    with pytest.raises(volume.StorageError, match=f"Storage-Device {image}: .* is not a block device"):
        store.setup()
    assert _sha(image) == before
    assert not [argv for argv in fakes.argvs("cryptsetup") if argv[1] != "status"]
    assert fakes.argvs("mount") == [] and not layout.backing_file.exists()


# -- the setup flow and the key -----------------------------------------------------------


def _all_file_bytes(root: Path) -> List[bytes]:
    return [p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def test_setup_feeds_the_key_through_stdin_only_and_zeroes_it(tmp_path, layout, fakes, keys):
    size = 96 * 1024 * 1024
    store = volume.Volume(config.NodeConfig(storage_size=size), layout)
    assert "mounted from /dev/mapper/statemesh-test on /dev/loop7" in store.setup()

    assert len(keys) == 1
    key = keys[0].original
    assert len(key) == volume.KEY_BYTES and key != bytes(volume.KEY_BYTES)
    assert keys[0].buffer == bytearray(volume.KEY_BYTES)  # overwritten in place
    fed = [call for call in fakes.calls() if call["stdin"]]
    assert [c["argv"][1] for c in fed] == ["luksFormat", "open"]
    assert all(bytes.fromhex(c["stdin"]) == key for c in fed)
    for call in fakes.calls():
        line = " ".join(call["argv"]).encode()
        assert key not in line and key.hex().encode() not in line
    for content in _all_file_bytes(layout.mount_point.parent):
        assert key not in content and key.hex().encode() not in content

    backing = layout.backing_file.stat()
    assert backing.st_size == size and backing.st_blocks * 512 < size  # sparse
    assert stat.S_IMODE(backing.st_mode) == 0o600


def test_setup_formats_luks2_with_minimal_pbkdf2_erases_keyslots_then_mounts(layout, fakes, keys):
    volume.Volume(config.NodeConfig(storage_size=64 * 1024**2), layout).setup()
    crypt = [argv[1] for argv in fakes.argvs("cryptsetup") if argv[1] != "status"]
    assert crypt == ["luksFormat", "open", "luksErase", "luksDump"]
    formatting = fakes.argvs("cryptsetup")[[a[1] for a in fakes.argvs("cryptsetup")].index("luksFormat")]
    for option in (["--type", "luks2"], ["--cipher", "aes-xts-plain64"], ["--key-size", "512"],
                   ["--pbkdf", "pbkdf2"], ["--pbkdf-force-iterations", "1000"]):
        assert " ".join(option) in " ".join(formatting)
    assert formatting[-1] == "/dev/loop7" and "--key-file=-" in formatting
    assert fakes.argvs("mkfs.ext4")[0][-1] == "/dev/mapper/statemesh-test"
    mount = fakes.argvs("mount")[0]
    assert mount[-2:] == ["/dev/mapper/statemesh-test", str(layout.mount_point)]
    assert {"nodev", "nosuid"} <= set(mount[mount.index("-o") + 1].split(","))
    order = [c["argv"][0] + " " + c["argv"][1] for c in fakes.calls()]
    assert order.index("chattr +i") < order.index("cryptsetup luksFormat")
    assert stat.S_IMODE(layout.mount_point.stat().st_mode) == volume.VOLUME_MODE


def test_a_failing_setup_leaves_the_mount_point_locked_and_the_key_zeroed(layout, fakes, keys):
    fakes.fail_on("open")
    store = volume.Volume(config.NodeConfig(storage_size=64 * 1024**2), layout)
    with pytest.raises(CommandError, match="cryptsetup exited with status 1: .*open failed"):
        store.setup()
    assert keys[0].buffer == bytearray(volume.KEY_BYTES)
    assert fakes.argvs("mount") == [] and fakes.argvs("mkfs.ext4") == []
    point = layout.mount_point.stat()
    assert stat.S_IMODE(point.st_mode) == 0 and list(layout.mount_point.iterdir()) == []
    assert fakes.argvs("chattr")[-1] == ["chattr", "+i", str(layout.mount_point)]
    assert not layout.backing_file.exists()


def test_short_free_space_is_a_clear_error_before_anything_is_written(layout, fakes):
    store = volume.Volume(config.NodeConfig(storage_size=2**60), layout)
    with pytest.raises(volume.StorageError, match=r"not enough free space for the 1048576\.0T backing "
                                                   r"file .*lower Storage-Size or set Storage-Device"):
        store.setup()
    assert not layout.backing_file.exists()
    assert fakes.argvs("losetup") == [argv for argv in fakes.argvs("losetup") if "--list" in argv]


def test_the_default_size_is_8g_or_half_the_free_space_and_an_explicit_one_is_kept():
    gib = 1024**3
    assert volume.backing_size(None, 100 * gib) == 8 * gib
    assert volume.backing_size(None, 3 * gib + 5) == 3 * gib // 2
    assert volume.backing_size(None, 10 * 1024**2) == volume.MINIMUM_SIZE  # then refused
    assert volume.backing_size(512 * 1024**2, 100 * gib) == 512 * 1024**2


def test_plaintext_left_in_the_unmounted_mount_point_is_refused(layout, fakes):
    layout.mount_point.mkdir()
    (layout.mount_point / "leftover").write_text("plaintext")
    store = volume.Volume(config.NodeConfig(storage_size=64 * 1024**2), layout)
    with pytest.raises(volume.StorageError, match="holds files"):
        store.setup()
    assert not [argv for argv in fakes.argvs("cryptsetup") if argv[1] != "status"]


def test_teardown_removes_the_backing_file_and_purge_gives_the_mount_point_back(layout, fakes, keys):
    # revert() is the unit's stop over D-Bus (VM-tested), then exactly these two steps.
    store = volume.Volume(config.NodeConfig(storage_size=64 * 1024**2), layout)
    store.setup()
    os.chmod(layout.mount_point, 0)  # what the unmounted directory looks like
    assert store.teardown() == [f"removed {layout.backing_file}"]
    store.release_mount_point()
    assert not layout.backing_file.exists() and not layout.mount_point.exists()
    assert fakes.argvs("chattr")[-1] == ["chattr", "-i", str(layout.mount_point)]


def test_feed_key_reports_a_program_that_exits_without_reading(tmp_path):
    with pytest.raises(CommandError, match="false exited with status 1"):
        volume.feed_key(["false"], bytearray(b"k" * 64), SAFE_PATH)


def test_the_key_is_random_locked_and_zeroed_after_use():
    with volume.Key() as first, volume.Key() as second:
        assert first != second and len(first) == volume.KEY_BYTES
        kept = first
    assert kept == bytearray(volume.KEY_BYTES)


# -- reading the live volume ----------------------------------------------------------------


def test_keyslots_are_counted_from_a_real_luks_dump(tmp_path):
    image = _luks(_image(tmp_path / "disk.img"), label=volume.LUKS_LABEL)
    dump = lambda: subprocess.run(["cryptsetup", "luksDump", str(image)], capture_output=True,
                                  check=True, text=True, env={"PATH": SAFE_PATH}).stdout
    assert volume.count_keyslots(dump()) == 1
    _sh("cryptsetup", "luksErase", "--batch-mode", str(image))
    assert volume.count_keyslots(dump()) == 0


def test_cryptsetup_status_and_mountinfo_are_parsed():
    status = volume.parse_crypt_status(
        "/dev/mapper/statemesh is active and is in use.\n  type:    LUKS2\n"
        "  cipher:  aes-xts-plain64\n  keysize: 512 bits\n  device:  /dev/loop0\n"
        "  loop:    /var/lib/statemesh-node/storage.img\n  size:    16744448 sectors\n")
    assert status["type"] == "LUKS2" and status["keysize"] == "512 bits"
    assert status["loop"] == "/var/lib/statemesh-node/storage.img"
    mountinfo = ("22 1 252:1 / / rw,relatime - ext4 /dev/vda1 rw\n"
                 "40 22 253:0 / /var/lib/statemesh rw,nosuid,nodev,noatime - ext4 "
                 "/dev/mapper/statemesh rw\n")
    source, options = volume.find_mount(mountinfo, Path("/var/lib/statemesh"))
    assert source == "/dev/mapper/statemesh" and {"nodev", "nosuid"} <= set(options)
    assert volume.find_mount(mountinfo, Path("/srv")) is None


def test_the_key_size_is_read_from_the_kernels_table_whether_keyring_or_hex():
    keyring = "0 2048 crypt aes-xts-plain64 :64:logon:cryptsetup:3f2a-d0 0 7:0 32768 1 sector_size:4096"
    assert volume.table_key_bits(keyring) == 512
    hidden = "0 2048 crypt aes-xts-plain64 " + "0" * 128 + " 0 7:0 32768"
    assert volume.table_key_bits(hidden) == 512
    with pytest.raises(ValueError, match="not a dm-crypt table"):
        volume.table_key_bits("0 2048 linear 7:0 0")


def test_status_reports_a_volume_that_is_not_set_up(layout, fakes):
    finding = storage.Storage(config.NodeConfig(), layout).check()
    assert not finding.holds and "/dev/mapper/statemesh-test is not set up" in finding.detail
    assert finding.facts["backing"] == f"file {layout.backing_file}"
    assert finding.facts["mounted"] is False


LIVE_STATUS = ("/dev/mapper/statemesh-test is active and is in use.\n  type:    LUKS2\n"
               "  cipher:  aes-xts-plain64\n  keysize: 0 bits\n  device:  /dev/loop0\n"
               "  loop:    /var/lib/statemesh-node/storage.img\n  size:    16744448 sectors\n")
LIVE_TABLE = "0 16744448 crypt aes-xts-plain64 :64:logon:cryptsetup:3f2a-d0 0 7:0 32768"


def _live(tmp_path: Path, layout: volume.Layout, mounts: str,
          mapper_number: str = "") -> storage.Storage:
    """A set-up volume as check() reads it: cryptsetup and dmsetup answers, the kernel's
    device-mapper record in a stand-in sysfs and a stand-in mountinfo. The volume's number
    is the mount point's own st_dev unless mapper_number says otherwise; `mounts` are
    mountinfo lines with {point} and {volume} (that number) to fill in."""
    layout.mount_point.mkdir()
    seen = os.stat(layout.mount_point).st_dev
    number = mapper_number or f"{os.major(seen)}:{os.minor(seen)}"
    dm = tmp_path / "sys" / "block" / "dm-0"
    (dm / "dm").mkdir(parents=True)
    (dm / "dm" / "name").write_text("statemesh-test\n")
    (dm / "dev").write_text(number + "\n")
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "mountinfo").write_text(
        "22 1 254:1 / / rw,relatime - ext4 /dev/vda1 rw\n"
        + mounts.format(point=layout.mount_point, volume=number))
    live = dataclasses.replace(layout, sysfs=tmp_path / "sys", proc=tmp_path / "proc")
    guarantee = storage.Storage(config.NodeConfig(), live)
    guarantee.volume.crypt_status = lambda: volume.parse_crypt_status(LIVE_STATUS)
    answers = {"luksDump": "LUKS header information\nVersion: 2\n\nKeyslots:\nTokens:\n",
               "table": LIVE_TABLE}
    guarantee.volume.output = lambda *argv: answers[argv[1]]
    return guarantee


VOLUME = "40 22 {volume} / {point} rw,nosuid,nodev,noatime - ext4 /dev/mapper/statemesh-test rw\n"


def test_the_storage_check_holds_for_the_volume_alone_at_its_mount_point(tmp_path, layout):
    finding = _live(tmp_path, layout, VOLUME).check()
    assert finding.holds, finding.detail
    assert finding.detail.startswith(f"{layout.mount_point}: LUKS2 aes-xts-plain64 512-bit")
    assert finding.facts["other_mounts"] == []


@pytest.mark.parametrize("mounts, mapper_number, named", [
    # a tmpfs over the volume, given the mapper's name and the volume's options
    (VOLUME + "41 40 0:99 / {point} rw,nosuid,nodev - tmpfs /dev/mapper/statemesh-test rw\n",
     "", "tmpfs /dev/mapper/statemesh-test (0:99) is mounted at {point}"),
    # a plaintext disk where the volume should be, the volume not mounted at all
    ("41 22 8:17 / {point} rw,nosuid,nodev - ext4 /dev/mapper/statemesh-test rw\n",
     "", "{point} is not mounted from /dev/mapper/statemesh-test ({volume}); "
         "ext4 /dev/mapper/statemesh-test (8:17) is mounted at {point}"),
    # a plaintext disk beneath the volume (mounted first, the volume over it)
    ("39 22 8:17 / {point} rw - ext4 /dev/sdb1 rw\n" + VOLUME,
     "", "ext4 /dev/sdb1 (8:17) is mounted at {point}"),
    # a tmpfs inside the volume
    (VOLUME + "41 40 0:99 / {point}/work rw,nosuid,nodev - tmpfs tmpfs rw\n",
     "", "tmpfs tmpfs (0:99) is mounted inside it at {point}/work"),
    # the volume in place, but the path leads elsewhere (a mount over a parent directory)
    (VOLUME, "253:7", "{point} leads to device {seen}, not to the volume"),
    # nodev,nosuid missing
    ("40 22 {volume} / {point} rw - ext4 /dev/mapper/statemesh-test rw\n",
     "", "{point} is mounted without nodev,nosuid"),
], ids=["tmpfs-over", "plaintext-instead", "plaintext-beneath", "tmpfs-inside", "parent-over",
        "no-nodev"])
def test_the_storage_check_fails_naming_what_else_is_at_the_mount_point(
        tmp_path, layout, mounts, mapper_number, named):
    finding = _live(tmp_path, layout, mounts, mapper_number).check()
    seen = os.stat(layout.mount_point).st_dev
    volume_number = mapper_number or f"{os.major(seen)}:{os.minor(seen)}"
    assert not finding.holds
    assert finding.detail == named.format(point=layout.mount_point, volume=volume_number,
                                          seen=f"{os.major(seen)}:{os.minor(seen)}")


IN_NAMESPACE = r'''
"""Inside `unshare --mount --propagation private`: a tmpfs stands in for the volume, the
attack mounts over it for real, and check() reads the kernel's mountinfo and st_dev."""
import json, os, subprocess, sys
from pathlib import Path
from statemesh import config, volume
from statemesh.guarantees import storage
from tests.test_storage import LIVE_STATUS, LIVE_TABLE
assert os.readlink("/proc/self/ns/mnt") != sys.argv[3], "not in a private mount namespace"
point, attack = Path(sys.argv[1]), sys.argv[2]
point.mkdir()
subprocess.run(["mount", "-t", "tmpfs", "-o", "nodev,nosuid", "volume", str(point)], check=True)
dev = os.stat(point).st_dev
dm = point.parent.parent / "sys" / "block" / "dm-0"  # beside the parent that gets covered
(dm / "dm").mkdir(parents=True)
(dm / "dm" / "name").write_text("statemesh-test\n")
(dm / "dev").write_text(f"{os.major(dev)}:{os.minor(dev)}\n")
if attack == "tmpfs-over":
    subprocess.run(["mount", "-t", "tmpfs", "-o", "nodev,nosuid", "/dev/mapper/statemesh-test",
                    str(point)], check=True)
elif attack == "parent-over":
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(point.parent)], check=True)
    point.mkdir()
guarantee = storage.Storage(config.NodeConfig(), volume.Layout(
    mount_point=point, mapper="statemesh-test", sysfs=dm.parent.parent))
guarantee.volume.crypt_status = lambda: volume.parse_crypt_status(LIVE_STATUS)
answers = {"luksDump": "LUKS header information\nKeyslots:\n", "table": LIVE_TABLE}
guarantee.volume.output = lambda *argv: answers[argv[1]]
seen = os.stat(point).st_dev  # what the attack put at the path
print(json.dumps({"finding": guarantee.check().as_dict(), "seen": f"{os.major(seen)}:{os.minor(seen)}"}))
'''


@pytest.mark.parametrize("attack, named", [
    ("none", ""),
    ("tmpfs-over", "tmpfs /dev/mapper/statemesh-test ({over}) is mounted at {point}; "
                   "{point} leads to device {over}, not to the volume"),
    ("parent-over", "{point} leads to device {over}, not to the volume"),
], ids=["volume-alone", "tmpfs-over", "parent-over"])
def test_mounts_over_the_volume_are_found_in_the_kernels_own_view(tmp_path, attack, named):
    """Real mounts in a private mount namespace (nothing propagates to this host)."""
    point = tmp_path / "node" / "statemesh"
    point.parent.mkdir()
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "/usr/bin/python3",
                           "-c", IN_NAMESPACE, str(point), attack, os.readlink("/proc/self/ns/mnt")],
                          capture_output=True, text=True, cwd=ROOT, check=False,
                          env={"PATH": SAFE_PATH, "LC_ALL": "C.UTF-8", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    finding = result["finding"]
    assert finding["holds"] == (not named), finding["detail"]
    if named:
        assert finding["detail"] == named.format(point=point, over=result["seen"])


def test_the_storage_check_fails_without_the_kernels_mapper_device(tmp_path, layout):
    guarantee = _live(tmp_path, layout, VOLUME)
    (tmp_path / "sys" / "block" / "dm-0" / "dm" / "name").write_text("other\n")
    finding = guarantee.check()
    assert not finding.holds
    assert finding.detail == "the kernel has no device-mapper device named statemesh-test"


def test_the_storage_command_stops_at_a_bad_config_before_touching_anything(tmp_path, capsys):
    conf = tmp_path / "node.conf"
    conf.write_text("Storage-Size: tiny\n")
    assert cli.main(["--config", str(conf), "storage", "setup"]) == cli.EXIT_CONFIG
    assert "Storage-Size" in capsys.readouterr().err


def test_the_stand_in_refuses_what_cryptsetup_2_4_3_would(fakes):
    """The stand-in every setup test runs through holds the volume's command lines to
    cryptsetup 2.4.3's (Ubuntu 22.04): an option it lacks, or one its action does not take,
    ends the call as 2.4.3 ends it; the volume's own command lines pass (the setup tests)."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(fakes.bin / "cryptsetup"), *args], capture_output=True,
                              text=True, env={"PATH": SAFE_PATH})
    refused = {
        ("open", "--label", "x", "/dev/loop7", "m"): "Option --label is not allowed with open action.",
        ("luksFormat", "--hw-opal", "/dev/loop7"): "--hw-opal: unknown option",  # 2.7
        ("luksErase", "--key-size", "512", "/dev/loop7"):
            "Option --key-size is not allowed with erase action.",
        ("wipe", "/dev/loop7"): "Unknown action.",
    }
    for argv, message in refused.items():
        result = run(*argv)
        assert (result.returncode, result.stderr.strip()) == (1, message), argv
    assert run("luksErase", "--batch-mode", "/dev/loop7").returncode == 0
    assert volume.count_keyslots(run("luksDump", "/dev/loop7").stdout) == 0
