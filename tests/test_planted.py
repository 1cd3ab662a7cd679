"""Planted code: what root's programs would load later is found, what dpkg installed is not."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from statemesh import planted, preflight
from tests.fakebus import FakeBus, fakebus, package_units  # noqa: F401 - fixture


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_a_preload_list_is_named_and_an_empty_one_is_not(tmp_path: Path) -> None:
    preload = tmp_path / "ld.so.preload"
    assert planted.preload_problems(preload) == []
    preload.write_text("# nothing\n\n")
    assert planted.preload_problems(preload) == []
    preload.write_text("/usr/lib/libhook.so  # keeps a way in\n")
    assert planted.preload_problems(preload) == [
        f"{preload} loads /usr/lib/libhook.so into every program, root's included "
        f"(remove {preload})"]


@pytest.mark.usefixtures("returns_promptly")
def test_a_preload_list_linked_into_a_directory_anyone_may_write_is_named(
        tmp_path: Path) -> None:
    """It reads as nothing today; after the next boot /tmp is anyone's."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(mode=0o1777)
    tmp.chmod(0o1777)
    preload = tmp_path / "ld.so.preload"
    preload.symlink_to(tmp / "x")
    assert planted.preload_problems(preload) == [
        f"{preload} is a link to {tmp}/x, and {tmp} is writable by others than root: every "
        f"program, root's included, would load what is written there (remove {preload})"]
    environment = tmp_path / "environment"
    environment.symlink_to(tmp / "y")
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("root=LABEL=x\n")
    assert planted.environment_file_problems((str(environment),), cmdline) == [
        f"{environment} is a link to {tmp}/y, and {tmp} is writable by others than root: the "
        f"programs started after it would load what is written there (remove {environment})"]


def test_a_fifo_as_the_preload_list_is_named_not_waited_on(tmp_path: Path) -> None:
    """The dynamic linker opens /etc/ld.so.preload at every program's start: a FIFO there
    holds each start, or hands it what a writer writes. It was waited on for ever."""
    preload = tmp_path / "ld.so.preload"
    os.mkfifo(preload)
    assert planted.preload_problems(preload) == [
        f"{preload} is a FIFO, not a regular file: every program's start would wait on it "
        f"or read whatever is written into it (remove {preload})"]


def test_the_managers_environment_may_not_make_services_load_other_code() -> None:
    found = planted.environment_problems(["LANG=C.UTF-8", "LD_PRELOAD=/tmp/x.so",
                                          "PYTHONPATH=/root/lib", "PATH=/usr/bin"])
    assert [line.split(",")[0] for line in found] == [
        "the service manager's environment sets LD_PRELOAD",
        "the service manager's environment sets PYTHONPATH"]
    assert "systemctl unset-environment PYTHONPATH" in found[1]


def test_the_managers_environment_may_not_point_the_node_at_another_bus() -> None:
    """The package's own variables (a stand-in bus for the tests, the libraries' choice)
    and the system bus's address would have the node's services talk to another systemd."""
    found = planted.environment_problems([
        "STATEMESH_DBUS_ADDRESS=unix:path=/tmp/yes-bus", "STATEMESH_DBUS_BACKEND=jeepney",
        "DBUS_SYSTEM_BUS_ADDRESS=unix:path=/tmp/yes-bus", "DBUS_SESSION_BUS_ADDRESS=x"])
    assert [line.split(",")[0].rsplit(" ", 1)[1] for line in found] == [
        "STATEMESH_DBUS_ADDRESS", "STATEMESH_DBUS_BACKEND", "DBUS_SYSTEM_BUS_ADDRESS"]


def test_variables_set_for_the_next_boot_or_for_crons_jobs(tmp_path: Path) -> None:
    environment = tmp_path / "environment"
    environment.write_text('PATH="/usr/local/sbin:/usr/bin"\n# LD_PRELOAD=/commented\n')
    system_conf = tmp_path / "system.conf"
    system_conf.write_text("[Manager]\n#DefaultEnvironment=\nLogLevel=info\n")
    pam_env = tmp_path / "pam_env.conf"
    pam_env.write_text("#PYTHONSTARTUP DEFAULT=/commented\nREMOTEHOST DEFAULT=localhost\n")
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("root=LABEL=x systemd.setenv=LANG=C\n")
    files = (str(environment), str(system_conf), str(pam_env))
    assert planted.environment_file_problems(files, cmdline) == []

    system_conf.write_text("[Manager]\nDefaultEnvironment=LD_PRELOAD=/x.so PYTHONPATH=/y\n")
    pam_env.write_text("BASH_ENV DEFAULT=/root/.way-in\n")
    cmdline.write_text("root=LABEL=x systemd.setenv=PERL5OPT=-M/root/x\n")
    assert planted.environment_file_problems(files, cmdline) == [
        f"{pam_env} sets BASH_ENV for the programs started after it (remove it there)",
        f"{system_conf} sets LD_PRELOAD, PYTHONPATH for the programs started after it "
        "(remove it there)",
        "the kernel command line sets PERL5OPT for every service (systemd.setenv=; remove it "
        "from the boot loader's configuration)"]


@pytest.mark.usefixtures("returns_promptly")
def test_a_fifo_or_a_device_as_an_environment_file_is_named(tmp_path: Path) -> None:
    """pam_env and systemd read these files as any other: a FIFO, or a link to a device,
    is named (it was waited on for ever, or read as an empty file)."""
    environment, system_conf = tmp_path / "environment", tmp_path / "system.conf"
    os.mkfifo(environment)
    os.symlink("/dev/null", system_conf)
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("root=LABEL=x\n")
    assert planted.environment_file_problems((str(environment), str(system_conf)),
                                             cmdline) == [
        f"{environment} is a FIFO, not a regular file: the programs started after it would "
        f"wait on it or read whatever is written into it (remove {environment})",
        f"{system_conf} is a character device, not a regular file: the programs started "
        f"after it would wait on it or read whatever is written into it (remove {system_conf})"]


def test_libraries_searched_before_the_systems_and_added_paths(tmp_path: Path) -> None:
    conf_d, local = tmp_path / "ld.so.conf.d", tmp_path / "local-lib"
    conf_d.mkdir()
    (local / "python3.11/dist-packages").mkdir(parents=True)
    (local / "python3.11/dist-packages/_speedups.cpython-311.so").write_bytes(b"\x7fELF")
    (conf_d / "libc.conf").write_text("/usr/local/lib\n")
    files = {str(conf_d / "libc.conf"): md5(b"/usr/local/lib\n")}
    confs = (f"{conf_d}/*.conf",)
    assert planted.library_problems(files, str(local), confs) == []  # Python's: its own line

    (local / "glibc-hwcaps/x86-64-v3").mkdir(parents=True)
    (local / "glibc-hwcaps/x86-64-v3/libcrypto.so.3").write_bytes(b"\x7fELF")
    (conf_d / "zz-planted.conf").write_text("/opt/hook\n")
    (conf_d / "libc.conf").write_text("/opt/hook\n")  # a package's conffile, changed
    assert planted.library_problems(files, str(local), confs) == [
        f"shared libraries in {local}, searched before the system's: "
        f"{local}/glibc-hwcaps/x86-64-v3/libcrypto.so.3 (remove them, then run ldconfig)",
        f"library search paths not as a package installed them: {conf_d}/libc.conf, "
        f"{conf_d}/zz-planted.conf (remove them, then run ldconfig)"]


def test_commands_that_shadow_the_systems_on_roots_path(tmp_path: Path) -> None:
    local, system = tmp_path / "local-sbin", tmp_path / "sbin"
    local.mkdir()
    system.mkdir()
    (system / "ldconfig").write_text("")
    (local / "statemesh-helper").write_text("")  # a name of its own shadows nothing
    assert planted.command_problems([str(local)], [str(system)]) == []
    (local / "ldconfig").write_text("#!/bin/sh\n/root/way-in\n")
    assert planted.command_problems([str(local)], [str(system)]) == [
        f"commands shadowing the system's on root's PATH: {local}/ldconfig (remove them)"]


def test_python_and_perl_hooks_and_local_modules(tmp_path: Path) -> None:
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
    (local / "empty-namespace").mkdir(parents=True)
    files = {str(dist / "distutils-precedence.pth"): md5(b"import os\n"),
             str(conffile): md5(b"# Debian's\n")}
    hooks = (f"{tmp_path}/usr/lib/python3*/dist-packages/*.pth",
             f"{tmp_path}/usr/lib/python3*/sitecustomize.py", f"{tmp_path}/usr/bin/pyvenv.cfg")
    locals_ = (f"{tmp_path}/usr/local/lib/python3*/dist-packages",)
    assert planted.module_problems(files, locals_, hooks) == []  # as Debian installed them

    (local / "apt").mkdir()
    (local / "apt/__init__.py").write_text("import os; os.system('/root/way-in')\n")
    (dist / "zz-hook.pth").write_text("import os; os.system('/root/way-in')\n")
    conffile.write_text("import os; os.system('/root/way-in')\n")
    (tmp_path / "usr/bin").mkdir()
    (tmp_path / "usr/bin/pyvenv.cfg").write_text("home = /root/python\n")
    assert planted.module_problems(files, locals_, hooks) == [
        f"modules in {local} come before Debian's for root's programs: "
        f"{local}/apt/__init__.py (remove them)",
        "interpreter startup hooks not as a package installed them, run by every Python or "
        f"Perl program: {tmp_path}/usr/bin/pyvenv.cfg, {stdlib}/sitecustomize.py, "
        f"{dist}/zz-hook.pth (remove them, or reinstall their package)"]


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
