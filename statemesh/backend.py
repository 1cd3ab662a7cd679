"""Choosing between two libraries that do one job, where a release packages only one.

The node's TPM client (statemesh.attest.tpm) and D-Bus connection (statemesh.dbusconn) each
have a preferred library and a fallback for Ubuntu 22.04, which lacks the preferred one.
What is installed decides; a variable lets the test suites run the same tests on both.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Tuple


def choose(variable: str, backends: Tuple[str, str], preferred_module: str) -> str:
    """The backend named in $variable, else backends[0] where `preferred_module` is
    installed (looked up, not imported: that can take a second), else backends[1].
    ValueError for a variable that names neither."""
    choice = os.environ.get(variable, "")
    if choice and choice not in backends:
        raise ValueError(f"{variable}={choice!r}: not one of {', '.join(backends)}")
    if choice:
        return choice
    spec = importlib.util.find_spec(preferred_module)
    # A directory without the module (what a removed package's __pycache__ leaves) is found
    # as a namespace package, without an origin: that is not the library.
    return backends[0] if spec is not None and spec.origin not in (None, "namespace") else backends[1]
