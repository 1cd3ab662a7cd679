"""Programs the kernel runs as root: a module loader, a uevent helper or a binfmt_misc
interpreter not as a package installed it is named, and so are the sysctl and binfmt.d files
that would set them again at every boot; a stock node's are not. Each test runs on a stand-in
root, never on this host's kernel settings."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict

import pytest

from statemesh import kernelhelpers, preflight
from statemesh.guarantees import memory

KMOD = b"\x7fELF kmod\n"
PYTHON = b"\x7fELF python3.11\n"
# A Debian 12 guest's, with systemd's binfmt_misc automount mounted over.
MOUNTINFO = """\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
24 22 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
25 24 0:6 / /sys/kernel/security rw,nosuid,nodev,noexec,relatime shared:3 - securityfs securityfs rw
26 23 0:36 / /proc/sys/fs/binfmt_misc rw,relatime shared:13 - autofs systemd-1 rw
27 26 0:45 / /proc/sys/fs/binfmt_misc rw,nosuid,nodev,noexec,relatime shared:14 - binfmt_misc binfmt_misc rw
"""


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def stock(root: Path) -> Dict[str, str]:
    """A stand-in root as a stock node has it: /sbin/modprobe a link to kmod, no uevent
    helper, binfmt_misc not mounted, packaged sysctl and binfmt.d files (Debian 13's
    core_pattern among them); what dpkg installed, as dpkg's md5sums would say."""
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/kmod").write_bytes(KMOD)
    (root / "usr/bin/python3.11").write_bytes(PYTHON)
    (root / "sbin").mkdir()
    (root / "sbin/modprobe").symlink_to("../usr/bin/kmod")
    write(root / "proc/sys/kernel/modprobe", "/sbin/modprobe\n")
    write(root / "sys/kernel/uevent_helper", "\n")
    (root / "proc/sys/fs/binfmt_misc").mkdir(parents=True)
    write(root / "proc/self/mountinfo", MOUNTINFO)
    packaged = [write(root / "usr/lib/sysctl.d/10-coredump-debian.conf",
                      "kernel.core_pattern=core\n"),
                write(root / "etc/sysctl.conf", "#kernel.modprobe = x\nvm.swappiness = 10\n"),
                write(root / "usr/lib/binfmt.d/python3.11.conf",
                      ":python3.11:M::\\xa7\\x0d\\x0d\\x0a::/usr/bin/python3.11:\n")]
    (root / "etc/sysctl.d").mkdir()
    (root / "etc/sysctl.d/99-sysctl.conf").symlink_to("../sysctl.conf")
    files = {str(path): md5(path.read_bytes()) for path in packaged}
    files.update({str(root / "usr/bin" / name): md5(data)
                  for name, data in (("kmod", KMOD), ("python3.11", PYTHON))})
    return files


def mount_binfmt_misc(root: Path) -> Path:
    """binfmt_misc as mounted, with python3's registration (as systemd-binfmt makes it)."""
    directory = root / "proc/sys/fs/binfmt_misc"
    write(directory / "status", "enabled\n")
    write(directory / "register", "")
    write(directory / "python3.11", "enabled\ninterpreter /usr/bin/python3.11\nflags: \n"
          "offset 0\nmagic a70d0d0a\n")
    return directory


def test_a_stock_node_passes(tmp_path: Path) -> None:
    files = stock(tmp_path)
    assert kernelhelpers.problems(files, tmp_path) == []
    mount_binfmt_misc(tmp_path)
    assert kernelhelpers.problems(files, tmp_path) == []
    write(tmp_path / "proc/sys/kernel/modprobe", "\n")  # module loading off
    (tmp_path / "sys/kernel/uevent_helper").unlink()  # Debian's kernels have none
    assert kernelhelpers.problems(files, tmp_path) == []


@pytest.mark.parametrize("loader, why", [
    ("/opt/kmod", "{root}/opt is writable by others than root"),
    ("/bin/kmod", "{root}/bin/kmod is reached through a link"),
    ("/usr/lib/../bin/kmod", "'{root}/usr/lib/../bin/kmod' is not a plain absolute path"),
    ("usr/bin/kmod", "'usr/bin/kmod' is not a plain absolute path"),
    (" ", "' ' is not a plain absolute path"),
])
def test_a_packaged_module_loader_others_could_replace_is_named(
        tmp_path: Path, loader: str, why: str) -> None:
    """kmod itself, as installed, but where others may put another program in its place
    (/tmp after a boot), through a link or a '..' (either may lead anywhere later), or
    named relatively (the kernel runs it from /: ' ' is '/ ')."""
    files = stock(tmp_path)
    (tmp_path / "opt").mkdir(mode=0o1777)
    (tmp_path / "opt").chmod(0o1777)
    (tmp_path / "opt/kmod").write_bytes(KMOD)
    files[str(tmp_path / "opt/kmod")] = md5(KMOD)
    (tmp_path / "bin").symlink_to("usr/bin")
    modprobe = write(tmp_path / "proc/sys/kernel/modprobe", f"{loader}\n")
    [found] = kernelhelpers.helper_problems(files, tmp_path)
    assert found == (f"{modprobe} is {loader!r}, which the kernel runs as root at every module "
                     "request, and anyone can make one (a socket of a protocol family not "
                     f"loaded yet): {why.format(root=tmp_path)} "
                     "(sysctl -w kernel.modprobe=/sbin/modprobe)")


@pytest.mark.parametrize("loader, why", [
    ("/root/way-in", "{root}/root/way-in is not a program as a package installed it"),
    # python3, as installed, run by the kernel as `python3 -q -- net-pf-NN` from /, would
    # run a file root left at /net-pf-NN: only the module loader itself passes.
    ("/usr/bin/python3.11", "{root}/usr/bin/python3.11 is not the program /sbin/modprobe "
     "leads to"),
])
def test_a_module_loader_other_than_kmod_is_named(tmp_path: Path, loader: str, why: str) -> None:
    files = stock(tmp_path)
    write(tmp_path / "root/way-in", "#!/bin/sh\n")
    modprobe = write(tmp_path / "proc/sys/kernel/modprobe", f"{loader}\n")
    assert kernelhelpers.helper_problems(files, tmp_path) == [
        f"{modprobe} is {loader!r}, which the kernel runs as root at every module request, and "
        "anyone can make one (a socket of a protocol family not loaded yet): "
        f"{why.format(root=tmp_path)} (sysctl -w kernel.modprobe=/sbin/modprobe)"]
    write(modprobe, "/usr/bin/kmod\n")  # where /sbin/modprobe leads
    assert kernelhelpers.helper_problems(files, tmp_path) == []


@pytest.mark.parametrize("command, why", [
    ("/root/way-in", "{root}/root/way-in is not a program as a package installed it"),
    ("/usr/bin/python3.11", "{root}/usr/bin/python3.11 is not the program /sbin/poweroff "
     "leads to"),
])
def test_a_power_off_command_of_roots_is_named(tmp_path: Path, command: str, why: str) -> None:
    """The kernel runs it as root when a hypervisor asks the guest to shut down, and
    nothing says the node must go down after it."""
    files = stock(tmp_path)
    write(tmp_path / "root/way-in", "#!/bin/sh\n")
    (tmp_path / "usr/bin/systemctl").write_bytes(b"systemctl")
    files[str(tmp_path / "usr/bin/systemctl")] = md5(b"systemctl")
    (tmp_path / "sbin/poweroff").symlink_to("../usr/bin/systemctl")
    poweroff_cmd = write(tmp_path / "proc/sys/kernel/poweroff_cmd", "/sbin/poweroff\n")
    assert kernelhelpers.helper_problems(files, tmp_path) == []
    write(poweroff_cmd, f"{command}\n")
    assert kernelhelpers.helper_problems(files, tmp_path) == [
        f"{poweroff_cmd} is {command!r}, which the kernel runs as root at an orderly power-off "
        "(a hypervisor's shutdown request, a thermal event), and the node may live on after "
        f"it: {why.format(root=tmp_path)} (sysctl -w kernel.poweroff_cmd=/sbin/poweroff)"]


def test_a_request_key_program_no_package_installed_is_named(tmp_path: Path) -> None:
    """The kernel runs /sbin/request-key, a fixed path, as root at any user's key request:
    where keyutils is not installed, whatever root put there."""
    files = stock(tmp_path)
    assert kernelhelpers.helper_problems(files, tmp_path) == []
    planted = write(tmp_path / "sbin/request-key", "#!/bin/sh\n/root/way-in\n")
    assert kernelhelpers.helper_problems(files, tmp_path) == [
        f"the kernel runs {planted} as root whenever any user asks for a key it does not "
        f"hold: {planted} is not a program as a package installed it (remove it, or "
        "reinstall keyutils)"]
    files[str(planted)] = md5(planted.read_bytes())  # keyutils's, as installed
    assert kernelhelpers.helper_problems(files, tmp_path) == []


def test_a_core_dump_handler_that_is_no_packaged_program_is_named(tmp_path: Path) -> None:
    """The memory guarantee pipes core dumps to /bin/false; a /bin/false of root's would run
    as root at any process's crash, a tenant's included."""
    files = stock(tmp_path)
    false = write(tmp_path / "usr/bin/false", "false")
    files[str(false)] = md5(b"false")
    core_pattern = write(tmp_path / "proc/sys/kernel/core_pattern", "|/usr/bin/false\n")
    assert kernelhelpers.helper_problems(files, tmp_path) == []
    false.write_text("#!/bin/sh\n/root/way-in\n")
    assert kernelhelpers.helper_problems(files, tmp_path) == [
        f"{core_pattern} pipes core dumps to '/usr/bin/false', which the kernel runs as root at "
        f"any process's crash: {false} is not a program as a package installed it "
        "(reinstall its package)"]
    write(core_pattern, "core\n")  # a file, no program
    assert kernelhelpers.helper_problems(files, tmp_path) == []


@pytest.mark.parametrize("helper", ["/root/way-in", " "])
def test_a_uevent_helper_is_named(tmp_path: Path, helper: str) -> None:
    files = stock(tmp_path)
    uevent_helper = write(tmp_path / "sys/kernel/uevent_helper", f"{helper}\n")
    assert kernelhelpers.helper_problems(files, tmp_path) == [
        f"{uevent_helper} is {helper!r}, which the kernel runs as root at every device event "
        f"(a loop device at every boot) (echo > {uevent_helper})"]


def test_a_binfmt_misc_registration_with_a_planted_interpreter_is_named(tmp_path: Path) -> None:
    """python3's registration, its interpreter as installed, passes; so does a disabled
    one; one whose interpreter is root's own does not, nor one that names none."""
    files = stock(tmp_path)
    directory = mount_binfmt_misc(tmp_path)
    write(directory / "off", "disabled\ninterpreter /root/off\nflags: \nextension .off\n")
    assert kernelhelpers.registration_problems(files, tmp_path) == []
    write(tmp_path / "root/way-in", "#!/bin/sh\n")
    write(directory / "way-in", "enabled\ninterpreter /root/way-in\nflags: OC\noffset 0\n"
          "magic 7f454c46\n")
    write(directory / ".hidden", "enabled\n")
    assert kernelhelpers.registration_problems(files, tmp_path) == [
        "binfmt_misc registrations whose interpreter the kernel runs whenever a matching file "
        "is executed (as root for root's programs, and with flag C for a setuid file): "
        ".hidden (flags none): '' is not a plain absolute path, way-in (flags OC): "
        f"{tmp_path}/root/way-in is not a program as a package installed it "
        f"(echo -1 > {directory}/NAME for each)"]


def test_registrations_kept_after_an_unmount_are_named(tmp_path: Path) -> None:
    """Before Linux 6.7 (Debian 12's, Ubuntu 22.04's kernels) a registration outlives the
    unmount of binfmt_misc, unseen, and keeps the module in use."""
    files = stock(tmp_path)
    users = write(tmp_path / "sys/module/binfmt_misc/refcnt", "0\n")
    assert kernelhelpers.registration_problems(files, tmp_path) == []
    users.write_text("1\n")
    directory = tmp_path / "proc/sys/fs/binfmt_misc"
    assert kernelhelpers.registration_problems(files, tmp_path) == [
        f"binfmt_misc is not mounted at {directory}, but the kernel holds registrations "
        f"({users} is not 0): what they run cannot be read (mount -t binfmt_misc binfmt_misc "
        f"{directory} and run this again, or reboot)"]


@pytest.mark.parametrize("line", [
    "kernel.modprobe = /root/way-in", "kernel/modprobe=/root/way-in",
    "-kernel.modprobe = /root/way-in", "kernel.hotplug=/root/way-in",
    "kernel.core_pattern = |/root/way-in", "kernel.mod* = /root/way-in",
    "  kernel//modprobe=/root/way-in", "kernel.poweroff_cmd = /root/way-in",
    # What procps's sysctl -p or glibc's glob() take for the same key, fnmatch does not.
    "kernel.modprobe\v= /root/way-in", "kernel.modprob[^a] = /root/way-in",
    "kernel.modprob[[:alpha:]] = /root/way-in", "kernel.m\\odprob? = /root/way-in",
    "*.modprobe = /root/way-in",
])
@pytest.mark.parametrize("where", ["etc/sysctl.d/99-way-in.conf", "etc/ufw/sysctl.conf"])
def test_a_sysctl_file_no_package_installed_that_sets_a_helper_is_named(
        tmp_path: Path, line: str, where: str) -> None:
    """systemd-sysctl's files and ufw's, which ufw-init applies at every boot."""
    files = stock(tmp_path)
    planted = write(tmp_path / where, f"# the way back\nvm.swappiness = 10\n{line}\n")
    assert kernelhelpers.persistent_problems(files, tmp_path) == [
        "sysctl files not as a package installed them set a program the kernel runs as root "
        "(kernel.modprobe at module requests, kernel.hotplug at device events, "
        f"kernel.core_pattern at crashes) at every boot: {planted} ({line.partition('=')[0].strip()}) "
        "(remove those lines, or the files)"]
    planted.write_text("vm.swappiness = 10\nkernel.domainname = node\n"  # none of them
                       "net.ipv4.conf.*.rp_filter = 2\n")
    assert kernelhelpers.persistent_problems(files, tmp_path) == []


def test_the_memory_guarantees_own_sysctl_file_passes_only_as_it_writes_it(
        tmp_path: Path) -> None:
    files = stock(tmp_path)
    own = write(tmp_path / memory.SYSCTL_DROPIN, memory.SYSCTL_SETTINGS)
    assert kernelhelpers.persistent_problems(files, tmp_path) == []
    own.write_text(memory.SYSCTL_SETTINGS + "vm.swappiness = 10\n")
    [found] = kernelhelpers.persistent_problems(files, tmp_path)
    assert f": {own} (kernel.core_pattern) (remove" in found, found


def test_a_binfmt_d_file_no_package_installed_is_named(tmp_path: Path) -> None:
    files = stock(tmp_path)
    (tmp_path / "etc/binfmt.d").mkdir()
    (tmp_path / "etc/binfmt.d/qemu-arm.conf").symlink_to("/dev/null")  # masks a package's
    assert kernelhelpers.persistent_problems(files, tmp_path) == []
    planted = write(tmp_path / "etc/binfmt.d/way-in.conf", ":way-in:E::way::/root/way-in:C\n")
    changed = tmp_path / "usr/lib/binfmt.d/python3.11.conf"
    changed.write_text(":python3.11:M::\\xa7\\x0d\\x0d\\x0a::/root/way-in:C\n")
    assert kernelhelpers.persistent_problems(files, tmp_path) == [
        f"binfmt.d files not as a package installed them, registered at every boot: the kernel "
        f"runs their interpreters whenever a matching file is executed: {planted}, {changed} "
        "(remove them, or reinstall their package)"]


def test_a_settings_file_linked_into_a_directory_anyone_may_write_is_named(
        tmp_path: Path) -> None:
    """It reads as nothing today; after the next boot /tmp is anyone's, and systemd-sysctl
    reads it early."""
    files = stock(tmp_path)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    link = tmp_path / "etc/sysctl.d/99-later.conf"
    link.symlink_to(tmp / "later.conf")
    assert kernelhelpers.persistent_problems(files, tmp_path) == [
        "sysctl or binfmt.d files others than root could change before the next boot: "
        f"{link} is a link to {tmp}/later.conf, and {tmp} is writable by others than root "
        "(remove them)"]


@pytest.mark.usefixtures("returns_promptly")
def test_a_fifo_among_the_kernels_settings_is_named_not_waited_on(tmp_path: Path) -> None:
    """systemd-sysctl and systemd-binfmt would read whatever is written into one at boot."""
    files = stock(tmp_path)
    os.mkfifo(tmp_path / "etc/sysctl.d/99-fifo.conf")
    (tmp_path / "etc/binfmt.d").mkdir()
    os.mkfifo(tmp_path / "etc/binfmt.d/fifo.conf")
    directory = mount_binfmt_misc(tmp_path)
    os.mkfifo(directory / "fifo")
    (tmp_path / "proc/sys/kernel/modprobe").unlink()
    os.mkfifo(tmp_path / "proc/sys/kernel/modprobe")
    assert kernelhelpers.problems(files, tmp_path) == [
        f"cannot read {tmp_path}/proc/sys/kernel/modprobe (a FIFO, not a regular file), so "
        "what the kernel runs as root there is unknown (remove what hides it)",
        "binfmt_misc registrations whose interpreter the kernel runs whenever a matching file "
        "is executed (as root for root's programs, and with flag C for a setuid file): "
        f"fifo (a FIFO, not a regular file) (echo -1 > {directory}/NAME for each)",
        "sysctl files not as a package installed them set a program the kernel runs as root "
        "(kernel.modprobe at module requests, kernel.hotplug at device events, "
        f"kernel.core_pattern at crashes) at every boot: {tmp_path}/etc/sysctl.d/99-fifo.conf "
        "(a FIFO, not a regular file) (remove those lines, or the files)",
        f"binfmt.d files not as a package installed them, registered at every boot: the kernel "
        f"runs their interpreters whenever a matching file is executed: "
        f"{tmp_path}/etc/binfmt.d/fifo.conf (a FIFO) (remove them, or reinstall their package)"]


def test_a_mount_over_the_kernels_files_is_named(tmp_path: Path) -> None:
    """A file bound over /proc/sys/kernel/modprobe, or a tmpfs over binfmt_misc, shows
    whatever root put there: the kernel's own setting is hidden."""
    write(tmp_path / "proc/self/mountinfo", MOUNTINFO
          + "40 23 0:50 /fake /proc/sys/kernel/modprobe rw - tmpfs tmpfs rw\n"
          + "41 27 0:51 / /proc/sys/fs/binfmt_misc rw - tmpfs tmpfs rw\n"
          + "42 24 0:21 /sys/net /sys/kernel rw - proc proc rw\n")
    assert kernelhelpers.mount_problems(tmp_path) == [
        "mounts over the kernel's files that name the programs it runs as root hide them "
        "from these checks: /proc/sys/fs/binfmt_misc (tmpfs), /proc/sys/kernel/modprobe "
        "(tmpfs), /sys/kernel (proc) (umount them)"]


@pytest.mark.system_apt  # planted_for_later reads apt's configuration too
def test_preflight_and_status_name_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """planted_for_later (preflight's refusal, status's planted line) judges the kernel's
    helpers, here a stand-in root's beside what dpkg installed on this host."""
    stand_in = stock(tmp_path)
    uevent_helper = write(tmp_path / "sys/kernel/uevent_helper", "/root/way-in\n")
    judge = kernelhelpers.problems
    monkeypatch.setattr(kernelhelpers, "problems",
                        lambda files: judge({**files, **stand_in}, tmp_path))
    found = [line for line in preflight.planted_for_later([]) if str(tmp_path) in line]
    assert found == [f"{uevent_helper} is '/root/way-in', which the kernel runs as root at "
                     "every device event (a loop device at every boot) "
                     f"(echo > {uevent_helper})"]
