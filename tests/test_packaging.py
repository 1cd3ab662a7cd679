"""The package against Ubuntu 22.04 (jammy, the seed's platform) and 24.04: its dependencies,
and the systemd settings it ships.

Ubuntu's archive is unreachable from CI, so tests/data/{jammy,noble}-packages.txt record,
by hand and with the page each figure was read from, the versions each release has of the
packages the .deb names. `Depends:` must resolve there (some alternative of every relation
exists at an accepted version); a `Recommends:` may name what jammy lacks, which apt then
leaves out. tests/data/systemd-directives.txt records when systemd added each directive:
every one the units and the sleep.conf drop-in set must be in jammy's systemd 249.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
from debian.deb822 import Deb822, PkgRelation
from debian.debian_support import Version

from statemesh.guarantees import memory

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
JAMMY = DATA / "jammy-packages.txt"
RELEASES = ("jammy", "noble")
JAMMY_SYSTEMD = 249
# Which manual pages document the directives of a section.
PAGES = {"Unit": ("systemd.unit",), "Install": ("systemd.unit",), "Sleep": ("systemd-sleep.conf",),
         "Socket": ("systemd.socket", "systemd.exec", "systemd.resource-control", "systemd.kill"),
         "Service": ("systemd.service", "systemd.exec", "systemd.resource-control",
                     "systemd.kill")}
RELATIONS = {"<<": lambda a, b: a < b, "<=": lambda a, b: a <= b, "=": lambda a, b: a == b,
             ">=": lambda a, b: a >= b, ">>": lambda a, b: a > b}


def stanzas(path: Path) -> List[Deb822]:
    """The stanzas of a recorded Packages excerpt, its comments left out."""
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    return list(Deb822.iter_paragraphs(lines))


def archive(path: Path = JAMMY) -> Dict[str, Version]:
    """Package name -> version, from a recorded Packages excerpt."""
    return {paragraph["Package"]: Version(paragraph["Version"]) for paragraph in stanzas(path)}


def binary_paragraph() -> Deb822:
    paragraphs = Deb822.iter_paragraphs((ROOT / "debian" / "control").read_text().splitlines())
    return next(p for p in paragraphs if p.get("Package") == "statemesh-node")


def relations(field: str) -> List[List[dict]]:
    """A field's relations as dh fills it in: ${python3:Depends} from X-Python3-Version
    (dh-python writes `python3:any (>= 3.10~)`); ${misc:Depends} left out: it holds only
    dh_installsysusers's `systemd | systemd-standalone-sysusers | systemd-sysusers`, which
    every release the package runs on meets with its PID 1."""
    source = next(Deb822.iter_paragraphs((ROOT / "debian" / "control").read_text().splitlines()))
    python = f"python3:any ({source['X-Python3-Version']}~)"
    text = binary_paragraph().get(field, "").replace("${python3:Depends}", python)
    text = text.replace("${misc:Depends}", "")
    return PkgRelation.parse_relations(", ".join(p.strip() for p in text.split(",") if p.strip()))


def satisfied(alternative: dict, available: Dict[str, Version]) -> bool:
    have = available.get(alternative["name"])
    if have is None:
        return False
    if alternative["version"] is None:
        return True
    operator, wanted = alternative["version"]
    return RELATIONS[operator](have, Version(wanted))


def unmet(field: str, available: Dict[str, Version]) -> List[str]:
    return [PkgRelation.str([group]) for group in relations(field)
            if not any(satisfied(alternative, available) for alternative in group)]


@pytest.mark.parametrize("release", RELEASES)
def test_the_recorded_excerpts_name_their_sources(release: str) -> None:
    recorded = stanzas(DATA / f"{release}-packages.txt")
    assert recorded and all(p["Source-URL"].startswith("https://packages.ubuntu.com/")
                            and f"/{release}/" in p["Source-URL"] for p in recorded)
    assert {p["Component"] for p in recorded} <= {"main", "universe"}


@pytest.mark.parametrize("release", RELEASES)
def test_depends_resolve_on_ubuntu(release: str) -> None:
    assert unmet("Depends", archive(DATA / f"{release}-packages.txt")) == []


def test_noble_has_every_recommends_too() -> None:
    assert unmet("Recommends", archive(DATA / "noble-packages.txt")) == []


def test_what_jammy_lacks_is_only_recommended() -> None:
    """python3-tpm2-pytss (from Ubuntu 24.04 on): without it the node uses its own TPM
    client (statemesh/attest/tpm.py)."""
    assert unmet("Recommends", archive()) == ["python3-tpm2-pytss (>= 1.1)"]


def test_the_resolver_refuses_what_jammy_has_not() -> None:
    available = archive()
    assert unmet("Depends", {name: version for name, version in available.items()
                             if name != "python3-psutil"}) == ["python3-psutil (>= 5.9)"]
    assert not satisfied({"name": "python3-openssl", "version": (">=", "22.0"), "arch": None},
                         available)
    assert satisfied({"name": "python3", "version": (">=", "3.10~"), "arch": None}, available)


# -- systemd 249 ----------------------------------------------------------------------------


def directives() -> Dict[Tuple[str, str], Optional[int]]:
    """(manual page, directive) -> the systemd version that added it (None: older than the
    manual's record)."""
    added = {}
    for line in (DATA / "systemd-directives.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            page, name, version = line.split()
            added[(page, name)] = None if version == "-" else int(version)
    return added


def settings(text: str) -> Iterator[Tuple[str, str]]:
    """(section, directive) of every assignment in a unit or configuration file (a line
    ending in a backslash goes on in the next)."""
    section = ""
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif "=" in line and not line.startswith(("#", ";")):
            yield section, line.partition("=")[0].strip()


def not_in_systemd(text: str, version: int) -> List[str]:
    """The settings of `text` that systemd `version` does not know."""
    known = directives()
    found = []
    for section, name in settings(text):
        added = [known[(page, name)] for page in PAGES.get(section, ()) if (page, name) in known]
        if not added:
            found.append(f"[{section}] {name}= is no systemd directive")
        elif min(since or 0 for since in added) > version:
            found.append(f"[{section}] {name}= is new in systemd {min(added)}")
    return found


def shipped() -> Dict[str, str]:
    """What the package gives systemd to read: its units and the sleep.conf drop-in."""
    files = {path.name: path.read_text() for path in sorted((ROOT / "systemd").glob("*"))}
    files[memory.SLEEP_DROPIN.name] = memory.SLEEP_SETTINGS
    return files


def test_every_systemd_setting_the_package_ships_is_known_to_jammys_systemd() -> None:
    files = shipped()
    assert len(files) >= 7 and sum(len(list(settings(text))) for text in files.values()) > 100
    assert {name: not_in_systemd(text, JAMMY_SYSTEMD) for name, text in files.items()} == {
        name: [] for name in files}


def test_a_directive_jammy_lacks_or_a_misspelt_one_is_named() -> None:
    unit = "[Service]\nProtectProc=invisible\nRestrictFileSystems=ext4\nProtectKernelLog=yes\n"
    assert not_in_systemd(unit, JAMMY_SYSTEMD) == [
        "[Service] RestrictFileSystems= is new in systemd 250",
        "[Service] ProtectKernelLog= is no systemd directive"]
    assert not_in_systemd(unit, 250) == ["[Service] ProtectKernelLog= is no systemd directive"]
