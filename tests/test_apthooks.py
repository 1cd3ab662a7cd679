"""Commands planted in apt's and dpkg's configuration (statemesh.apthooks), on files in a
temporary directory read with apt's own parser."""

from __future__ import annotations

import hashlib
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
    return tmp_path


def installed(path: Path) -> Dict[str, str]:
    """dpkg's record of `path` as it is now (a package installed it so)."""
    return {str(path): hashlib.md5(path.read_bytes()).hexdigest()}


def test_every_spelling_of_an_apt_hook_is_found(etc: Path) -> None:
    parts = etc / "apt/apt.conf.d"
    (parts / "99way-back").write_text('DPkg::Post-Invoke {"/root/way-in";};\n')
    (parts / "98nested").write_text('apt { update { pre-invoke { "/root/way-in"; }; }; };\n')
    (parts / "97options").write_text('DPkg::Options:: "--post-invoke=/root/way-in";\n')
    (parts / "96proxy").write_text('Acquire::http::Proxy-Auto-Detect "/root/way-in";\n')
    (parts / "95bin").write_text('Dir::Bin::dpkg "/root/dpkg";\n')
    (etc / "apt/apt.conf").write_text('DPkg::Pre-Install-Pkgs {"/root/way-in";};\n')
    found = apthooks.problems({})
    assert len(found) == 6, found
    assert any("99way-back runs commands" in f and "DPkg::Post-Invoke" in f for f in found)
    assert any("98nested" in f and "apt::update::pre-invoke" in f for f in found)
    assert any("97options" in f and "DPkg::Options" in f for f in found)
    assert any("96proxy" in f and "Proxy-Auto-Detect" in f for f in found)
    assert any("95bin" in f and "Dir::Bin::dpkg" in f for f in found)
    assert any("apt.conf runs" in f and "Pre-Install-Pkgs" in f for f in found)
    assert all("(remove the file or those settings)" in f for f in found)


def test_a_packaged_hook_plain_settings_and_files_apt_skips_are_no_finding(etc: Path) -> None:
    parts = etc / "apt/apt.conf.d"
    packaged = parts / "20listchanges"
    packaged.write_text('DPkg::Pre-Install-Pkgs { "/usr/bin/apt-listchanges --apt"; };\n')
    (parts / "01proxy").write_text('Acquire::http::Proxy "http://proxy:3128";\n'
                                   'DPkg::Options { "--force-confold"; };\n')
    (parts / "99way-back.dpkg-old").write_text('DPkg::Post-Invoke {"/root/way-in";};\n')
    (parts / "way back").write_text('DPkg::Post-Invoke {"/root/way-in";};\n')
    assert apthooks.problems(installed(packaged)) == []
    packaged.write_text('DPkg::Pre-Install-Pkgs { "/root/way-in"; };\n')  # changed since
    assert [f.split(" runs")[0] for f in apthooks.problems(installed(parts / "01proxy"))] == [
        f"apt configuration {packaged}"]


def test_dpkg_options_that_run_commands_are_found(etc: Path) -> None:
    parts = etc / "dpkg/dpkg.cfg.d"
    (parts / "way-back").write_text("# comment\npost-invoke=/root/way-in\nstatus-logger /root/l\n")
    (parts / "excludes").write_text("path-exclude=/usr/share/doc/*\nforce-unsafe-io\n")
    (parts / "ignored.cfg").write_text("pre-invoke=/root/way-in\n")  # dpkg skips dotted names
    (etc / "dpkg/dpkg.cfg").write_text("--pre-invoke=/root/way-in\n")
    assert apthooks.problems({}) == [
        f"dpkg configuration {etc}/dpkg/dpkg.cfg runs commands as root at every dpkg run and "
        "no package installed it so: pre-invoke (remove the file or those options)",
        f"dpkg configuration {etc}/dpkg/dpkg.cfg.d/way-back runs commands as root at every dpkg "
        "run and no package installed it so: post-invoke, status-logger (remove the file or "
        "those options)"]


def test_a_file_apt_cannot_parse_is_named(etc: Path) -> None:
    (etc / "apt/apt.conf.d/50broken").write_text('DPkg::Post-Invoke "/root/way-in"\n')
    (finding,) = apthooks.problems({})
    assert finding.startswith(f"apt configuration {etc}/apt/apt.conf.d/50broken cannot be read "
                              "as apt reads it")
