"""Commands planted in apt's and dpkg's configuration (statemesh.apthooks), on files in a
temporary directory read with apt's own parser."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict

import pytest

from statemesh import apthooks

pytestmark = pytest.mark.system_apt


@pytest.fixture
def etc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An /etc with apt.conf.d and dpkg.cfg.d where the module looks."""
    (tmp_path / "apt/apt.conf.d").mkdir(parents=True)
    (tmp_path / "dpkg/dpkg.cfg.d").mkdir(parents=True)
    monkeypatch.setattr(apthooks, "APT_FILES", (f"{tmp_path}/apt/apt.conf",
                                                f"{tmp_path}/apt/apt.conf.d/*"))
    monkeypatch.setattr(apthooks, "DPKG_FILES", (f"{tmp_path}/dpkg/dpkg.cfg",
                                                 f"{tmp_path}/dpkg/dpkg.cfg.d/*"))
    monkeypatch.setattr(apthooks, "CONFIG_DIRS", tuple(
        str(tmp_path / d) for d in ("apt", "apt/apt.conf.d", "dpkg", "dpkg/dpkg.cfg.d")))
    return tmp_path


def installed(path: Path) -> Dict[str, str]:
    """dpkg's record of `path` as it is now (a package installed it so)."""
    return {str(path): hashlib.md5(path.read_bytes()).hexdigest()}


SPELLINGS = {
    "99way-back": ('DPkg::Post-Invoke {"/root/way-in";};', "DPkg::Post-Invoke"),
    "98nested": ('apt { update { pre-invoke { "/root/way-in"; }; }; };',
                 "apt::update::pre-invoke"),
    "97options": ('DPkg::Options:: "--post-invoke=/root/way-in";', "DPkg::Options"),
    "96proxy": ('Acquire::http::Proxy-Auto-Detect "/root/way-in";',
                "Acquire::http::Proxy-Auto-Detect"),
    "95bin": ('Dir::Bin::dpkg "/root/dpkg";', "Dir::Bin::dpkg"),
    "94scoped": ('Binary::apt-get::Dir::Bin::dpkg "/root/dpkg";',
                 "Binary::apt-get::Dir::Bin::dpkg"),
    "93stats": ('APT::Update::Post-Invoke-Stats {"/root/way-in";};',
                "APT::Update::Post-Invoke-Stats"),
    "92planner": ('APT::Planner "/root/planner";', "APT::Planner"),
    "91daily": ('Dir::Cache::Backup "/x;touch /root/pwned;#";', "Dir::Cache::Backup"),
    "90root": ('RootDir "/root/fake/";', "RootDir"),
    "89path": ('DPkg::Path "/root/bin:/usr/bin";', "DPkg::Path"),
    "88admindir": ('DPkg::Options {"--admindir=/root/db";};', "DPkg::Options"),
    "87way:back": ('DPkg::Pre-Invoke {"/root/way-in";};', "DPkg::Pre-Invoke"),
}


def test_every_spelling_of_an_apt_hook_is_found(etc: Path) -> None:
    parts = etc / "apt/apt.conf.d"
    for name, (text, _key) in SPELLINGS.items():
        (parts / name).write_text(text + "\n")
    (etc / "apt/apt.conf").write_text('DPkg::Pre-Install-Pkgs {"/root/way-in";};\n')
    found = apthooks.problems({})
    assert len(found) == len(SPELLINGS) + 1, found
    for name, (_text, key) in SPELLINGS.items():
        line = next(f for f in found if f"/apt.conf.d/{name} runs commands" in f)
        assert f"so: {key} (remove the file or those settings)" in line, line
    assert any("apt.conf runs" in f and "Pre-Install-Pkgs" in f for f in found)


def test_a_packaged_hook_plain_settings_and_files_apt_skips_are_no_finding(etc: Path) -> None:
    parts = etc / "apt/apt.conf.d"
    packaged = parts / "20listchanges"
    packaged.write_text('DPkg::Pre-Install-Pkgs { "/usr/bin/apt-listchanges --apt"; };\n')
    (parts / "01proxy").write_text('Acquire::http::Proxy "http://proxy:3128";\n'
                                   'DPkg::Options { "--force-confold"; };\n'
                                   'APT::Periodic::Unattended-Upgrade "1";\n'
                                   'Dir::Cache::pkgcache "";\n')
    for skipped in ("99way-back.dpkg-old", "way back", "99way-back.txt", "99way-back."):
        (parts / skipped).write_text('DPkg::Post-Invoke {"/root/way-in";};\n')
    assert apthooks.problems(installed(packaged)) == []
    packaged.write_text('DPkg::Pre-Install-Pkgs { "/root/way-in"; };\n')  # changed since
    assert [f.split(" runs")[0] for f in apthooks.problems(installed(parts / "01proxy"))] == [
        f"apt configuration {packaged}"]


def test_dpkg_options_that_run_commands_are_found_as_dpkg_reads_them(etc: Path) -> None:
    parts = etc / "dpkg/dpkg.cfg.d"
    (parts / "way-back").write_text("# comment\npost-invoke:/root/way-in\nstatus-logger /root/l\n")
    (parts / "excludes").write_text("path-exclude=/usr/share/doc/*\nforce-unsafe-io\n")
    (parts / "ignored.cfg").write_text("pre-invoke=/root/way-in\n")  # dpkg skips dotted names
    # Past dpkg's 1023-byte line buffer, the rest of a line is read as a line of its own.
    (parts / "long").write_text("path-exclude=/" + "x" * 1009 + "admindir=/root/db\n")
    (etc / "dpkg/dpkg.cfg").write_text("--pre-invoke=/root/way-in\n")
    found = apthooks.problems({})
    assert found == [
        f"dpkg configuration {etc}/dpkg/dpkg.cfg runs commands as root at every dpkg run and "
        "no package installed it so: pre-invoke (remove the file or those options)",
        f"dpkg configuration {etc}/dpkg/dpkg.cfg.d/long runs commands as root at every dpkg "
        "run and no package installed it so: admindir (remove the file or those options)",
        f"dpkg configuration {etc}/dpkg/dpkg.cfg.d/way-back runs commands as root at every dpkg "
        "run and no package installed it so: post-invoke, status-logger (remove the file or "
        "those options)"]


def test_what_others_could_change_later_is_named(etc: Path) -> None:
    parts = etc / "apt/apt.conf.d"
    harmless = parts / "10harmless"
    harmless.write_text('APT::Install-Recommends "false";\n')
    harmless.chmod(0o666)
    (parts / "20later").symlink_to(etc / "not-there-yet.conf")
    (parts / "30include").write_text('#include "/tmp/elsewhere/";\n')
    (etc / "dpkg/dpkg.cfg.d").chmod(0o777)
    found = apthooks.problems(installed(harmless))
    assert found == [
        f"apt or dpkg configuration: {etc}/dpkg/dpkg.cfg.d is writable by others than root "
        "(make it root's, not group- or world-writable)",
        f"apt or dpkg configuration: {harmless} is writable by others than root (make it "
        "root's, not group- or world-writable, or remove it)",
        f"apt or dpkg configuration: {parts}/20later is a link to {etc}/not-there-yet.conf, "
        "which does not exist yet (make it root's, not group- or world-writable, or remove it)",
        f"apt configuration {parts}/30include includes other files (#include) and no package "
        "installed it so (remove the file or the #include)"]
    assert os.stat(harmless).st_uid == 0  # as root runs the tests


def test_a_part_linked_to_a_directory_in_a_place_anyone_may_write_is_named(etc: Path) -> None:
    """apt skips what is no regular file: a link to a directory reads as nothing today,
    and a file may take the directory's place after the next boot."""
    tmp = etc / "tmp"
    (tmp / "dir").mkdir(parents=True)
    tmp.chmod(0o1777)
    (etc / "apt/apt.conf.d/40later").symlink_to(tmp / "dir")
    assert apthooks.problems({}) == [
        f"apt or dpkg configuration: {etc}/apt/apt.conf.d/40later is a link to {tmp}/dir, and "
        f"{tmp} is writable by others than root (make it root's, not group- or "
        "world-writable, or remove it)"]


def test_a_file_apt_cannot_parse_is_named(etc: Path) -> None:
    (etc / "apt/apt.conf.d/50broken").write_text('DPkg::Post-Invoke "/root/way-in"\n')
    (finding,) = apthooks.problems({})
    assert finding.startswith(f"apt configuration {etc}/apt/apt.conf.d/50broken cannot be read "
                              "as apt reads it")


@pytest.mark.usefixtures("returns_promptly")
def test_a_fifo_dpkg_would_read_is_named_and_one_apt_skips_is_not_waited_on(
        etc: Path) -> None:
    """dpkg opens every name of dpkg.cfg.d it takes, a FIFO too, and reads whatever is
    written into it: named (it was passed over). apt skips what is no regular file, so a
    FIFO in apt.conf.d is no finding; were one swapped in after apt's listing, it is named
    as unreadable. Nothing waited on either (the read of each waited for ever)."""
    os.mkfifo(etc / "dpkg/dpkg.cfg.d/way-back")
    os.mkfifo(etc / "apt/apt.conf.d/99way-back")
    assert apthooks.problems({}) == [
        f"dpkg configuration {etc}/dpkg/dpkg.cfg.d/way-back is a FIFO, not a regular file: "
        "dpkg would wait on it or read whatever is written into it (remove it)"]
    assert apthooks._apt_finding(f"{etc}/apt/apt.conf.d/99way-back") == (
        f"apt configuration {etc}/apt/apt.conf.d/99way-back cannot be read as apt reads it "
        "(a FIFO, not a regular file); fix or remove it")
