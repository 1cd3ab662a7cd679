"""Installing into a chroot (an image build) changes nothing outside it and defers hardening.

In an image build there is no running systemd: the maintainer scripts must succeed without
touching the build host, and leave statemesh-harden enabled for the image's first boot.
The chroot runs in a private mount and PID namespace, so even a mistake cannot reach this host.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness.vm.image import CLEAN_ENV, Image


def _host_state() -> str:
    """What a postinst that escaped the chroot would change first on this host."""
    watched = [Path("/etc/systemd/system"), Path("/run/statemesh-node"),
               Path("/var/lib/statemesh-node"), Path("/etc/statemesh")]
    lines = []
    for path in watched:
        if path.exists():
            lines += sorted(str(p) for p in path.rglob("*"))
        else:
            lines.append(f"absent {path}")
    return "\n".join(lines)


@pytest.mark.cost(10)
def test_dpkg_install_in_a_chroot_defers_hardening_to_first_boot(
    vm_image: Image, deb: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["tar", "-C", str(root), "-xf", str(vm_image.rootfs)], check=True, env=CLEAN_ENV)
    (root / "tmp" / deb.name).write_bytes(deb.read_bytes())
    before = _host_state()

    script = (
        f'mount -t proc proc "{root}/proc" && '
        f'chroot "{root}" env DEBIAN_FRONTEND=noninteractive dpkg -i /tmp/{deb.name}'
    )
    result = subprocess.run(["unshare", "--mount", "--pid", "--fork", "sh", "-c", script],
                            capture_output=True, text=True, env=CLEAN_ENV, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Setting up statemesh-node" in result.stdout

    assert _host_state() == before
    wants = root / "etc/systemd/system/multi-user.target.wants/statemesh-node.target"
    assert wants.is_symlink(), "statemesh-node.target must be enabled for the first boot"
    assert "statemesh-harden.service" in (root / "lib/systemd/system/statemesh-node.target"
                                          ).read_text(), "the target wants the harden unit"
    assert not (root / "var/lib/statemesh-node/restore.json").exists(), "nothing hardened yet"
    status = subprocess.run(["dpkg-query", "--admindir", str(root / "var/lib/dpkg"), "-W",
                             "-f", "${db:Status-Abbrev}", "statemesh-node"],
                            capture_output=True, text=True, env=CLEAN_ENV)
    assert status.stdout.strip() == "ii"
