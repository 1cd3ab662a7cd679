"""`make demo`: install the freshly built package in a VM as an operator would, and show it.

Boots a Debian guest with a TPM (swtpm, its EK certificate issued by a private test CA that
the node is told to trust), installs statemesh-node from the local apt repository with
apt-get, and prints what the operator would then see: `statemesh-node status`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from harness.vm import image, vtpm
from harness.vm.driver import Guest


def main() -> int:
    parser = argparse.ArgumentParser(prog="python3 -m harness.vm.demo")
    parser.add_argument("--deb", type=Path, required=True)
    parser.add_argument("--suite", default="bookworm")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="statemesh-demo-"))
    started = time.monotonic()
    print(f"demo: guest image ({args.suite}) ...", flush=True)
    vm_image = image.build(args.suite)
    repo = image.build_repo_disk([args.deb.resolve()], work / "repo.img")
    ca = vtpm.LocalCa(work / "tpm-ca")
    guest = Guest(vm_image, work / "guest", repo, tpm_ca=ca)
    try:
        print("demo: booting the guest (QEMU, TCG) ...", flush=True)
        guest.boot()
        print(f"demo: guest up after {time.monotonic() - started:.0f} s; before install:")
        print(guest.run("systemctl is-active ssh.service; ls /dev/tpm*", check=False).stdout)
        for cert in ca.ca_certificates():
            guest.run("mkdir -p /etc/statemesh/tpm-ca.d")
            guest.put(f"/etc/statemesh/tpm-ca.d/{cert.name}", cert.read_bytes())
        print("demo: apt-get install -y statemesh-node", flush=True)
        print(guest.install().stdout[-1500:])
        status = guest.run("statemesh-node status", check=False)
        print("demo: statemesh-node status (exit status %d)" % status.returncode)
        print(status.stdout + status.stderr)
        print(f"demo: console log at {guest.console_path}")
        return 0
    finally:
        guest.close()


if __name__ == "__main__":
    sys.exit(main())
