"""The one way the product runs an external program.

Every subprocess goes through `run()` (as in mkosi), so that environment, logging, input
handling and error messages are the same everywhere. Secrets never go through it: the
storage module writes its key into a pipe itself, so that no immutable copy is made.
"""

from __future__ import annotations

import logging
import os
import subprocess
from typing import Mapping, Optional, Sequence

log = logging.getLogger(__name__)

# A fixed PATH: maintainer scripts and units may start us with a minimal or odd one.
SAFE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class CommandError(RuntimeError):
    """An external program failed; the message carries what it said."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        said = stderr.strip().splitlines()[-1] if stderr.strip() else "no message"
        super().__init__(f"{argv[0]} exited with status {returncode}: {said}")


def run(
    argv: Sequence[str],
    *,
    input: Optional[bytes] = None,
    check: bool = True,
    env: Optional[Mapping[str, str]] = None,
    timeout: Optional[float] = 300,
) -> subprocess.CompletedProcess:
    """Run argv with a clean environment; stdin gets `input` (bytes) or nothing at all."""
    environment = {"PATH": SAFE_PATH, "LC_ALL": "C.UTF-8"}
    environment.update(env or {})
    log.debug("run: %s", " ".join(argv))
    try:
        result = subprocess.run(
            list(argv),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            env=environment,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise CommandError(argv, 127, f"{argv[0]}: command not found") from None
    if check and result.returncode != 0:
        raise CommandError(argv, result.returncode, result.stderr.decode(errors="replace"))
    return result


def have(program: str) -> bool:
    """Whether a program is installed on the safe PATH."""
    return any(os.access(os.path.join(d, program), os.X_OK) for d in SAFE_PATH.split(":"))
