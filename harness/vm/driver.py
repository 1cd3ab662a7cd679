"""Drive a Debian guest under QEMU (TCG) through a virtio-serial agent, never a terminal.

The product removes SSH, gettys and terminals, so the harness talks to the guest through
a test-only agent unit on a virtio-serial port (see guest/statemesh-test-agent). Every wait
has a timeout, and the serial console is kept in a log file that failures quote.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from harness.vm.image import CLEAN_ENV, REPO_MOUNT, Image
from harness.vm import qga, vtpm
from harness.vm.qmp import Qmp

BOOT_TIMEOUT = float(os.environ.get("STATEMESH_VM_BOOT_TIMEOUT", "300"))
BASE_KERNEL_ARGS = "root=LABEL=smroot rw console=ttyS0,115200 systemd.show_status=1"
# node.conf is the package's conffile: a provisioner's copy is kept without a prompt.
KEEP_CONFFILES = b'Dpkg::Options { "--force-confdef"; "--force-confold"; };\n'
KEEP_CONFFILES_CONF = "/etc/apt/apt.conf.d/90statemesh-test-confold"
# The guest's processor, chosen for TCG (measured: two guests booting and working at once on
# 2 cores took 48 s, against 73 s with "-cpu max -smp 2"). One vCPU: two guests run at once on
# 2 host cores, and the kernel's cross-CPU code patching (int3 breakpoints, text_poke) once
# oopsed under multi-threaded TCG at boot. A plain x86-64 model with the SSE4 extensions that
# distributions' libraries pick: "max" enables what TCG emulates slowly.
GUEST_CPU = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt"
# Guest.wait_for's pause between tries, in the guest: usually, and when the test acts on
# the moment it waits for (a signal or a power cut in a given step).
POLL_PAUSE, POLL_PROMPT = 1.0, 0.1
# What systemd prints on the console when it refuses to boot and stops for good.
FROZEN = "Freezing execution."


class GuestError(RuntimeError):
    """The guest did not do what the test needed; the message quotes the console."""


@dataclasses.dataclass(frozen=True)
class SavedGuest:
    """A running guest kept on disk: its root disk as it was (a qcow2 that restored guests
    use as the read-only backing of their own overlay), its memory and device state (a QEMU
    migration stream), and its TPM's state and CA where it had one."""

    disk: Path
    state: Path
    kernel_args: str
    tpm_state: Optional[Path] = None
    tpm_ca: Optional[vtpm.LocalCa] = None


@dataclasses.dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Guest:
    """One guest: a copy-on-write overlay over a cached image, and the QEMU that runs it."""

    def __init__(
        self,
        image: Image,
        workdir: Path,
        repo_disk: Path,
        tpm_ca: Optional[vtpm.LocalCa] = None,
        extra_disks_mib: Sequence[int] = (),
        kernel_args: str = "",
        forward_ports: Sequence[int] = (),
        saved: Optional[SavedGuest] = None,
    ):
        """With `saved`, the first boot() restores that running guest instead of booting:
        same disk, memory and TPM, on a fresh overlay (nothing a test does reaches `saved`).
        Its devices are the saved guest's: no TPM or extra disks of its own."""
        if saved and (tpm_ca or extra_disks_mib or kernel_args):
            raise ValueError("a restored guest has the saved guest's TPM, disks and kernel "
                             "arguments; it takes none of its own")
        self.image = image
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.repo_disk = repo_disk
        self.kernel_args = saved.kernel_args if saved else kernel_args
        self.overlay = workdir / "overlay.qcow2"
        self.console_path = workdir / "console.log"
        # UNIX socket paths are limited to 108 bytes: keep them in a short private directory.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="smvm-"))
        self.agent_path = self.socket_dir / "agent.sock"
        self.qmp_path = self.socket_dir / "qmp.sock"
        self.qga_path = self.socket_dir / "qga.sock"
        self.serial_path = self.socket_dir / "serial.sock"
        if saved and saved.tpm_state:
            self.tpm = vtpm.GuestTpm(workdir, self.socket_dir, saved.tpm_ca, saved.tpm_state)
        else:
            self.tpm = vtpm.GuestTpm(workdir, self.socket_dir, tpm_ca) if tpm_ca else None
        self._incoming = saved.state if saved else None
        self.extra_disks = [workdir / f"extra{i}.raw" for i in range(len(extra_disks_mib))]
        self.forwards: Dict[int, int] = {port: _free_port() for port in forward_ports}
        self._ids = itertools.count(1)
        self._qemu: Optional[subprocess.Popen] = None
        self._sock: Optional[socket.socket] = None
        self._buffer = b""
        self.boot_id = ""
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                        "-b", str(saved.disk if saved else image.disk), str(self.overlay)],
                       check=True, env=CLEAN_ENV)
        for path, size in zip(self.extra_disks, extra_disks_mib):
            with open(path, "wb") as disk:
                disk.truncate(size * 1024 * 1024)

    # -- power ---------------------------------------------------------------

    def boot(self, kernel_args: Optional[str] = None) -> None:
        """Start QEMU and wait until the agent answers: a cold boot, or for a guest made from
        a SavedGuest, the first time, its restore."""
        started = time.monotonic()
        incoming, self._incoming = self._incoming, None
        self._start(kernel_args, ["-incoming", "defer"] if incoming else [])
        if incoming:
            self._load_state(incoming)
        self._wait_for_agent(previous_boot_id=None)
        self._log_command("(restore)" if incoming else "(boot)", 0, time.monotonic() - started)
        if incoming:
            # The guest's clock stood still since it was saved; the repository disk is this
            # test's, which the saved guest never saw (it was unmounted before saving).
            self.run(f"date -u -s @{time.time():.3f} >/dev/null && mount {REPO_MOUNT}")

    def boot_refused(self, kernel_args: str, grace: float = 5.0) -> str:
        """A cold boot that PID 1 must refuse: wait until it freezes (the console says
        "Freezing execution."; after that nothing can start), then `grace` seconds more;
        the agent must not have answered at any point. Returns this boot's console."""
        mark = len(self.console_log())
        self._start(kernel_args, [])
        deadline, frozen_at = time.monotonic() + BOOT_TIMEOUT, None
        while frozen_at is None or time.monotonic() < frozen_at + grace:
            if self._agent_answers():
                raise self._error(f"the boot with {kernel_args!r} went on: the agent answered")
            if frozen_at is None and FROZEN in self.console_log()[mark:]:
                frozen_at = time.monotonic()
            if time.monotonic() > deadline:
                raise self._error(f"PID 1 did not freeze within {BOOT_TIMEOUT:.0f} s")
            time.sleep(0.5)
        return self.console_log()[mark:]

    def _agent_answers(self) -> bool:
        try:
            self._request({"op": "ping"}, timeout=1)
            return True
        except (OSError, TimeoutError):
            self._close_socket()
            return False

    def _start(self, kernel_args: Optional[str], extra_argv: List[str]) -> None:
        if self._qemu and self._qemu.poll() is None:
            raise GuestError("boot() while the guest is running")
        if kernel_args is not None:
            self.kernel_args = kernel_args
        self._close_socket()
        self.agent_path.unlink(missing_ok=True)
        with open(self.console_path, "ab") as console:
            console.write(f"\n===== harness: boot {' '.join(self.kernel_args.split())}\n".encode())
        self._qemu = subprocess.Popen(self._qemu_argv() + extra_argv, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL,
                                      stderr=open(self.workdir / "qemu.err", "ab"), env=CLEAN_ENV)

    def _load_state(self, state: Path) -> None:
        with open(self.console_path, "ab") as console:
            console.write(f"===== harness: restore of {state}\n".encode())
        with Qmp(self.qmp_path) as qmp:
            qmp.execute("migrate-incoming", uri=f"exec:cat {shlex.quote(str(state))}")
            qmp.wait_migration(timeout=BOOT_TIMEOUT)
            qmp.execute("cont")  # it was saved stopped, and loads so

    def save(self, directory: Path) -> SavedGuest:
        """Stop this running guest for good and keep it in `directory` (which must not exist
        yet) as a SavedGuest: its overlay, its memory and device state, its TPM."""
        self.run(f"umount {REPO_MOUNT} && sync")
        directory.mkdir(parents=True)
        state = directory / "state"
        with Qmp(self.qmp_path) as qmp:
            qmp.execute("stop")
            qmp.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
            qmp.execute("migrate", uri=f"exec:cat > {shlex.quote(str(state))}")
            qmp.wait_migration(timeout=600)
            qmp.execute("quit")
        self._wait_exit(60)
        disk = directory / "disk.qcow2"
        shutil.move(str(self.overlay), disk)
        tpm_state = None
        if self.tpm:
            self.tpm.stop()
            tpm_state = directory / "tpm"
            shutil.copytree(self.tpm.state, tpm_state)
        return SavedGuest(disk, state, self.kernel_args, tpm_state,
                          self.tpm.ca if self.tpm else None)

    def reboot(self, kernel_args: Optional[str] = None) -> None:
        """A clean reboot; with new kernel arguments it is a shutdown and a cold boot."""
        if kernel_args is not None and kernel_args != self.kernel_args:
            self.shutdown()
            self.boot(kernel_args)
            return
        previous, started = self.boot_id, time.monotonic()
        self._send({"op": "run", "cmd": "systemctl reboot", "id": next(self._ids)})
        self._wait_for_agent(previous_boot_id=previous)
        self._log_command("(reboot)", 0, time.monotonic() - started)

    def shutdown(self, timeout: float = 120) -> None:
        """A clean power-off from inside the guest; waits for QEMU to exit."""
        self._send({"op": "run", "cmd": "systemctl poweroff", "id": next(self._ids)})
        self._wait_exit(timeout)

    def power_off_hard(self) -> None:
        """Pull the plug: QEMU is killed, whatever the guest was doing."""
        if self._qemu and self._qemu.poll() is None:
            self._qemu.send_signal(signal.SIGKILL)
            self._qemu.wait(30)
        self._close_socket()

    def close(self) -> None:
        self.power_off_hard()
        if self.tpm:
            self.tpm.stop()
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def _wait_exit(self, timeout: float) -> None:
        assert self._qemu
        try:
            self._qemu.wait(timeout)
        except subprocess.TimeoutExpired:
            self.power_off_hard()
            raise self._error(f"guest did not power off within {timeout:.0f} s") from None
        self._close_socket()

    def _qemu_argv(self) -> List[str]:
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35",
            "-cpu", GUEST_CPU, "-smp", "1", "-m", "2048", "-display", "none", "-monitor", "none",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            # A restored guest learns of it from a new generation id and reseeds its RNG.
            "-device", "vmgenid,guid=auto",
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
            "-append", f"{BASE_KERNEL_ARGS} {self.kernel_args}".strip(),
            "-chardev", f"file,id=console,path={self.console_path},append=on",
            "-serial", "chardev:console",
            # A second serial line (ttyS1), for a test to log in on as at a machine's console.
            "-chardev", f"socket,id=serial1,path={self.serial_path},server=on,wait=off",
            "-serial", "chardev:serial1",
            "-drive", f"file={self.overlay},if=virtio,format=qcow2,cache=unsafe",
            "-drive", f"file={self.repo_disk},if=virtio,format=raw,readonly=on",
            "-device", "virtio-rng-pci",
            "-device", "virtio-serial-pci,id=vser",
            "-chardev", f"socket,id=agent,path={self.agent_path},server=on,wait=off",
            "-device", "virtserialport,bus=vser.0,chardev=agent,name=org.statemesh.agent",
            # qemu-guest-agent's port, as a hypervisor gives it (hypervisor_exec drives it).
            "-chardev", f"socket,id=qga,path={self.qga_path},server=on,wait=off",
            "-device", "virtserialport,bus=vser.0,chardev=qga,name=org.qemu.guest_agent.0",
            "-netdev", "user,id=net0,restrict=on" + "".join(
                f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in self.forwards.items()),
            "-device", "virtio-net-pci,netdev=net0",
        ]
        for index, disk in enumerate(self.extra_disks):
            argv += ["-drive", f"file={disk},if=none,id=extra{index},format=raw,cache=unsafe",
                     "-device", f"virtio-blk-pci,drive=extra{index},serial=extra{index}"]
        if self.tpm:
            argv += self.tpm.qemu_args()
        return argv

    # -- the agent -----------------------------------------------------------

    def _wait_for_agent(self, previous_boot_id: Optional[str]) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self._qemu is None or self._qemu.poll() is not None:
                raise self._error("QEMU exited while waiting for the guest to boot")
            try:
                reply = self._request({"op": "ping"}, timeout=3)
            except (OSError, TimeoutError):
                self._close_socket()
                time.sleep(1)
                continue
            if reply.get("boot_id") and reply["boot_id"] != previous_boot_id:
                self.boot_id = reply["boot_id"]
                return
            time.sleep(1)
        raise self._error(f"guest agent did not answer within {BOOT_TIMEOUT:.0f} s")

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(self.agent_path))
            self._sock, self._buffer = sock, b""
        return self._sock

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, request: dict) -> None:
        self._connect().sendall((json.dumps(request) + "\n").encode())

    def _request(self, request: dict, timeout: float) -> dict:
        request = dict(request, id=next(self._ids))
        self._send(request)
        sock = self._connect()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                try:
                    reply = json.loads(line)
                except ValueError:
                    continue
                if reply.get("id") == request["id"]:
                    if "error" in reply:
                        raise GuestError(f"agent: {reply['error']}")
                    return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer from the guest agent within {timeout:.0f} s")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(1 << 20)
            except socket.timeout:
                raise TimeoutError(f"no answer from the guest agent within {timeout:.0f} s") from None
            if not chunk:
                self._close_socket()
                raise ConnectionError("agent socket closed")
            self._buffer += chunk

    # -- what tests use ------------------------------------------------------

    def run(self, cmd: str, timeout: float = 120, check: bool = True,
            env: Optional[Dict[str, str]] = None) -> Result:
        """Run a shell command as root in the guest (not in a terminal)."""
        started = time.monotonic()
        reply = self._request({"op": "run", "cmd": cmd, "timeout": timeout, "env": env or {}},
                              timeout=timeout + 30)
        result = Result(reply["returncode"], reply["stdout"], reply["stderr"])
        self._log_command(cmd, result.returncode, time.monotonic() - started)
        if check and result.returncode != 0:
            raise GuestError(f"guest command failed ({result.returncode}): {cmd}\n"
                             f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")
        return result

    def _log_command(self, cmd: str, returncode: int, seconds: float) -> None:
        """commands.log beside the console's: each command's time, to see where a test's
        minutes go (the suite's budget is kept by measuring, not guessing)."""
        first_line = cmd.strip().splitlines()[0] if cmd.strip() else cmd
        with open(self.workdir / "commands.log", "a") as log:
            log.write(f"{seconds:8.2f} s  rc={returncode:<3} {first_line[:160]}\n")

    def hypervisor_exec(self, command: str, timeout: float = 30) -> Optional[int]:
        """Run a shell command as the VM's operator would without SSH: through
        qemu-guest-agent's guest-exec. The exit code, or None when no agent answers."""
        return qga.guest_exec(self.qga_path, ["/bin/sh", "-c", command], timeout)

    def wait_for(self, command: str, what: str, timeout: float = 600,
                 promptly: bool = False) -> str:
        """Run `command` until it succeeds and return its output; a hang guard, not a timing
        assertion (AssertionError names `what` when it never does).

        The tries run in the guest, in one shell loop: each try sent from the host cost the
        guest's one emulated vCPU the agent's fork and a shell, half a second to a second
        (commands.log), and tried every few seconds it took a quarter of the vCPU from what
        was being waited for. In the guest a try costs the command alone, so the pause can
        be short; shorter still when the test acts on the moment (`promptly`)."""
        pause = POLL_PROMPT if promptly else POLL_PAUSE
        loop = (f"until out=$(sh -c {shlex.quote(command)} 2>/dev/null); do sleep {pause}; "
                'done; printf "%s\\n" "$out"')
        result = self.run(f"timeout {max(1, round(timeout))} sh -c {shlex.quote(loop)}",
                          timeout=timeout + 30, check=False)
        if result.returncode == 124:
            raise AssertionError(f"gave up waiting for {what}")
        if result.returncode != 0:
            raise GuestError(f"waiting for {what} failed ({result.returncode}): {command}\n"
                             f"{result.stderr[-3000:]}")
        return result.stdout

    def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._request({"op": "put", "path": path, "mode": mode,
                       "data": base64.b64encode(data).decode()}, timeout=60)

    def get(self, path: str) -> bytes:
        return base64.b64decode(self._request({"op": "get", "path": path}, timeout=60)["data"])

    def wait_until_booted(self, timeout: float = 600) -> None:
        """Wait for the end of boot: the agent answers early in sysinit, long before sshd,
        the gettys or the node's own services have started. `is-system-running --wait`
        alone can return before that (PID 1 not yet reachable right after a reboot), so
        the state is asked again until it is no longer a booting one."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = max(1.0, deadline - time.monotonic())
            state = self.run("systemctl is-system-running --wait", check=False,
                             timeout=remaining).stdout.strip()
            if state not in ("", "initializing", "starting"):
                return
            if time.monotonic() > deadline:
                raise self._error(f"the guest was still booting ({state or 'no answer'}) "
                                  f"after {timeout:.0f} s")
            time.sleep(1)

    def provision(self, node_conf: bytes) -> None:
        """Configure the node before installing, as a provisioner would: node.conf (on the
        disk, for tests that pull the plug), and apt keeping that conffile without a prompt."""
        self.run("mkdir -p /etc/statemesh")
        self.put("/etc/statemesh/node.conf", node_conf)
        self.put(KEEP_CONFFILES_CONF, KEEP_CONFFILES)
        self.run("sync")

    def install_prepared(self, timeout: float = 600) -> None:
        """The repository disk mounted and apt's index of it read: what installing needs.

        Waits for the disk first: its nofail mount is not ordered before local-fs.target,
        so the agent can answer before it is there."""
        self.run(f"for i in $(seq 120); do mountpoint -q {REPO_MOUNT} && exit 0; "
                 f"mount {REPO_MOUNT} 2>/dev/null; sleep 1; done; exit 1", timeout=180)
        self.run("apt-get update -q", env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=timeout)

    def install(self, extra_env: Optional[Dict[str, str]] = None, check: bool = True,
                timeout: float = 600) -> Result:
        """Install the package exactly as an operator would, from the local repository."""
        self.install_prepared(timeout)
        env = {"DEBIAN_FRONTEND": "noninteractive", **(extra_env or {})}
        return self.run("apt-get install -y statemesh-node", env=env, check=check, timeout=timeout)

    def serial_line(self) -> socket.socket:
        """A connection to the guest's ttyS1, as a console server gives one: what the guest
        writes to it before a connection is lost."""
        line = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        line.connect(str(self.serial_path))
        return line

    def host_port(self, guest_port: int) -> int:
        return self.forwards[guest_port]

    def save_journal(self) -> Optional[Path]:
        """Keep the guest's journal of this boot next to its console, for a failed test;
        None when the guest no longer answers (crashed, powered off, agent gone)."""
        if not self._qemu or self._qemu.poll() is not None:
            return None
        try:
            text = self.run("journalctl -b --no-pager -o short-monotonic", check=False, timeout=60).stdout
        except (GuestError, OSError, TimeoutError):
            return None
        path = self.workdir / "journal.txt"
        path.write_text(text, encoding="utf-8")
        return path

    def copy_root_disk(self, target: Path) -> Path:
        """The root disk as someone who takes it out of the machine reads it: every block,
        through the overlay's backing chain, as a raw file at `target` (sparse), copied by
        the host after the guest's `sync`, with the guest paused so that the copy is one
        moment of it. Scanning it natively costs seconds; inside a TCG guest, minutes."""
        self.run("sync")
        with Qmp(self.qmp_path) as qmp:
            qmp.execute("stop")
            try:
                subprocess.run(["qemu-img", "convert", "-U", "-q", "-O", "raw",
                                str(self.overlay), str(target)],
                               check=True, env=CLEAN_ENV, timeout=600)
            except BaseException:
                target.unlink(missing_ok=True)
                raise
            finally:
                qmp.execute("cont")
        return target

    def console_log(self) -> str:
        return self.console_path.read_text(errors="replace") if self.console_path.exists() else ""

    def _error(self, message: str) -> GuestError:
        tail = "\n".join(self.console_log().splitlines()[-60:])
        qemu_err = self.workdir / "qemu.err"
        said = qemu_err.read_text(errors="replace")[-2000:] if qemu_err.exists() else ""
        return GuestError(f"{message}\n--- qemu said\n{said}\n"
                          f"--- console (last lines) of {self.console_path}\n{tail}")


def quote(*words: str) -> str:
    """Shell-quote words for Guest.run."""
    return " ".join(shlex.quote(word) for word in words)
