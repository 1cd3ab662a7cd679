"""Real swtpm instances for the host tests: unix sockets, as statemesh-vtpm.service serves
them, in a short temporary directory (a socket path is limited to 107 bytes, and pytest's
directories are long); the state where the test says.

`provision_with_ca` runs swtpm_setup with a private swtpm_localca CA (root + issuing CA),
so the EK certificate in NV 0x01c00002 chains to a CA the test controls.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}


def provision_with_ca(state: Path, ca: Path) -> Path:
    """Manufacture a TPM state with an EK certificate; return the CA's root certificate."""
    state.mkdir(parents=True, exist_ok=True)
    ca.mkdir(parents=True, exist_ok=True)
    (ca / "localca.conf").write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\n"
        f"issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n"
    )
    (ca / "localca.options").write_text("--platform-manufacturer StateMesh-Tests\n")
    (ca / "setup.conf").write_text(
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {ca}/localca.conf\n"
        f"create_certs_tool_options = {ca}/localca.options\n"
    )
    subprocess.run(
        ["swtpm_setup", "--tpm2", "--tpmstate", str(state), "--create-ek-cert", "--lock-nvram",
         "--overwrite", "--config", str(ca / "setup.conf")],
        check=True, capture_output=True, env=CLEAN_ENV,
    )
    return ca / "swtpm-localca-rootca-cert.pem"


class SwTpm:
    """A running `swtpm socket --tpm2`; `tcti` is its tpm2-tss TCTI string."""

    def __init__(self, state: Path):
        state.mkdir(parents=True, exist_ok=True)
        self.state = state
        self.sockets = Path(tempfile.mkdtemp(prefix="sm-swtpm-"))
        self.socket = self.sockets / "tpm.sock"
        self._process: Optional[subprocess.Popen] = None
        if not self._start():
            raise RuntimeError("swtpm did not start")

    def _start(self) -> bool:
        self._process = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state}",
             "--server", f"type=unixio,path={self.socket}",
             "--ctrl", f"type=unixio,path={self.socket}.ctrl",
             "--flags", "not-need-init,startup-clear"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=CLEAN_ENV,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._process.poll() is None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(self.socket))
                    return True
                except OSError:
                    time.sleep(0.02)
        self.stop()
        return False

    @property
    def tcti(self) -> str:
        return f"swtpm:path={self.socket}"

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(10)
        shutil.rmtree(self.sockets, ignore_errors=True)
