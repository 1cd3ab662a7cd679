"""ufw's boot-time files (statemesh.ufwfiles), in a stand-in layout of ufw's: an init script
ufw.service would run or a rules file it would load is named unless it is as ufw's package
wrote it, with a template as the package installed it."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Dict, List

import pytest

from statemesh import ufwfiles

INIT = b"#!/bin/sh\n# ufw's template: does nothing\nset -e\ncase \"$1\" in\n*) ;;\nesac\n"
RULES = b"*filter\n:ufw-before-input - [0:0]\n-A ufw-before-input -i lo -j ACCEPT\nCOMMIT\n"
ACCEPT_22 = b"-A ufw-before-input -p tcp --dport 22 -j ACCEPT\n"
# As Debian's ufw ships them (ufw.conf as `ufw enable` leaves it).
DEFAULTS = (b'# /etc/default/ufw\n#\n\nIPV6=yes\nDEFAULT_INPUT_POLICY="DROP"\n'
            b'DEFAULT_OUTPUT_POLICY="ACCEPT"\nDEFAULT_FORWARD_POLICY="DROP"\n'
            b'DEFAULT_APPLICATION_POLICY="SKIP"\nMANAGE_BUILTINS=no\nIPT_SYSCTL=/etc/ufw/sysctl.conf\n'
            b'IPT_MODULES=""\n')
UFW_CONF = b"# /etc/ufw/ufw.conf\n#\n\n# Set to yes to start on boot.\nENABLED=yes\n\nLOGLEVEL=low\n"


class Ufw:
    """ufw as its postinst leaves it: templates of its package, copies in etc, mode 640."""

    def __init__(self, tmp_path: Path):
        self.places = ufwfiles.Places(init=str(tmp_path / "lib/ufw-init"),
                                      etc=str(tmp_path / "etc-ufw"),
                                      defaults=str(tmp_path / "default-ufw"),
                                      templates=str(tmp_path / "share-ufw"))
        self.etc = Path(self.places.etc)
        templates = Path(self.places.templates)
        (templates / "iptables").mkdir(parents=True)
        self.etc.mkdir()
        Path(self.places.init).parent.mkdir()
        Path(self.places.init).write_text("#!/bin/sh\n")
        Path(self.places.defaults).write_bytes(DEFAULTS)
        (self.etc / "ufw.conf").write_bytes(UFW_CONF)
        self.files: Dict[str, str] = {}
        for name in ufwfiles.INIT_SCRIPTS:
            self._install(Path(self.places.script_template(name)), INIT, name)
        for name in ufwfiles.RULES_FILES:
            self._install(Path(self.places.rules_template(name)), RULES + name.encode(), name)

    def _install(self, template: Path, content: bytes, name: str) -> None:
        template.write_bytes(content)
        self.files[str(template)] = hashlib.md5(content).hexdigest()
        (self.etc / name).write_bytes(content)
        (self.etc / name).chmod(0o640)

    def problems(self) -> List[str]:
        return ufwfiles.problems(self.files, self.places)


@pytest.fixture
def ufw(tmp_path: Path) -> Ufw:
    return Ufw(tmp_path)


def runs(path: Path, what: str, fix: str) -> str:
    """The finding for an init script: what is wrong with it, and the command that fixes it."""
    return (f"{path} {what}: ufw.service runs it as root at every boot while it is executable "
            f"({fix} {path})")


def loads(ufw: Ufw, name: str, what: str, fix: str = "") -> str:
    """The finding for a rules file: what is wrong with it, and what to do before copying
    its template back."""
    path, template = ufw.etc / name, ufw.places.rules_template(name)
    return (f"{path} {what}: ufw.service loads it into the kernel at every boot "
            f"({fix}cp {template} {path})")


def test_ufws_files_as_its_package_wrote_them_pass(ufw: Ufw) -> None:
    assert ufw.problems() == []
    assert ufwfiles.rules_problems(ufw.files, ufw.places) == {}


def test_an_executable_init_script_is_named_unless_it_is_its_template(ufw: Ufw) -> None:
    """root's `test -x` is true for any execute bit: a group's is enough for ufw-init."""
    before = ufw.etc / "before.init"
    before.chmod(0o750)
    assert ufw.problems() == []  # the template's bytes: they do nothing
    before.write_bytes(INIT + b"/root/way-in &\n")
    before.chmod(0o610)
    template = ufw.places.script_template("before.init")
    assert ufw.problems() == [
        runs(before, f"is executable and differs from the ufw package's {template}", "chmod -x")]


def test_an_init_script_that_is_not_executable_is_never_run(ufw: Ufw) -> None:
    (ufw.etc / "after.init").write_bytes(b"#!/bin/sh\n/root/way-in &\n")
    (ufw.etc / "before.init").unlink()
    assert ufw.problems() == []


def test_a_template_not_as_its_package_installed_it_vouches_for_nothing(ufw: Ufw) -> None:
    """root could have edited the template and its copy alike."""
    planted = INIT + b"/root/way-in &\n"
    for name in ("after.init", "after.rules"):
        template = Path(ufw.places.script_template(name) if name.endswith(".init")
                        else ufw.places.rules_template(name))
        template.write_bytes(planted)
        (ufw.etc / name).write_bytes(planted)
    (ufw.etc / "after.init").chmod(0o700)
    share = ufw.places.templates
    assert ufw.problems() == [
        runs(ufw.etc / "after.init", f"is executable and cannot be compared with "
             f"{share}/after.init, which is not as the ufw package installed it", "chmod -x"),
        loads(ufw, "after.rules", f"cannot be compared with {share}/iptables/after.rules, "
              "which is not as the ufw package installed it",
              "apt-get install --reinstall ufw, then ")]


def test_an_accept_added_to_a_rules_file_is_named(ufw: Ufw) -> None:
    """The firewall check reads INPUT and ufw's user chain: this port would be open behind
    its back."""
    before = ufw.etc / "before.rules"
    before.write_bytes(before.read_bytes().replace(b"COMMIT\n", ACCEPT_22 + b"COMMIT\n"))
    template = ufw.places.rules_template("before.rules")
    line = (f"{before} differs from the ufw package's {template}: ufw.service loads it into "
            f"the kernel at every boot (cp {template} {before})")
    assert ufw.problems() == [line]
    assert ufwfiles.rules_problems(ufw.files, ufw.places) == {str(before): line}


def test_a_missing_rules_file_is_named(ufw: Ufw) -> None:
    (ufw.etc / "after6.rules").unlink()
    template = ufw.places.rules_template("after6.rules")
    assert ufw.problems() == [
        f"{ufw.etc}/after6.rules is missing: ufw.service loads it into the kernel at every "
        f"boot, and ufw refuses to run without it (cp {template} {ufw.etc}/after6.rules)"]


def anyones(directory: Path) -> Path:
    """A directory like /tmp: anyone may add a name to it, and it is emptied at boot."""
    directory.mkdir()
    directory.chmod(0o1777)
    return directory


def test_a_file_linked_into_a_directory_anyone_may_write_is_named(ufw: Ufw,
                                                                  tmp_path: Path) -> None:
    """A link to /tmp/x reads as nothing today (a missing init script is never run), or as
    the template's bytes; after the next boot /tmp/x is anyone's to write."""
    tmp = anyones(tmp_path / "tmp")
    (ufw.etc / "before.init").unlink()
    (ufw.etc / "before.init").symlink_to(tmp / "x")
    (tmp / "y").write_bytes(RULES + b"before6.rules")
    (ufw.etc / "before6.rules").unlink()
    (ufw.etc / "before6.rules").symlink_to(tmp / "y")
    (ufw.etc / "after.rules").chmod(0o666)
    others = f"and {tmp} is writable by others than root"
    assert ufw.problems() == [
        runs(ufw.etc / "before.init", f"is a link to {tmp}/x, {others}", "rm"),
        loads(ufw, "before6.rules", f"is a link to {tmp}/y, {others}",
              f"rm {ufw.etc}/before6.rules, then "),
        loads(ufw, "after.rules", "is writable by others than root",
              f"rm {ufw.etc}/after.rules, then ")]


def test_ufws_directory_linked_into_a_directory_anyone_may_write_is_named(
        ufw: Ufw, tmp_path: Path) -> None:
    """Every file in it reads as ufw's today; after the next boot /tmp/ufw is anyone's."""
    tmp = anyones(tmp_path / "tmp")
    shutil.move(str(ufw.etc), str(tmp / "ufw"))
    ufw.etc.symlink_to(tmp / "ufw")
    assert ufw.problems() == [
        f"{ufw.etc} is a link to {tmp}/ufw, and {tmp} is writable by others than root: "
        f"ufw.service runs and loads the files in it at every boot (make {ufw.etc} a "
        f"directory only root may write)"]


@pytest.mark.usefixtures("returns_promptly")
def test_a_fifo_or_a_device_is_named_and_never_waited_on(ufw: Ufw) -> None:
    (ufw.etc / "before.init").unlink()
    os.mkfifo(ufw.etc / "before.init", 0o600)  # not executable: named all the same
    (ufw.etc / "before6.rules").unlink()
    os.mkfifo(ufw.etc / "before6.rules")
    (ufw.etc / "after.rules").unlink()
    (ufw.etc / "after.rules").symlink_to("/dev/zero")  # a link: named as what it leads to
    assert ufw.problems() == [
        runs(ufw.etc / "before.init", "is a FIFO, not a regular file", "rm"),
        loads(ufw, "before6.rules", "is a FIFO, not a regular file",
              f"rm {ufw.etc}/before6.rules, then "),
        loads(ufw, "after.rules", "is a character device, not a regular file",
              f"rm {ufw.etc}/after.rules, then ")]


def test_without_ufw_there_is_nothing_to_judge(ufw: Ufw) -> None:
    """No ufw-init: nothing runs or loads ufw's files (the firewall guarantee names ufw
    missing)."""
    (ufw.etc / "before.init").write_bytes(b"#!/bin/sh\n/root/way-in &\n")
    (ufw.etc / "before.init").chmod(0o755)
    (ufw.etc / "before.rules").write_bytes(ACCEPT_22)
    assert len(ufw.problems()) == 2
    Path(ufw.places.init).unlink()
    assert ufw.problems() == []


@pytest.mark.parametrize("line", [
    b"ENABLED=yes; /root/way-in &",
    b"/root/way-in",
    b'LOGLEVEL="$(/root/way-in)"',
    b"LOGLEVEL=`/root/way-in`",
    b"PATH=/root/bin:$PATH",
    b"export LD_PRELOAD=/root/way-in.so",
    b"ENABLED=yes\r",
    b"IPT_MODULES=--config=zz.conf*",  # ufw-init: modprobe $m, globbed from /
    b'IPT_MODULES="nf_nat_ftp -C/root/x"',
    b"IPT_MODULES=nf_nat_ftp nf_conntrack_ftp",  # a command, with IPT_MODULES in its env
    b"\xc2\xa0",  # a no-break space: a word to sh, a command looked up on PATH
    b"\xc2\xa0# comment",
])
@pytest.mark.parametrize("sourced", ["defaults", "ufw.conf"])
def test_a_sourced_file_holding_more_than_ufws_settings_is_named(
        ufw: Ufw, sourced: str, line: bytes) -> None:
    """ufw-init sources both as shell before it sets anything: a command, an expansion, or a
    variable of the shell's own (PATH for the programs it runs next) runs as root."""
    path = Path(ufw.places.defaults) if sourced == "defaults" else ufw.etc / "ufw.conf"
    path.write_bytes(path.read_bytes() + line + b"\n")
    assert ufw.problems() == [
        f"{path} holds more than ufw's settings with literal values: ufw.service sources it as "
        "shell, as root, at every boot (keep only lines such as ENABLED=yes, and comments)"]


def test_ufws_settings_edited_by_hand_pass(ufw: Ufw) -> None:
    """The operator's own values are settings like any other: nothing runs."""
    (ufw.etc / "ufw.conf").write_bytes(b"ENABLED=no  # for now\nLOGLEVEL='medium'\n")
    Path(ufw.places.defaults).write_bytes(
        DEFAULTS + b'IPT_MODULES="nf_conntrack_ftp nf_nat_ftp"\nIPV6=no\n')
    assert ufw.problems() == []


@pytest.mark.usefixtures("returns_promptly")
def test_a_sourced_file_that_is_a_fifo_is_named_and_never_read(ufw: Ufw) -> None:
    conf = ufw.etc / "ufw.conf"
    conf.unlink()
    os.mkfifo(conf)
    assert ufw.problems() == [f"{conf} is a FIFO, not a regular file: ufw.service sources it as shell, "
                     f"as root, at every boot (rm {conf}, then reinstall ufw)"]


@pytest.mark.parametrize("sourced", ["defaults", "ufw.conf"])
def test_ufw_applying_another_sysctl_file_is_named(ufw: Ufw, sourced: str) -> None:
    """ufw-init applies IPT_SYSCTL's file with sysctl at every boot, as the last file it
    sources leaves it; only ufw's own is read for the programs the kernel would run as root
    (statemesh.kernelhelpers)."""
    path = Path(ufw.places.defaults) if sourced == "defaults" else ufw.etc / "ufw.conf"
    original = path.read_bytes()
    path.write_bytes(original + b"IPT_SYSCTL=/root/way-in.conf  # later\n")
    assert ufw.problems() == [
        f"{path} sets IPT_SYSCTL=/root/way-in.conf: ufw.service applies it with sysctl, as "
        "root, at every boot, where only /etc/ufw/sysctl.conf is read for what it sets "
        "(IPT_SYSCTL=/etc/ufw/sysctl.conf)"]
    path.write_bytes(original + b'IPT_SYSCTL=""\n')
    assert ufw.problems() == []


@pytest.mark.parametrize("line", [
    "-A ufw-before-input -p tcp --dport 2222 -j ACCEPT",  # a chain the check does not read
    ":ufw-before-input - [0:0]",  # declared again: flushed by iptables-restore -n
    ":INPUT ACCEPT [0:0]", "-P INPUT ACCEPT", "*nat",
    "-A ufw-logging-allow -j ACCEPT", "-A ufw-logging-allow -j LOG -j ACCEPT",
    # A reviewer's: the target after a tab, behind an abbreviated --jump, with a quoted
    # word that reads as "-j LOG" to a search of the text.
    '-A ufw-before-logging-input -p tcp --dport 22 -m comment --comment " -j LOG " -j\tACCEPT',
    '-A ufw-before-logging-input -p tcp --dport 22 -m comment --comment " -j LOG " --jum ACCEPT',
    '-A ufw-logging-deny -j LOG --log-prefix "[UFW BLOCK] " -j"" ACCEPT',
    " -A ufw-before-input -j ACCEPT",  # iptables-restore skips the blank: a rule all the same
    '-A "ufw-user-input -A ufw-before-input" -j ACCEPT',
    # A second reviewer's: iptables-restore reads 10239 bytes a line, the rest as the next.
    "#" + "x" * 10238 + "-I ufw-before-input -p tcp --dport 22 -j ACCEPT",
    "-A ufw-user-input -j RETURN" + " " * 10212 + "-I ufw-before-input -j ACCEPT",
    "# a comment with a control character\x1b",
])
def test_a_line_ufw_does_not_write_in_its_users_rules_is_told(line: str) -> None:
    assert not ufwfiles.is_ufws_own_line(line)


@pytest.mark.parametrize("line", [
    "*filter", ":ufw6-user-input - [0:0]", ":ufw-logging-deny - [0:0]", "### tuple ### allow tcp 22",
    "-A ufw-user-input -p tcp --dport 7443 -s 10.0.2.2 -j ACCEPT", "COMMIT",
    '-I ufw-before-logging-input -j LOG --log-prefix "[UFW AUDIT] "',
    "-I ufw-logging-deny -m conntrack --ctstate INVALID -j RETURN -m limit --limit 3/min "
    "--limit-burst 10",
])
def test_what_ufw_writes_in_its_users_rules_is_its_own(line: str) -> None:
    assert ufwfiles.is_ufws_own_line(line)


def test_iptables_restore_words_split_at_blanks_outside_double_quotes() -> None:
    assert ufwfiles.restore_words('-A c --log-prefix "[UFW BLOCK] " a"b c"d ""\t-j') == [
        "-A", "c", "--log-prefix", "[UFW BLOCK] ", "ab c", "d", "", "-j"]
