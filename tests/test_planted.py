"""Planted code: what root's programs would load later is found, what dpkg installed is not."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict

from statemesh import planted, preflight
from tests.fakebus import FakeBus, fakebus, package_units  # noqa: F401 - fixture


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_packaged_files_are_md5sums_and_conffiles(tmp_path: Path) -> None:
    info = tmp_path / "info"
    info.mkdir()
    (info / "python3-setuptools.md5sums").write_text(
        "0123456789abcdef0123456789abcdef  usr/lib/python3/dist-packages/distutils-precedence.pth\n")
    status = tmp_path / "status"
    status.write_text("Package: libc-bin\nStatus: install ok installed\nConffiles:\n"
                      " /etc/ld.so.conf.d/libc.conf d4d833fd095fb7b90e1bb4a547f16de6\n\n"
                      "Package: adduser\nStatus: install ok installed\n\n")
    assert planted.packaged_files(info, status) == {
        "/usr/lib/python3/dist-packages/distutils-precedence.pth":
            "0123456789abcdef0123456789abcdef",
        "/etc/ld.so.conf.d/libc.conf": "d4d833fd095fb7b90e1bb4a547f16de6"}


def test_a_preload_list_is_named_and_an_empty_one_is_not(tmp_path: Path) -> None:
    preload = tmp_path / "ld.so.preload"
    assert planted.preload_problems(preload) == []
    preload.write_text("# nothing\n\n")
    assert planted.preload_problems(preload) == []
    preload.write_text("/usr/lib/libhook.so  # keeps a way in\n")
    assert planted.preload_problems(preload) == [
        f"{preload} loads /usr/lib/libhook.so into every program, root's included "
        f"(remove {preload})"]


def test_the_managers_environment_may_not_make_services_load_other_code() -> None:
    found = planted.environment_problems(["LANG=C.UTF-8", "LD_PRELOAD=/tmp/x.so",
                                          "PYTHONPATH=/root/lib", "PATH=/usr/bin"])
    assert [line.split(",")[0] for line in found] == [
        "the service manager's environment sets LD_PRELOAD",
        "the service manager's environment sets PYTHONPATH"]
    assert "systemctl unset-environment PYTHONPATH" in found[1]


def library_setup(tmp_path: Path) -> Dict[str, str]:
    conf_d = tmp_path / "ld.so.conf.d"
    conf_d.mkdir()
    (conf_d / "libc.conf").write_text("/usr/local/lib\n")
    return {str(conf_d / "libc.conf"): md5(b"/usr/local/lib\n")}


def test_libraries_searched_before_the_systems_and_added_paths(tmp_path: Path) -> None:
    packaged = library_setup(tmp_path)
    conf_d, local = tmp_path / "ld.so.conf.d", tmp_path / "local-lib"
    local.mkdir()
    assert planted.library_problems(packaged, [str(local)], conf_d) == []
    (local / "libcrypto.so.3").write_bytes(b"\x7fELF")
    (conf_d / "zz-planted.conf").write_text("/opt/hook\n")
    (conf_d / "libc.conf").write_text("/opt/hook\n")  # a package's conffile, changed
    assert planted.library_problems(packaged, [str(local)], conf_d) == [
        f"shared libraries in {local}, searched before the system's: {local}/libcrypto.so.3 "
        "(remove them, then run ldconfig)",
        f"library search paths not from a package: {conf_d}/libc.conf, "
        f"{conf_d}/zz-planted.conf (remove them, then run ldconfig)"]


def test_python_hooks_and_local_modules(tmp_path: Path) -> None:
    dist = tmp_path / "usr/lib/python3/dist-packages"
    dist.mkdir(parents=True)
    (dist / "distutils-precedence.pth").write_text("import os\n")
    conffile = tmp_path / "etc/python3.11/sitecustomize.py"
    conffile.parent.mkdir(parents=True)
    conffile.write_text("# Debian's\n")
    stdlib = tmp_path / "usr/lib/python3.11"
    stdlib.mkdir(parents=True)
    (stdlib / "sitecustomize.py").symlink_to(conffile)
    local = tmp_path / "usr/local/lib/python3.11/dist-packages"
    local.mkdir(parents=True)
    packaged = {str(dist / "distutils-precedence.pth"): md5(b"import os\n"),
                str(conffile): md5(b"# Debian's\n")}
    hooks = (f"{tmp_path}/usr/lib/python3*/dist-packages/*.pth",
             f"{tmp_path}/usr/lib/python3*/sitecustomize.py")
    locals_ = (f"{tmp_path}/usr/local/lib/python3*/dist-packages",)
    assert planted.python_problems(packaged, locals_, hooks) == []  # as Debian installed them

    (local / "apt").mkdir()
    (dist / "zz-hook.pth").write_text("import os; os.system('/root/way-in')\n")
    conffile.write_text("import os; os.system('/root/way-in')\n")
    assert planted.python_problems(packaged, locals_, hooks) == [
        f"Python modules in {local} come before Debian's for root's Python programs: "
        f"{local}/apt (remove them)",
        "Python startup hooks not as a package installed them, run by every Python program: "
        f"{stdlib}/sitecustomize.py, {dist}/zz-hook.pth (remove them, or reinstall their "
        "package)"]


def test_preflight_refuses_a_loader_variable_in_the_managers_environment(
        tmp_path: Path, fakebus: FakeBus) -> None:
    fakebus.systemd.add("display-manager.service", exists=False)
    package_units(fakebus.systemd)
    fakebus.systemd.environment = ["LANG=C.UTF-8", "LD_PRELOAD=/usr/lib/libhook.so"]
    report = preflight.check(tmp_path / "none", tmp_path / "none", tmp_path / "none",
                             tmp_path / "none", holders=list,
                             planted_problems=planted.environment_problems)
    assert any(problem.startswith("the service manager's environment sets LD_PRELOAD")
               for problem in report.problems), report.problems
