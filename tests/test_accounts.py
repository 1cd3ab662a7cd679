"""The accounts that reach the TPM and the endpoint: a member added to tss, a copy of the
endpoint's uid, a login shell, each named; Debian's own accounts pass."""

from __future__ import annotations

from typing import Sequence

from statemesh import accounts


def user(name: str, uid: int, gid: int, shell: str = "/usr/sbin/nologin") -> accounts.User:
    return accounts.User(name, uid, gid, shell)


def group(name: str, gid: int, members: Sequence[str] = ()) -> accounts.Group:
    return accounts.Group(name, gid, tuple(members))


# A node as tpm-udev and systemd-sysusers leave it.
USERS = [user("root", 0, 0, "/bin/bash"), user("nobody", 65534, 65534),
         user("tss", 106, 111, "/bin/false"), user("statemesh-atls", 997, 997)]
GROUPS = [group("root", 0), group("nogroup", 65534), group("tss", 111),
          group("statemesh-atls", 997)]


def test_the_accounts_as_the_packages_make_them_pass() -> None:
    assert accounts.problems(USERS, GROUPS) == []
    assert accounts.problems(USERS[:3], GROUPS[:3]) == []  # before configure made the user


def test_each_way_to_share_the_tpm_or_the_endpoint_is_named() -> None:
    cases = {
        "tss has members: nobody": (USERS, GROUPS[:2] + [group("tss", 111, ["nobody"])]
                                    + GROUPS[3:]),
        "statemesh-atls's uid 997 is also tenant's": (USERS + [user("tenant", 997, 65534)],
                                                       GROUPS),
        "group tss is the primary group of tenant": (USERS + [user("tenant", 1000, 111)],
                                                      GROUPS),
        "group tss's gid 111 is also tpm-too's": (USERS, GROUPS + [group("tpm-too", 111)]),
        "statemesh-atls has uid 0, not a system user's": (
            USERS[:3] + [user("statemesh-atls", 0, 997)], GROUPS),
        "statemesh-atls has the login shell /bin/bash": (
            USERS[:3] + [user("statemesh-atls", 997, 997, "/bin/bash")], GROUPS),
        "group statemesh-atls has members: nobody": (
            USERS, GROUPS[:3] + [group("statemesh-atls", 997, ["nobody"])]),
        "statemesh-atls's primary group is not statemesh-atls": (
            USERS[:3] + [user("statemesh-atls", 997, 65534)], GROUPS),
    }
    for named, (users, groups) in cases.items():
        found = accounts.problems(users, groups)
        assert len(found) == 1 and named in found[0], (named, found)
        assert found[0].startswith("accounts that reach the node's TPM or its aTLS endpoint")


def test_this_machines_accounts_are_read() -> None:
    users, groups = accounts.system_accounts()
    assert ("root", 0) in [(entry.name, entry.uid) for entry in users]
    assert ("root", 0) in [(entry.name, entry.gid) for entry in groups]
