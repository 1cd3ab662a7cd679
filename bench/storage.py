"""Benchmark of the encrypted storage setup, run in a guest: host-side driver.

    /usr/bin/python3 -m bench.storage --deb build/statemesh-node_<ver>_all.deb [--size-gib 8]

dm-crypt exists only in the VM, so this boots a guest of the VM harness (harness/vm) with an
extra disk big enough for the backing files, installs the package there, formats the extra
disk as the bench's work area and runs bench/storage_guest.py in the guest (see there for
what is measured). The guest's output is printed as it is; its last line is
`storage setup_s=<x> baseline_s=<y> ratio=<x/y> write_ratio=<volume/raw>`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from harness.vm import image
from harness.vm.driver import Guest

HERE = Path(__file__).resolve().parent
WORK_AREA = "/srv/bench"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, required=True, help="the statemesh-node .deb")
    parser.add_argument("--suite", default="bookworm")
    parser.add_argument("--size-gib", type=int, default=8)
    parser.add_argument("--write-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="statemesh-bench-storage-"))
    try:
        repo = image.build_repo_disk([args.deb.resolve()], workdir / "repo.img")
        # Room for the product's and the baseline's sparse backing files, one at a time.
        area_mib = (args.size_gib + 2) * 1024
        guest = Guest(image.build(args.suite), workdir, repo, extra_disks_mib=(area_mib,))
        try:
            guest.boot()
            guest.install()
            guest.run(f"mkfs.ext4 -q /dev/disk/by-id/virtio-extra0 && mkdir -p {WORK_AREA} && "
                      f"mount /dev/disk/by-id/virtio-extra0 {WORK_AREA}")
            guest.put("/root/storage_guest.py", (HERE / "storage_guest.py").read_bytes())
            result = guest.run(f"/usr/bin/python3 /root/storage_guest.py --workdir {WORK_AREA} "
                               f"--size-gib {args.size_gib} --write-mib {args.write_mib} "
                               f"--rounds {args.rounds}", timeout=3600)
            print(result.stdout, end="")
        finally:
            guest.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
