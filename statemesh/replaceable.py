"""Whether someone other than root could change what root's programs read at a path, now or
after a reboot.

A check that reads a file of loaded code or commands (/etc/ld.so.preload, apt's and dpkg's
configuration, ifupdown's, wg-quick's) judges what is there today. A link planted there
makes another file part of root's configuration: `/etc/ld.so.preload -> /tmp/x` reads as
nothing while /tmp/x does not exist, and /tmp is emptied at every boot, then anyone's to
fill. So a link counts as root's only when it names its file directly (no other link on the
way, no `..` out of what is not a directory) and the directories it leads into that the
link's own place is not in are root's and writable by nobody else; and the file itself,
link or not, must be root's and writable by nobody else. A program that a kernel setting
names by any path (kernel.modprobe) is judged along the whole of that path: every directory
on it, not only those a link leads into.
"""

from __future__ import annotations

import os
import stat
from typing import Optional

from statemesh.dpkgdb import direct_target, real_directory

OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def by_others(path: str) -> Optional[str]:
    """Why someone other than root could change what is read at `path` (None: nobody can,
    or nothing is there and no link points anywhere)."""
    if os.path.islink(path):
        target = direct_target(path)
        if target is None:
            return f"{path} is a link to {os.readlink(path)}, through another link or a '..'"
        why = _writable_directory(os.path.dirname(target), os.path.dirname(os.path.abspath(path)))
        if why:
            return f"{path} is a link to {target}, and {why}"
        if not os.path.lexists(target):
            return f"{path} is a link to {target}, which does not exist yet"
        path = target
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"{path} cannot be read ({error.strerror})"
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        return None  # a FIFO or a device: its readers name what it is
    if _others_may_write(info):
        return f"{path} is writable by others than root"
    return None


def program_by_others(path: str, top: str = "/") -> Optional[str]:
    """Why someone other than root could change the program at `path`, as a setting the
    kernel follows names it (the module loader, a binfmt_misc interpreter): not a plain
    absolute path (a relative one, or one with a '.', '..' or empty component, names
    whatever is there when it runs), a link on the way but /usr-merge's, a directory on
    the way below `top` that others may write, or what by_others finds at the path."""
    if not path.startswith("/") or os.path.normpath(path) != path:
        return f"{path!r} is not a plain absolute path"
    directory = real_directory(os.path.dirname(path))
    if directory is None:
        return f"{path} is reached through a link"
    return _writable_directory(directory, top) or by_others(path)


def _others_may_write(info: os.stat_result) -> bool:
    return info.st_uid != 0 or bool(info.st_mode & OTHERS_WRITE)


def _writable_directory(directory: str, link_directory: str) -> Optional[str]:
    """The first directory from `directory` up that is not also above the link, and that
    someone other than root may write to (a sticky /tmp included: a name that is not there
    yet is anyone's to take)."""
    while not _is_within(link_directory, directory):
        try:
            info = os.stat(directory)
        except OSError:
            return f"{directory} does not exist yet"
        if _others_may_write(info):
            return f"{directory} is writable by others than root"
        directory = os.path.dirname(directory)
    return None


def _is_within(path: str, directory: str) -> bool:
    return directory == "/" or path == directory or path.startswith(directory.rstrip("/") + "/")
