"""The kernel's command line: arguments that run something as root at boot, or keep the
node's units from running, are named in this boot's and in what GRUB's settings give the
next one (read without a shell)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from statemesh import bootargs

DEBIAN_CLOUD = ("BOOT_IMAGE=/boot/vmlinuz-6.1.0-28-cloud-amd64 root=PARTUUID=abc ro "
                "console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200 consoleblank=0")


@pytest.mark.parametrize("arguments", [
    DEBIAN_CLOUD,
    "root=LABEL=smroot rw console=ttyS0,115200 systemd.show_status=1 quiet splash",
    "root=/dev/vda1 systemd.unit=multi-user.target systemd.debug_shell=0 "
    "systemd.crash_shell=false",
    "root=/dev/sda1 init=/lib/systemd/systemd rd.shell=0 rd.emergency=reboot "
    "systemd.unit=runlevel3.target",
])
def test_ordinary_command_lines_are_not_named(arguments: str) -> None:
    assert bootargs.refused(arguments) == []


@pytest.mark.parametrize("argument", [
    "init=/bin/sh", "rdinit=/bin/sh", 'systemd.run="/bin/sh -c true"',
    "systemd.run_success_action=none", "systemd.setenv=LD_PRELOAD=/root/x.so",
    "systemd.mask=statemesh-harden.service", "systemd.wants=way-in.service",
    "systemd.unit=rescue.target", "rd.systemd.unit=emergency.target", "systemd.debug_shell",
    "systemd.debug_shell=1", "systemd.crash_shell", "single", "1", "S", "emergency",
    "rd.break", "rd.break=pre-mount", "systemd.ssh_listen=0.0.0.0:2222",
    "systemd.crash-shell=1", "systemd.ssh-listen=0.0.0.0:2222", '"init=/root/x y"',
    "break=premount", "rd.shell", "systemd.set_credential=tmpfiles.extra:f",
    "LD_PRELOAD=/root/x.so", "sysctl.kernel.modprobe=/root/x", "sysctl.kernel/core_pattern=|/x",
    "sysctl.kernel.hotplug=/root/x", "sysctl.kernel/hotplug=/root/x",
    "sysctl/kernel/hotplug=/root/x", "sysctl.kernel.poweroff_cmd=/root/x",
])
def test_each_way_in_at_boot_is_named(argument: str) -> None:
    """Named as read: a double-quoted argument, blanks included, is one (the kernel's and
    systemd's reading), without its quotes."""
    assert bootargs.refused(f"{DEBIAN_CLOUD} {argument}") == [argument.replace('"', "")]


def test_what_follows_a_double_dash_is_pid_1s_own_command_line() -> None:
    assert bootargs.refused(f"{DEBIAN_CLOUD} -- --unit=rescue.target") == [
        "--", "--unit=rescue.target"]
    assert bootargs.refused("BOOT_IMAGE=/vmlinuz root=/dev/sda1 TERM=linux") == []


def test_grub_settings_are_read_in_update_grubs_order_and_named(tmp_path: Path) -> None:
    defaults = tmp_path / "grub"
    defaults.write_text('GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\n'
                        'GRUB_CMDLINE_LINUX=""\n'
                        "GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`\n")
    drop_ins = tmp_path / "grub.d"
    drop_ins.mkdir()
    (drop_ins / "50-console.cfg").write_text(
        'GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT console=ttyS0,115200"\n')
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(DEBIAN_CLOUD + "\n")
    files = bootargs.grub_files(defaults, drop_ins)
    assert bootargs.problems(cmdline, files) == []
    # A variable of its own, expanded into the command line by a later file.
    (drop_ins / "60-way-in.cfg").write_text(
        "GRUB_WAY_IN='systemd.run=/root/way-in'\n"
        'GRUB_CMDLINE_LINUX="${GRUB_WAY_IN} init=/bin/bash" # a comment\n')
    cmdline.write_text(DEBIAN_CLOUD + " systemd.setenv=X=1\n")
    found = bootargs.problems(cmdline, bootargs.grub_files(defaults, drop_ins))
    assert found[0].startswith("this boot's kernel command line has systemd.setenv=X=1, ")
    assert found[1].startswith("GRUB's settings put systemd.run=/root/way-in init=/bin/bash "
                               "on the kernel command line of every boot"), found
    # Overridden by a later file: the last value counts, as in the shell.
    (drop_ins / "70-undo.cfg").write_text('GRUB_CMDLINE_LINUX=""\n')
    assert len(bootargs.problems(cmdline, bootargs.grub_files(defaults, drop_ins))) == 1


def test_grub_custom_cfg_with_commands_is_named(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(DEBIAN_CLOUD + "\n")
    custom = tmp_path / "custom.cfg"
    assert bootargs.problems(cmdline, [tmp_path / "grub"], custom) == []
    custom.write_text("# nothing but comments\n\n")
    assert bootargs.problems(cmdline, [tmp_path / "grub"], custom) == []
    custom.write_text("menuentry 'x' --unrestricted {\n linux /vmlinuz init=/bin/sh\n}\n")
    assert bootargs.problems(cmdline, [tmp_path / "grub"], custom) == [
        f"{custom} holds commands, which GRUB runs at every boot past what update-grub "
        "writes (menu entries with a kernel command line of root's choosing): remove it"]


def test_quoting_hides_no_argument() -> None:
    """sh (GRUB's settings), GRUB (a Linux line) and systemd (its own arguments) take the
    quotes off: each of these is init=/bin/sh or systemd.run=/root/x when it is read."""
    for quoted in ("'systemd.run=/root/x'", 'i"n"it=/bin/sh', "init\\=/bin/sh",
                   "'init'=/bin/sh"):
        assert bootargs.refused(f"{DEBIAN_CLOUD} {quoted}") in (
            [["systemd.run=/root/x"], ["init=/bin/sh"]]), quoted
    assert bootargs.refused("quiet 'init=/bin/sh") == ["init=/bin/sh"]  # unbalanced


@pytest.mark.parametrize("settings, named", [
    # GRUB expands $x on a Linux line from its environment block (grub-editenv set
    # x=init=/bin/sh); Ubuntu's own $vt_handoff is no setting's.
    ("GRUB_CMDLINE_LINUX_DEFAULT='quiet $way_in'\nGRUB_CMDLINE_LINUX=\"\\$vt_handoff\"\n",
     "$way_in"),
    # 10_linux writes root=$GRUB_DEVICE when told not to use the UUID.
    ('GRUB_DISABLE_LINUX_UUID=true\nGRUB_DEVICE="/dev/sda1 init=/bin/sh"\n', "init=/bin/sh"),
])
def test_what_grub_settings_put_on_the_line_besides_the_cmdline_is_named(
        tmp_path: Path, settings: str, named: str) -> None:
    defaults = tmp_path / "grub"
    defaults.write_text(settings)
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(DEBIAN_CLOUD + "\n")
    [found] = bootargs.problems(cmdline, [defaults], tmp_path / "custom.cfg")
    assert found.startswith(f"GRUB's settings put {named} on the kernel command line"), found


def test_a_custom_cfg_that_cannot_be_read_counts_as_holding_commands(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(DEBIAN_CLOUD + "\n")
    custom = tmp_path / "custom.cfg"
    custom.symlink_to(custom)  # a loop: ELOOP
    assert len(bootargs.problems(cmdline, [tmp_path / "grub"], custom)) == 1


@pytest.mark.usefixtures("returns_promptly")
def test_fifos_as_grubs_files_are_never_waited_on(tmp_path: Path) -> None:
    """custom.cfg as a FIFO is named as unreadable; a settings file as a FIFO is passed over
    here (statemesh.jobs names it among the hooks). Both were waited on for ever."""
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(DEBIAN_CLOUD + "\n")
    custom = tmp_path / "custom.cfg"
    os.mkfifo(tmp_path / "grub")
    os.mkfifo(custom)
    assert bootargs.problems(cmdline, [tmp_path / "grub"], custom) == [
        f"{custom} cannot be read (a FIFO, not a regular file), so may hold commands, which "
        "GRUB runs at every boot past what update-grub writes (menu entries with a kernel "
        "command line of root's choosing): remove it"]
