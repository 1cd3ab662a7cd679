"""Kernel code of root's own: a module the kernel marked as one it could not vouch for, a
mark left by one since unloaded, and a module file no package installed are named; a stock
node's modules, as the kernel package shipped them under either /usr-merged name, are not.
Each test runs on a stand-in root, never on this host's kernel."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest

from statemesh import kernelmodules, preflight

VERSION = "6.1.0-50-amd64"
SHIPPED = f"lib/modules/{VERSION}/kernel/drivers/net/dummy.ko"


def write(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def stock(root: Path, usr_merged: bool = True) -> Dict[str, str]:
    """A stand-in root with one shipped module (and depmod's index beside it), its kernel
    unmarked, and what dpkg recorded of it: under /lib, as Debian 12's kernel ships it."""
    if usr_merged:
        (root / "usr/lib").mkdir(parents=True)
        (root / "lib").symlink_to("usr/lib")
    write(root / SHIPPED, "\x7fELF dummy")
    write(root / f"lib/modules/{VERSION}/modules.dep", "kernel/drivers/net/dummy.ko:\n")
    write(root / "proc/sys/kernel/tainted", "0\n")
    write(root / "sys/module/dummy/taint", "\n")
    (root / "sys/module/ext4/parameters").mkdir(parents=True)  # built in: no taint file
    return {f"/{SHIPPED}": "0" * 32}


@pytest.mark.parametrize("usr_merged", [True, False])
def test_a_stock_node_passes(tmp_path: Path, usr_merged: bool) -> None:
    files = stock(tmp_path, usr_merged)
    assert kernelmodules.problems(files, tmp_path) == []


def test_modules_shipped_under_usr_pass_on_a_usr_merged_node(tmp_path: Path) -> None:
    """Debian 13 lists its kernel's modules under /usr/lib/modules."""
    files = {"/usr" + name: digest for name, digest in stock(tmp_path).items()}
    assert kernelmodules.file_problems(files, tmp_path) == []


@pytest.mark.parametrize("marks, shown", [
    ("E", "E: not signed by a key the kernel trusts"),
    ("OE", "E: not signed by a key the kernel trusts"),
    ("PF", "F: loaded by force"),
    ("FE", "F: loaded by force, E: not signed by a key the kernel trusts"),
])
def test_a_loaded_module_the_kernel_marked_is_named(tmp_path: Path, marks: str,
                                                    shown: str) -> None:
    files = stock(tmp_path)
    write(tmp_path / "sys/module/dummy/taint", f"{marks}\n")
    write(tmp_path / "proc/sys/kernel/tainted", "8192\n")
    assert kernelmodules.problems(files, tmp_path) == [
        "kernel modules loaded that the distribution's kernel does not vouch for, running in "
        f"the kernel with no check seeing what they do: dummy ({shown}) (rmmod them and "
        "reboot, or remove them and their DKMS package and reboot)"]


@pytest.mark.parametrize("marks", ["P", "O", "PO"])
def test_a_signed_module_built_outside_the_tree_is_not_named(tmp_path: Path, marks: str) -> None:
    """P (a licence) and O (the module's own word about its build: Ubuntu's packaged,
    signed NVIDIA driver) say nothing of who signed it: E does."""
    files = stock(tmp_path)
    write(tmp_path / "sys/module/dummy/taint", f"{marks}\n")
    write(tmp_path / "proc/sys/kernel/tainted", str(1 | 1 << 12) + "\n")
    assert kernelmodules.problems(files, tmp_path) == []


def test_the_kernels_mark_tells_of_a_module_since_unloaded(tmp_path: Path) -> None:
    files = stock(tmp_path)
    write(tmp_path / "proc/sys/kernel/tainted", str(1 << 12 | 1 << 13 | 1 << 9) + "\n")
    assert kernelmodules.loaded_problems(tmp_path) == [
        "the kernel is marked since this boot by a module it could not vouch for, since "
        "unloaded (E: not signed by a key the kernel trusts): what it changed in the kernel stays until the next boot (reboot)"]
    assert kernelmodules.file_problems(files, tmp_path) == []


@pytest.mark.parametrize("name", ["updates/way-in.ko", "updates/dkms/way-in.ko.xz",
                                  "kernel/fs/way-in.ko.zst", "extra/way-in.ko.gz"])
def test_a_module_file_no_package_installed_is_named_once(tmp_path: Path, name: str) -> None:
    files = stock(tmp_path)
    planted = write(tmp_path / f"lib/modules/{VERSION}" / name)
    write(tmp_path / f"lib/modules/{VERSION}/updates/notes.txt")  # no module: not judged
    assert kernelmodules.problems(files, tmp_path) == [
        "kernel module files no package installed, which modprobe loads as kernel code at a "
        f"request or at boot: {planted} (remove them and run depmod -a, or remove the DKMS "
        "package that built them)"]


def test_module_files_of_a_kernel_not_running_are_judged_too(tmp_path: Path) -> None:
    """The next boot may start another installed kernel."""
    files = stock(tmp_path)
    write(tmp_path / "usr/lib/modules/6.1.0-99-amd64/extra/way-in.ko")
    [found] = kernelmodules.file_problems(files, tmp_path)
    # Found through /lib (the /usr merge's link), named once.
    assert f": {tmp_path}/lib/modules/6.1.0-99-amd64/extra/way-in.ko (remove them" in found


def test_a_module_reached_through_a_linked_directory_is_named_and_a_link_loop_ends(
        tmp_path: Path) -> None:
    """depmod follows a link to a directory: modules in /root, linked in, load."""
    files = stock(tmp_path)
    write(tmp_path / "root/mods/way-in.ko")
    (tmp_path / f"lib/modules/{VERSION}/updates").symlink_to(tmp_path / "root/mods")
    (tmp_path / "root/mods/again").symlink_to(tmp_path / "lib/modules")  # back up the tree
    [found] = kernelmodules.file_problems(files, tmp_path)
    assert f": {tmp_path}/lib/modules/{VERSION}/updates/way-in.ko (remove them" in found


def test_a_kernels_links_to_its_headers_and_sources_are_not_searched(tmp_path: Path) -> None:
    """depmod skips build/ and source/: a header tree may hold anything named *.ko."""
    files = stock(tmp_path)
    write(tmp_path / "usr/src/headers/vim90/tutor/tutor.ko")
    for name in ("build", "source"):
        (tmp_path / f"lib/modules/{VERSION}" / name).symlink_to(tmp_path / "usr/src/headers")
    assert kernelmodules.file_problems(files, tmp_path) == []


def test_depmods_configuration_is_judged_with_the_hooks() -> None:
    """`external VERSION /root/mods` sends modprobe to modules outside /lib/modules."""
    from statemesh import jobs
    assert {"/etc/depmod.d/*", "/usr/lib/depmod.d/*", "/lib/depmod.d/*"} <= set(jobs.HOOK_GLOBS)


def test_unreadable_kernel_files_are_no_finding(tmp_path: Path) -> None:
    """No /sys or /proc to read (a chroot): nothing loaded is known, nothing is claimed."""
    assert kernelmodules.loaded_problems(tmp_path) == []


@pytest.mark.system_apt  # planted_for_later reads apt's configuration too
def test_preflight_and_status_name_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """planted_for_later (preflight's refusal, status's planted line) judges kernel modules,
    here a stand-in root's beside what dpkg installed on this host."""
    stand_in = stock(tmp_path)
    write(tmp_path / "sys/module/dummy/taint", "E\n")
    judge = kernelmodules.problems
    monkeypatch.setattr(kernelmodules, "problems",
                        lambda files: judge({**files, **stand_in}, tmp_path))
    found = [line for line in preflight.planted_for_later([]) if "dummy (E: " in line]
    assert len(found) == 1, found
