"""Storage benchmark, guest side: run as root in a guest with statemesh-node installed.

    /usr/bin/python3 storage_guest.py --workdir /srv/bench [--size-gib 8] [--write-mib 512] [--rounds 3]

Setup: the product's whole setup (sparse file, loop, luksFormat, open, luksErase, mkfs,
mount) of a Size-GiB backing file, against the crypttab idiom on the same kind of file in
the same boot (loop, `cryptsetup open --type plain` with a random key, default mkfs.ext4,
mount). Throughput: sequential writes (1 MiB blocks, fsync) into a file on the volume
against the same writes onto a raw loop device over a sparse file of the same size.
Rounds alternate and the medians are compared. Uses its own mapper names and mount points: the node's live
/var/lib/statemesh is not touched. The last line is the summary the reports quote.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, List

from statemesh import volume
from statemesh.config import NodeConfig

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}


def sh(*argv: str, stdin: bytes = b"") -> str:
    return subprocess.run(list(argv), input=stdin, check=True, capture_output=True,
                          env=ENV).stdout.decode()


def timed(action: Callable[[], object]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


def write_rate(path: Path, mib: int, flags: int = 0) -> float:
    """MiB/s of `mib` sequential 1 MiB writes followed by fsync."""
    block = os.urandom(1024 * 1024)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o600)
    try:
        started = time.monotonic()
        for _ in range(mib):
            os.write(descriptor, block)
        os.fsync(descriptor)
        return mib / (time.monotonic() - started)
    finally:
        os.close(descriptor)


class Product:
    """The product's setup on a private layout."""

    def __init__(self, workdir: Path, size: int):
        layout = volume.Layout(mount_point=workdir / "product-mnt",
                                backing_file=workdir / "product.img", mapper="bench-product")
        self.volume = volume.Volume(NodeConfig(storage_size=size), layout)
        self.layout = layout

    def setup(self) -> None:
        self.volume.setup()

    def write(self, mib: int) -> float:
        return write_rate(self.layout.mount_point / "data", mib)

    def teardown(self) -> None:
        self.volume.teardown()
        self.volume.release_mount_point()


def raw_write_rate(workdir: Path, size: int, mib: int) -> float:
    """The same writes onto a loop device over a sparse file of the same size: no dm-crypt."""
    image = workdir / "raw.img"
    with open(image, "wb") as handle:
        handle.truncate(size)
    loop = sh("losetup", "--find", "--show", str(image)).strip()
    try:
        return write_rate(Path(loop), mib)
    finally:
        sh("losetup", "--detach", loop)
        image.unlink()


class Crypttab:
    """The crypttab idiom: plain dm-crypt with a random key, default mkfs, mount."""

    def __init__(self, workdir: Path, size: int):
        self.image, self.mount, self.size = workdir / "baseline.img", workdir / "baseline-mnt", size
        self.loop = ""

    def setup(self) -> None:
        with open(self.image, "wb") as image:
            image.truncate(self.size)
        self.loop = sh("losetup", "--find", "--show", str(self.image)).strip()
        key = os.urandom(64)
        sh("cryptsetup", "open", "--type", "plain", "--cipher", volume.CIPHER, "--key-size", "512",
           "--key-file=-", self.loop, "bench-baseline", stdin=key)
        sh("mkfs.ext4", "-q", "/dev/mapper/bench-baseline")
        self.mount.mkdir(exist_ok=True)
        sh("mount", "/dev/mapper/bench-baseline", str(self.mount))

    def teardown(self) -> None:
        sh("umount", str(self.mount))
        sh("cryptsetup", "close", "bench-baseline")
        sh("losetup", "--detach", self.loop)
        self.image.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--size-gib", type=int, default=8)
    parser.add_argument("--write-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = args.size_gib * 1024**3
    product, baseline = Product(args.workdir, size), Crypttab(args.workdir, size)
    setups: List[float] = []
    baselines: List[float] = []
    volume_rates: List[float] = []
    raw_rates: List[float] = []
    for round_number in range(args.rounds):
        setups.append(timed(product.setup))
        volume_rates.append(product.write(args.write_mib))
        product.teardown()
        raw_rates.append(raw_write_rate(args.workdir, size, args.write_mib))
        baselines.append(timed(baseline.setup))
        baseline.teardown()
        print(f"round {round_number + 1}: setup {setups[-1]:.2f} s, crypttab idiom "
              f"{baselines[-1]:.2f} s, write volume {volume_rates[-1]:.0f} MiB/s, "
              f"raw {raw_rates[-1]:.0f} MiB/s", flush=True)
    setup_s, baseline_s = statistics.median(setups), statistics.median(baselines)
    write_ratio = statistics.median(volume_rates) / statistics.median(raw_rates)
    print(f"storage setup_s={setup_s:.2f} baseline_s={baseline_s:.2f} "
          f"ratio={setup_s / baseline_s:.2f} write_ratio={write_ratio:.2f}")


if __name__ == "__main__":
    main()
