"""replaceable: a file of root's configuration that someone else could change later."""

from __future__ import annotations

import os
from pathlib import Path

from statemesh import replaceable


def anyones(directory: Path) -> Path:
    """A directory like /tmp: anyone may add a name to it (sticky), and it is emptied at boot."""
    directory.mkdir()
    directory.chmod(0o1777)
    return directory


def test_a_link_into_a_directory_anyone_may_write_is_named_whether_or_not_its_file_exists(
        tmp_path: Path) -> None:
    etc, tmp = tmp_path / "etc", anyones(tmp_path / "tmp")
    etc.mkdir()
    (etc / "later").symlink_to(tmp / "not-yet")
    (tmp / "now").write_text("")
    (etc / "now").symlink_to(tmp / "now")
    for name in ("later", "now"):
        assert replaceable.by_others(str(etc / name)) == (
            f"{etc}/{name} is a link to {tmp}/{name if name == 'now' else 'not-yet'}, "
            f"and {tmp} is writable by others than root")


def test_a_link_within_roots_directories_is_judged_by_its_file(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    (etc / "lib").mkdir(parents=True)
    (etc / "lib/list").write_text("")
    (etc / "list").symlink_to("lib/list")
    assert replaceable.by_others(str(etc / "list")) is None
    (etc / "lib/list").chmod(0o666)
    assert replaceable.by_others(str(etc / "list")) == f"{etc}/lib/list is writable by others than root"
    (etc / "dangling").symlink_to(etc / "lib/nothing")
    assert replaceable.by_others(str(etc / "dangling")) == (
        f"{etc}/dangling is a link to {etc}/lib/nothing, which does not exist yet")


def test_a_link_through_another_link_or_out_of_a_missing_directory_is_named(
        tmp_path: Path) -> None:
    etc, tmp = tmp_path / "etc", anyones(tmp_path / "tmp")
    etc.mkdir()
    (etc / "hop").symlink_to(tmp)
    (etc / "via").symlink_to(etc / "hop/x")
    (etc / "dots").symlink_to(f"{tmp}/made-later/../../etc/x")
    for name, target in (("via", f"{etc}/hop/x"), ("dots", f"{tmp}/made-later/../../etc/x")):
        assert replaceable.by_others(str(etc / name)) == (
            f"{etc}/{name} is a link to {target}, through another link or a '..'")


def test_plain_files_devices_and_nothing(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    assert replaceable.by_others(str(plain)) is None
    os.chown(plain, 1000, 1000)
    assert replaceable.by_others(str(plain)) == f"{plain} is writable by others than root"
    (tmp_path / "null").symlink_to("/dev/null")  # what it is, its reader names
    assert replaceable.by_others(str(tmp_path / "null")) is None
    assert replaceable.by_others(str(tmp_path / "nothing")) is None


def test_a_program_a_kernel_setting_names_is_judged_on_its_whole_way(tmp_path: Path) -> None:
    """The kernel runs what the path names when it runs it: every directory on the way
    counts, not only the file (below `top`, the stand-in root here)."""
    top = str(tmp_path)
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/kmod").write_text("")
    (tmp_path / "sbin").mkdir()
    (tmp_path / "sbin/modprobe").symlink_to("../usr/bin/kmod")
    assert replaceable.program_by_others(f"{top}/sbin/modprobe", top) is None
    assert replaceable.by_others(f"{top}/usr/bin/kmod") is None
    anyones(tmp_path / "tmp")
    (tmp_path / "tmp/kmod").write_text("")
    (tmp_path / "hop").symlink_to("usr/bin")
    for program, why in ((f"{top}/tmp/kmod", f"{top}/tmp is writable by others than root"),
                         (f"{top}/hop/kmod", f"{top}/hop/kmod is reached through a link"),
                         (f"{top}/tmp/../usr/bin/kmod",
                          f"'{top}/tmp/../usr/bin/kmod' is not a plain absolute path"),
                         ("kmod", "'kmod' is not a plain absolute path")):
        assert replaceable.by_others(program) is None  # the file alone is root's
        assert replaceable.program_by_others(program, top) == why
