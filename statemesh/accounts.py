"""The accounts that reach the node's TPM and its endpoint hold no one else.

The attestation key is a primary key of the endorsement hierarchy made from a fixed template
with no authorisation (statemesh.attest.tpm): whoever may open /dev/tpmrm0 can make it and
have it quote any state. The device is the `tss` group's (tpm-udev), and the endpoint runs
as `statemesh-atls`, which also owns the weak node's vTPM. An operator who is root before
installing can prepare both: a tenant's user added to `tss`, or a second account with the
endpoint's uid. Neither needs a terminal afterwards, so preflight refuses them and status
names them: each group has no member, each id one name, and the endpoint's user no login.
"""

from __future__ import annotations

import grp
import pwd
from typing import Iterable, List, NamedTuple, Sequence, Tuple

ENDPOINT_USER = "statemesh-atls"
TPM_GROUP = "tss"
TPM_USER = "tss"  # tpm-udev's own user, whose primary group tss is
SYSTEM_UID_MAX = 999  # login.defs' SYS_UID_MAX
NO_LOGIN = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false")


class User(NamedTuple):
    name: str
    uid: int
    gid: int
    shell: str


class Group(NamedTuple):
    name: str
    gid: int
    members: Sequence[str]


def system_accounts() -> Tuple[List[User], List[Group]]:
    """The users and groups as NSS gives them (/etc/passwd and /etc/group on a node)."""
    return ([User(e.pw_name, e.pw_uid, e.pw_gid, e.pw_shell) for e in pwd.getpwall()],
            [Group(e.gr_name, e.gr_gid, tuple(e.gr_mem)) for e in grp.getgrall()])


def _sharing(named_ids: Iterable[Tuple[str, int]], name: str, number: int) -> List[str]:
    """The names besides `name` that (name, id) pairs give the id `number`."""
    return sorted(other for other, other_id in named_ids if other_id == number and other != name)


def endpoint_user_problems(users: Sequence[User], groups: Sequence[Group]) -> List[str]:
    """Why the endpoint's user (when it exists) is not the endpoint's alone."""
    user = next((entry for entry in users if entry.name == ENDPOINT_USER), None)
    if user is None:
        return []  # made at configure (sysusers.d)
    problems = []
    if not 0 < user.uid <= SYSTEM_UID_MAX:
        problems.append(f"{ENDPOINT_USER} has uid {user.uid}, not a system user's")
    others = _sharing(((entry.name, entry.uid) for entry in users), ENDPOINT_USER, user.uid)
    if others:
        problems.append(f"{ENDPOINT_USER}'s uid {user.uid} is also {', '.join(others)}'s")
    if user.shell not in NO_LOGIN:
        problems.append(f"{ENDPOINT_USER} has the login shell {user.shell}")
    group = next((entry for entry in groups if entry.gid == user.gid), None)
    if group is None or group.name != ENDPOINT_USER:
        problems.append(f"{ENDPOINT_USER}'s primary group is not {ENDPOINT_USER}")
    else:
        problems += group_problems(group, groups, users, ENDPOINT_USER)
    return problems


def group_problems(group: Group, groups: Sequence[Group], users: Sequence[User],
                   owner: str) -> List[str]:
    """Why `group` holds someone besides `owner` (the user whose primary group it is)."""
    problems = []
    if group.members:
        problems.append(f"group {group.name} has members: {', '.join(sorted(group.members))}")
    others = _sharing(((entry.name, entry.gid) for entry in groups), group.name, group.gid)
    if others:
        problems.append(f"group {group.name}'s gid {group.gid} is also {', '.join(others)}'s")
    primary = sorted(user.name for user in users if user.gid == group.gid and user.name != owner)
    if primary:
        problems.append(f"group {group.name} is the primary group of {', '.join(primary)}")
    return problems


def tpm_group_problems(users: Sequence[User], groups: Sequence[Group]) -> List[str]:
    group = next((entry for entry in groups if entry.name == TPM_GROUP), None)
    return [] if group is None else group_problems(group, groups, users, TPM_USER)


def problems(users: Sequence[User] = (), groups: Sequence[Group] = ()) -> List[str]:
    """preflight's and status's finding: one line naming every account that is not alone
    (the system's accounts unless given)."""
    if not users:
        users, groups = system_accounts()
    found = endpoint_user_problems(users, groups) + tpm_group_problems(users, groups)
    if not found:
        return []
    return [f"accounts that reach the node's TPM or its aTLS endpoint hold others: "
            f"{'; '.join(found)} (whoever opens /dev/tpmrm0 can make the node's attestation "
            "key quote anything: remove them)"]
