"""dpkg's database, read as dpkg-query reads it: what is installed, and each installed file
with the md5 dpkg installed it with.

The status file is only dpkg's last checkpoint: an interrupted or running dpkg keeps its
newer word in updates/NNNN until it folds them in, so every reader here takes both, the
later paragraph of a package winning. Only installed packages' md5sums count: a md5sums
file in info/ that no installed package names vouches for nothing.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Collection, Dict, Iterator, List, Mapping, Optional, Set, Tuple

from statemesh import safefile

DPKG_DIR = Path("/var/lib/dpkg")
# ucf: configuration files maintainer scripts generate (GRUB's /etc/default/grub), with the
# md5 of what they generated (hashfile) and the package that registered each (registry).
UCF_DIR = Path("/var/lib/ucf")
# Conffile flags dpkg writes after the md5 in a Conffiles line.
CONFFILE_FLAGS = ("obsolete", "remove-on-upgrade", "newconffile")
# States in which a package's files are on disk as dpkg unpacked them.
ON_DISK = ("installed", "unpacked", "half-configured", "triggers-awaited",
           "triggers-pending")
CHUNK = 1 << 20
# The fields read here; a package's paragraph keeps only these.
FIELDS = ("Package", "Status", "Multi-Arch", "Architecture", "Conffiles")
Paragraph = Mapping[str, str]


def _database_files(dpkg_dir: Path) -> List[Path]:
    updates = dpkg_dir / "updates"
    try:
        journal = sorted((f for f in updates.iterdir() if f.name.isdigit()),
                         key=lambda f: int(f.name))
    except OSError:
        journal = []
    return [dpkg_dir / "status", *journal]


def packages(dpkg_dir: Path = DPKG_DIR) -> Dict[str, Paragraph]:
    """Every package dpkg knows, by name (and ":arch" for Multi-Arch: same), its newest
    paragraph; raises OSError when the status file itself cannot be read."""
    found: Dict[str, Paragraph] = {}
    for path in _database_files(dpkg_dir):
        try:
            for paragraph in _paragraphs(path):
                if "Package" in paragraph:
                    found[_qualified(paragraph)] = paragraph
        except (OSError, SystemError) as error:  # apt_pkg.Error: a file dpkg would refuse
            if path == dpkg_dir / "status":
                raise OSError(f"{path}: {error}") from error
    return found


def _paragraphs(path: Path) -> Iterator[Paragraph]:
    """The file's paragraphs, read by apt's parser (python3-apt, a dependency: it refuses
    what dpkg refuses, and reads the status file five times as fast as python-debian,
    whose import alone costs every command half a second in an emulated guest);
    python-debian's parser only where apt_pkg is missing (a test environment)."""
    try:
        import apt_pkg
    except ImportError:
        from debian.deb822 import Deb822
        with io.TextIOWrapper(safefile.open_regular(path), encoding="utf-8",
                              errors="replace") as database:
            yield from (_kept(paragraph) for paragraph in Deb822.iter_paragraphs(database))
        return
    with safefile.open_regular(path) as database:
        for section in apt_pkg.TagFile(database, bytes=True):
            yield {key: section[key].decode("utf-8", errors="replace")
                   for key in FIELDS if key in section}


def _kept(paragraph: Mapping[str, str]) -> Paragraph:
    return {key: paragraph[key] for key in FIELDS if key in paragraph}


def _qualified(paragraph: Paragraph) -> str:
    if paragraph.get("Multi-Arch") == "same":
        return f"{paragraph['Package']}:{paragraph.get('Architecture', '')}"
    return paragraph["Package"]


def state(paragraph: Paragraph) -> str:
    """The last word of Status: "installed", "half-configured", "not-installed", ..."""
    words = paragraph.get("Status", "").split()
    return words[-1] if words else "not-installed"


def installed_files(dpkg_dir: Path = DPKG_DIR, ucf_dir: Path = UCF_DIR,
                    only: Optional[Collection[str]] = None) -> Dict[str, str]:
    """Every file of a package whose files are on disk (of those named `only`, when given:
    reading every package's md5sums took 0.33 s in an emulated guest), with the md5
    dpkg installed it with: its md5sums, and its conffiles (a conffile's md5 is the
    package's version, not the admin's); and the files its maintainer scripts generated
    through ucf, with the md5 of what they generated. Unreadable parts count as nothing
    vouched for."""
    files: Dict[str, str] = {}
    try:
        known = packages(dpkg_dir)
    except OSError:
        return files
    on_disk = set()
    for name, paragraph in known.items():
        if state(paragraph) not in ON_DISK or (only is not None
                                                 and name.partition(":")[0] not in only):
            continue
        on_disk.add(name.partition(":")[0])
        files.update(_md5sums(dpkg_dir / "info" / f"{name}.md5sums"))
        files.update(_conffiles(paragraph.get("Conffiles", "")))
    files.update(_ucf_generated(ucf_dir, on_disk))
    return files


def _ucf_generated(ucf_dir: Path, on_disk: Set[str]) -> Iterator[Tuple[str, str]]:
    """ucf's files of packages on disk, with the md5 of what their scripts generated."""
    try:
        registry = safefile.read_text(ucf_dir / "registry", errors="surrogateescape")
        hashes = safefile.read_text(ucf_dir / "hashfile", errors="surrogateescape")
    except OSError:
        return
    registered = set()
    for line in registry.splitlines():
        package, _, path = line.partition("\t")
        if package.strip() in on_disk:
            registered.add(path.strip())
    for line in hashes.splitlines():
        digest, _, path = line.partition("  ")
        if path in registered:
            yield path, digest


def _md5sums(path: Path) -> Iterator[Tuple[str, str]]:
    try:
        text = safefile.read_text(path, errors="surrogateescape")
    except OSError:
        return
    for line in text.splitlines():
        digest, _, relative = line.partition("  ")
        if relative:
            yield "/" + relative, digest


def _conffiles(field: str) -> Iterator[Tuple[str, str]]:
    for line in field.splitlines():
        words = line.split()
        while words and words[-1] in CONFFILE_FLAGS:
            words.pop()
        if len(words) >= 2:
            yield " ".join(words[:-1]), words[-1]


def as_installed(path: str, files: Dict[str, str]) -> bool:
    """The file at `path` is one dpkg installed, unchanged: a regular file (a symlink is
    judged by the file it names) whose md5 is the one dpkg recorded. /usr-merged systems
    list a file under /lib or /usr/lib, whichever its package shipped."""
    real = os.path.realpath(path)
    digest = next((files[name] for name in _spellings(path, real) if name in files), None)
    if digest is None:
        return False
    return md5_of(real) == digest


def shipped_links(links: Collection[str], files: Dict[str, str],
                  dpkg_dir: Path = DPKG_DIR) -> Set[str]:
    """The symlinks among `links` that an installed package shipped, naming a file of that
    same package as dpkg installed it: isc-dhcp-client's dhclient-exit-hooks.d/debug ->
    ../debug. dpkg records no md5 for a symlink, only its path in the package's file list;
    a link re-pointed to another package's program (perl, a shell) is not one, nor is one
    reaching the file through another link (debug -> /tmp/x -> ../debug: /tmp/x is anyone's
    to make at the next boot)."""
    targets = {link: target for link, target in ((link, direct_target(link)) for link in links)
               if target is not None}
    wanted = {link: set(_spellings(link, link)) for link in links}
    wanted.update({target: set(_spellings(target, target)) for target in targets.values()})
    owners = _owners(set().union(*wanted.values()), dpkg_dir) if wanted else {}

    def owned(path: str) -> Set[str]:
        return set().union(*(owners.get(name, set()) for name in wanted[path]))

    return {link for link, target in targets.items()
            if owned(link) & owned(target) and as_installed(target, files)}


# /usr-merge's links at the root (/lib -> usr/lib): the only links a path may pass through.
USR_MERGED = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


def direct_target(link: str) -> Optional[str]:
    """The file a symlink names, when it names it directly: every directory on the way a
    real one (but /usr-merge's), `..` taken in the directory it is reached in, and the file
    itself no link; None otherwise, or when `link` is no link. A text shortcut (normpath)
    would let `/tmp/x/../../dev/null` through, and /tmp/x is anyone's to make later."""
    try:
        text = os.readlink(link)
    except OSError:
        return None
    directory = real_directory(os.path.dirname(link) or "/")
    if directory is None:
        return None
    return _walk("/" if text.startswith("/") else directory, text)


def real_directory(path: str) -> Optional[str]:
    """`path` itself when no component of it is a link (but /usr-merge's, read through);
    None otherwise."""
    return _walk("/", path)


def _walk(here: str, path: str) -> Optional[str]:
    """`path` followed from the directory `here` one component at a time, as the kernel
    would, refusing every link but /usr-merge's and every `..` out of what is not (yet) a
    directory: anyone may make it one later, or a link."""
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not os.path.isdir(here):
                return None
            here = os.path.dirname(here)
            continue
        here = os.path.join(here, part)
        if os.path.islink(here):
            here = _usr_merged(here)
            if here is None:
                return None
    return here


def _usr_merged(path: str) -> Optional[str]:
    name = path[1:]
    if path.count("/") == 1 and name in USR_MERGED and os.readlink(path) in (
            f"usr/{name}", f"/usr/{name}"):
        return f"/usr/{name}"
    return None


def _owners(paths: Set[str], dpkg_dir: Path) -> Dict[str, Set[str]]:
    """The packages on disk whose file lists hold each of `paths`: every list is read, so
    this is for a few paths at once."""
    found: Dict[str, Set[str]] = {}
    try:
        known = packages(dpkg_dir)
    except OSError:
        return found
    for name, paragraph in known.items():
        if state(paragraph) not in ON_DISK:
            continue
        try:
            listed = safefile.read_text(dpkg_dir / "info" / f"{name}.list",
                                        errors="surrogateescape")
        except OSError:
            continue
        for line in listed.splitlines():
            if line in paths:
                found.setdefault(line, set()).add(name)
    return found


def _spellings(path: str, real: str) -> List[str]:
    names = [path, real]
    for name in (path, real):
        if name.startswith("/usr/"):
            names.append(name[len("/usr"):])
        else:
            names.append("/usr" + name)
    return names


def md5_of(path: str) -> str:
    """The md5 of a regular file, read in chunks; "" for anything else (a FIFO, a device:
    never waited on nor read)."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with safefile.open_regular(path) as stream:
            for chunk in iter(lambda: stream.read(CHUNK), b""):
                digest.update(chunk)
    except OSError:
        return ""
    return digest.hexdigest()
