"""dpkg's database as dpkg-query reads it: installed packages' files only, its updates
journal, conffile flags, /usr-merged spellings, and files that are not regular."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from statemesh import dpkgdb

STATUS = """Package: libc-bin
Status: install ok installed
Conffiles:
 /etc/ld.so.conf.d/libc.conf d4d833fd095fb7b90e1bb4a547f16de6
 /etc/old name.conf 0123456789abcdef0123456789abcdef obsolete

Package: gone
Status: deinstall ok config-files

Package: libfoo1
Status: install ok installed
Multi-Arch: same
Architecture: amd64
"""


def database(tmp_path: Path) -> Path:
    info = tmp_path / "info"
    info.mkdir()
    (tmp_path / "status").write_text(STATUS)
    (info / "libc-bin.md5sums").write_text("aa" * 16 + "  sbin/ldconfig\n")
    (info / "gone.md5sums").write_text("bb" * 16 + "  etc/cron.d/gone\n")
    (info / "planted.md5sums").write_text("cc" * 16 + "  etc/cron.d/way-in\n")
    (info / "libfoo1:amd64.md5sums").write_text("dd" * 16 + "  usr/lib/libfoo.so.1\n")
    return tmp_path


def test_only_packages_on_disk_vouch_for_files(tmp_path: Path) -> None:
    files = dpkgdb.installed_files(database(tmp_path))
    assert files == {"/sbin/ldconfig": "aa" * 16, "/usr/lib/libfoo.so.1": "dd" * 16,
                     "/etc/ld.so.conf.d/libc.conf": "d4d833fd095fb7b90e1bb4a547f16de6",
                     "/etc/old name.conf": "0123456789abcdef0123456789abcdef"}


def test_files_of_the_packages_asked_for_only(tmp_path: Path) -> None:
    """A check about one package's files reads only its records (Multi-Arch names too)."""
    root = database(tmp_path)
    assert dpkgdb.installed_files(root, only=("libfoo1",)) == {
        "/usr/lib/libfoo.so.1": "dd" * 16}
    assert dpkgdb.installed_files(root, only=("gone", "planted")) == {}


def test_the_updates_journal_is_read_after_the_status_file(tmp_path: Path) -> None:
    root = database(tmp_path)
    (root / "updates").mkdir()
    (root / "updates" / "0003").write_text("Package: gone\nStatus: install ok unpacked\n")
    (root / "updates" / "tmp.i").write_text("Package: gone\nStatus: purge ok not-installed\n")
    assert dpkgdb.state(dpkgdb.packages(root)["gone"]) == "unpacked"
    assert "/etc/cron.d/gone" in dpkgdb.installed_files(root)


def test_a_status_file_with_a_byte_that_is_not_utf8_is_read(tmp_path: Path) -> None:
    root = database(tmp_path)
    (root / "status").write_bytes(STATUS.encode() + b"Description: caf\xe9\n")
    assert dpkgdb.state(dpkgdb.packages(root)["libfoo1:amd64"]) == "installed"


def test_as_installed_follows_links(tmp_path: Path) -> None:
    shipped = tmp_path / "fstrim.timer"
    shipped.write_bytes(b"[Timer]\n")
    alias = tmp_path / "alias.timer"
    alias.symlink_to(shipped)
    files = {str(shipped): hashlib.md5(b"[Timer]\n").hexdigest()}
    assert dpkgdb.as_installed(str(alias), files)
    shipped.write_bytes(b"[Timer]\nchanged\n")
    assert not dpkgdb.as_installed(str(alias), files)


def test_a_usr_merged_path_is_looked_up_as_the_package_spelled_it() -> None:
    # Debian 12's packages list lib/systemd/...; on disk it is reached as /usr/lib/...
    spellings = dpkgdb._spellings("/etc/systemd/system/x.timer",
                                  "/usr/lib/systemd/system/fstrim.timer")
    assert "/lib/systemd/system/fstrim.timer" in spellings
    assert "/usr/lib/systemd/system/fstrim.timer" in dpkgdb._spellings(
        "/lib/systemd/system/fstrim.timer", "/lib/systemd/system/fstrim.timer")


def test_a_fifo_or_a_device_is_never_read(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert dpkgdb.md5_of(str(fifo)) == ""  # returns at once: no writer is waited for
    assert dpkgdb.md5_of("/dev/zero") == ""
    assert not dpkgdb.as_installed(str(fifo), {str(fifo): "d41d8cd98f00b204e9800998ecf8427e"})


@pytest.mark.usefixtures("returns_promptly")
def test_fifos_in_dpkgs_and_ucfs_databases_are_never_waited_on(tmp_path: Path) -> None:
    """Every file of the database is the operator's before installing: a FIFO there counts
    as unreadable (it vouches for nothing; a status file that cannot be read is an error).
    Each was waited on for ever."""
    (tmp_path / "dpkg").mkdir()
    root, ucf = database(tmp_path / "dpkg"), tmp_path / "ucf"
    (root / "updates").mkdir()
    os.mkfifo(root / "updates" / "0001")
    (root / "info" / "libc-bin.md5sums").unlink()
    os.mkfifo(root / "info" / "libc-bin.md5sums")
    os.mkfifo(root / "info" / "libc-bin.list")
    ucf.mkdir()
    os.mkfifo(ucf / "registry")
    (ucf / "hashfile").write_text("ee" * 16 + "  /etc/default/grub\n")
    assert "/sbin/ldconfig" not in dpkgdb.installed_files(root, ucf)
    assert "/etc/default/grub" not in dpkgdb.installed_files(root, ucf)
    assert dpkgdb._owners({"/sbin/ldconfig"}, root) == {}
    (root / "status").unlink()
    os.mkfifo(root / "status")
    with pytest.raises(OSError, match="status: a FIFO, not a regular file"):
        dpkgdb.packages(root)


def test_a_garbled_updates_file_hides_nothing_of_the_status_file(tmp_path: Path) -> None:
    root = database(tmp_path)
    (root / "updates").mkdir()
    (root / "updates" / "0001").write_text("Package: gone\nStatus install\n")
    assert dpkgdb.state(dpkgdb.packages(root)["libc-bin"]) == "installed"


@pytest.mark.system_apt
def test_a_status_file_dpkg_would_refuse_is_an_unreadable_database(tmp_path: Path) -> None:
    """apt's parser (as dpkg) refuses a line without a field name: the database is then
    unreadable, which vouches for no file and says dpkg's state is unknown."""
    root = database(tmp_path)
    (root / "status").write_text("Package: libc-bin\nStatus install\n")
    with pytest.raises(OSError, match="status"):
        dpkgdb.packages(root)
    assert dpkgdb.installed_files(root) == {}


def test_files_a_package_generated_through_ucf_are_vouched_for_as_generated(
        tmp_path: Path) -> None:
    """GRUB's /etc/default/grub is made by grub-pc's postinst through ucf: in no md5sums,
    nor a conffile; ucf keeps the md5 of what was generated, and which package it is of."""
    (tmp_path / "dpkg").mkdir()
    root, ucf = database(tmp_path / "dpkg"), tmp_path / "ucf"
    ucf.mkdir()
    (ucf / "registry").write_text("libc-bin \t /etc/default/grub\ngone \t /etc/gone.conf\n")
    (ucf / "hashfile").write_text("ee" * 16 + "  /etc/default/grub\n"
                                  + "ff" * 16 + "  /etc/gone.conf\n"
                                  + "99" * 16 + "  /etc/nobodys.conf\n")
    files = dpkgdb.installed_files(root, ucf)
    assert files["/etc/default/grub"] == "ee" * 16
    assert "/etc/gone.conf" not in files and "/etc/nobodys.conf" not in files
