"""Real swtpm instances for the host tests: TCP on 127.0.0.1, state in a temporary directory.

`provision_with_ca` runs swtpm_setup with a private swtpm_localca CA (root + issuing CA),
so the EK certificate in NV 0x01c00002 chains to a CA the test controls.
"""

from __future__ import annotations

import socket
import subprocess
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


def _free_port_pair() -> int:
    """A port p such that p and p+1 were free a moment ago (swtpm needs two)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port < 65535:
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port


class SwTpm:
    """A running `swtpm socket --tpm2` on loopback; `tcti` is its tpm2-tss TCTI string."""

    def __init__(self, state: Path):
        state.mkdir(parents=True, exist_ok=True)
        self.state = state
        self.port = 0
        self._process: Optional[subprocess.Popen] = None
        for _attempt in range(5):
            self.port = _free_port_pair()
            if self._start():
                return
        raise RuntimeError("swtpm did not start")

    def _start(self) -> bool:
        self._process = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state}",
             "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
             "--flags", "not-need-init,startup-clear"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=CLEAN_ENV,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._process.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.02)
        self.stop()
        return False

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(10)
