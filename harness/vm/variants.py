"""Build other versions of the package from this tree, for upgrade tests.

Upgrades are tested from the freshly built version N to an N+1 built here from the same
sources with a new changelog entry, and to a deliberately broken N+1 whose preinst fails,
which must send dpkg down Debian's abort-upgrade path and leave N installed and working.
"""

from __future__ import annotations

import email.utils
import re
import subprocess
from pathlib import Path

from harness.vm.image import CLEAN_ENV, ROOT

BROKEN_PREINST = """#!/bin/sh
# Test-only: a release whose upgrade fails before anything of it is configured.
set -e
echo "statemesh-node test build: this preinst fails on purpose" >&2
exit 1
"""


def build_variant(workdir: Path, version: str, broken_preinst: bool = False) -> Path:
    """Build statemesh-node at `version` from this tree's tracked files; return the .deb."""
    source = workdir / f"statemesh-{version}"
    source.mkdir(parents=True)
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout
    subprocess.run(["tar", "--null", "-T", "-", "-cf", "-"], cwd=ROOT, input=files,
                   stdout=open(workdir / f"{version}.tar", "wb"), check=True)
    subprocess.run(["tar", "-xf", str(workdir / f"{version}.tar"), "-C", str(source)], check=True)
    changelog = source / "debian" / "changelog"
    date = email.utils.formatdate(localtime=False)
    what = "broken preinst (test build)" if broken_preinst else "upgrade test build"
    changelog.write_text(
        f"statemesh ({version}) unstable; urgency=medium\n\n  * {what}.\n\n"
        f" -- StateMesh maintainers <maintainers@users.noreply.b-seed-59c17d94.example>  {date}\n\n"
        + changelog.read_text()
    )
    init = source / "statemesh" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text()))
    if broken_preinst:
        (source / "debian" / "statemesh-node.preinst").write_text(BROKEN_PREINST)
    result = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=source,
                            capture_output=True, text=True, env=CLEAN_ENV)
    if result.returncode != 0:
        raise RuntimeError(f"building {version} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return workdir / f"statemesh-node_{version}_all.deb"
