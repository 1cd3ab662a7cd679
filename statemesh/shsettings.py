"""Files a root program sources as shell at boot or update, judged by whether they hold
settings only.

update-grub sources /etc/default/grub, ufw-init sources /etc/default/ufw and
/etc/ufw/ufw.conf: whatever else such a file holds, a command substitution or a command of
its own line, runs as root with no terminal. A file that only assigns literal values (or,
where the program's settings refer to each other, the values of its own settings) runs
nothing, so an operator's edited settings pass and a command does not, without asking
whether the file is as its package shipped it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Pattern, Sequence

from statemesh import safefile

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # but tab: sh splits lines at \n only
# What sh takes for blanks; no-break spaces and the rest of Unicode's are a word to it (a
# line of one is a command, looked up on PATH).
BLANKS = " \t"


def setting_pattern(names: str, expandable: Optional[str] = None,
                    value: Optional[str] = None) -> Pattern[str]:
    """A line assigning a value as sh reads it with nothing run, to a variable whose name
    matches `names`: quoted text (expanding only $X or ${X} for X matching `expandable`,
    never ${X:-...}), single-quoted text, or a plain word; or, given `value`, that text (a
    program's own grammar, for settings it splits and globs: see literal()). A comment
    only after a blank (in sh a # inside a word is no comment, and what follows it is
    another assignment)."""
    expansion = (rf"|\$(?:\{{{expandable}\}}|{expandable}(?![A-Za-z0-9_{{]))"
                 if expandable else "")
    value = value or (rf"""(?:"(?:[^"\\$`]{expansion})*"|'[^']*'|[^ \t"'\\$`;&|<>()#]*)""")
    return re.compile(rf"^[ \t]*(?:export[ \t]+)?{names}={value}(?:[ \t]+#.*)?[ \t]*$")


def literal(word: str, words: Optional[str] = None) -> str:
    """A value of one `word` bare or quoted, or of `words` (blanks allowed) quoted only:
    a bare blank would end the assignment and start a command."""
    quoted = words or word
    return f"""(?:{word}|"{quoted}"|'{quoted}')"""


def settings_only(path: Path, setting: Pattern[str], also: Sequence[str] = ()) -> bool:
    """Whether the file at `path` holds settings only: each line blank, a comment, a
    `setting` or one of the lines `also` allows (a distribution's own, as shipped). A FIFO
    or a device is not (sh would read whatever comes), nor is an unreadable file."""
    try:
        text = safefile.read_text(path)  # no newline translation: \r is no newline in sh
    except (OSError, UnicodeDecodeError):
        return False
    return all(not _CONTROL.search(line) and (
        not line.strip(BLANKS) or line.lstrip(BLANKS).startswith("#")
        or setting.match(line) is not None or line.strip(BLANKS) in also)
        for line in text.split("\n"))
