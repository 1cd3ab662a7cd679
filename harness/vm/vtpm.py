"""A swtpm instance attached to a guest as its TPM 2.0 device, with an EK certificate.

The EK certificate is issued by a private swtpm_localca CA in a temporary directory (never
the host's /var/lib/swtpm-localca), so tests can choose to trust that CA or not.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import List, Optional

from harness.vm.image import CLEAN_ENV


class LocalCa:
    """swtpm_setup configuration whose EK certificates chain to a private CA in `directory`."""

    def __init__(self, directory: Path):
        self.directory = directory
        state = directory / "localca"
        state.mkdir(parents=True, exist_ok=True)
        (directory / "swtpm-localca.conf").write_text(
            f"statedir = {state}\n"
            f"signingkey = {state}/signkey.pem\n"
            f"issuercert = {state}/issuercert.pem\n"
            f"certserial = {state}/certserial\n"
        )
        (directory / "swtpm-localca.options").write_text(
            "--platform-manufacturer StateMesh-Tests\n--platform-version 1\n--platform-model vm\n"
        )
        (directory / "swtpm_setup.conf").write_text(
            "create_certs_tool = /usr/bin/swtpm_localca\n"
            f"create_certs_tool_config = {directory}/swtpm-localca.conf\n"
            f"create_certs_tool_options = {directory}/swtpm-localca.options\n"
        )

    @property
    def setup_config(self) -> Path:
        return self.directory / "swtpm_setup.conf"

    def ca_certificates(self) -> List[Path]:
        """The CA's root and issuing certificates (PEM), created with the first EK cert."""
        state = self.directory / "localca"
        return sorted(state.glob("*cert*.pem"))


class GuestTpm:
    """A swtpm socket process that QEMU connects to as its TPM emulator."""

    def __init__(self, workdir: Path, socket_dir: Path, ca: LocalCa,
                 saved_state: Optional[Path] = None):
        """A new TPM with an EK certificate from `ca`, or a copy of `saved_state` (a restored
        guest's TPM: QEMU then loads its volatile state with the guest's)."""
        self.state = workdir / "tpm"
        self.socket = socket_dir / "swtpm.sock"
        self.ca = ca
        self._process: Optional[subprocess.Popen] = None
        if saved_state:
            shutil.copytree(saved_state, self.state)
        else:
            self._manufacture()
        self.start()

    def _manufacture(self) -> None:
        self.state.mkdir(exist_ok=True)
        subprocess.run(
            ["swtpm_setup", "--tpm2", "--tpmstate", str(self.state), "--create-ek-cert",
             "--create-platform-cert", "--lock-nvram", "--overwrite",
             "--config", str(self.ca.setup_config)],
            check=True, capture_output=True, env=CLEAN_ENV,
        )

    def start(self) -> None:
        self._process = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state}",
             "--ctrl", f"type=unixio,path={self.socket}",
             "--log", f"file={self.state / 'swtpm.log'},level=1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=CLEAN_ENV,
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if time.monotonic() > deadline or self._process.poll() is not None:
                raise RuntimeError("swtpm did not create its control socket")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(10)

    def qemu_args(self) -> List[str]:
        return ["-chardev", f"socket,id=chrtpm,path={self.socket}",
                "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                "-device", "tpm-tis,tpmdev=tpm0"]
