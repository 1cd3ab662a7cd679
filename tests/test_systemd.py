"""The D-Bus client against a real dbus-daemon with stand-in systemd and logind."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any, Awaitable, Callable, List

import pytest

from statemesh import systemd
from tests.fakebus import FakeBus, FakeSession, fakebus  # noqa: F401 - fixture


def with_systemd(action: Callable[[systemd.Systemd], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        async with systemd.manager() as manager:
            return await action(manager)

    return asyncio.run(run())


def with_logind(action: Callable[[systemd.Logind], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        async with systemd.manager() as manager:
            return await action(systemd.Logind(manager.bus))

    return asyncio.run(run())


@pytest.mark.parametrize("early", [False, True], ids=["signal-after-reply", "signal-first"])
def test_start_unit_waits_for_the_job_result(fakebus: FakeBus, early: bool) -> None:
    fakebus.systemd.add("demo.service")
    fakebus.systemd.early_job_signal = early

    async def start_twice(manager: systemd.Systemd) -> List[str]:
        return [await manager.start_unit("demo.service"),
                await manager.restart_unit("demo.service")]

    assert with_systemd(start_twice) == ["done", "done"]
    assert fakebus.systemd.units["demo.service"].active_state == "active"
    assert ("StartUnit", ("demo.service", "replace")) in fakebus.systemd.calls


def test_failed_job_raises_with_unit_and_result(fakebus: FakeBus) -> None:
    fakebus.systemd.add("broken.service")
    fakebus.systemd.failing["broken.service"] = "failed"
    with pytest.raises(systemd.JobFailedError, match=r"StartUnit broken.service: job failed"):
        with_systemd(lambda m: m.start_unit("broken.service"))


def test_unknown_unit(fakebus: FakeBus) -> None:
    with pytest.raises(systemd.UnknownUnitError, match="nothere.service"):
        with_systemd(lambda m: m.start_unit("nothere.service"))
    with pytest.raises(systemd.UnknownUnitError, match="No such file"):
        with_systemd(lambda m: m.get_unit_file_state("nothere.service"))


def test_access_denied(fakebus: FakeBus) -> None:
    fakebus.systemd.add("ssh.service")
    fakebus.systemd.denied.add("MaskUnitFiles")
    with pytest.raises(systemd.AccessDeniedError, match="masking ssh.service: Access denied"):
        with_systemd(lambda m: m.mask_unit_files(["ssh.service"]))
    assert not fakebus.systemd.units["ssh.service"].masked


def test_no_bus_and_no_service(fakebus: FakeBus, monkeypatch: pytest.MonkeyPatch,
                               tmp_path: Any) -> None:
    with pytest.raises(systemd.NoBusError, match="cannot connect"):
        asyncio.run(systemd.connect(f"unix:path={tmp_path}/none"))
    fakebus.call(fakebus._bus.release_name("org.freedesktop.systemd1"))
    with pytest.raises(systemd.NoBusError, match="ServiceUnknown|not provided|was not"):
        with_systemd(lambda m: m.get_unit_file_state("ssh.service"))


def test_unit_files_mask_unmask_enable_disable(fakebus: FakeBus) -> None:
    fakebus.systemd.add("ssh.service", enabled=True)

    async def cycle(manager: systemd.Systemd) -> List[str]:
        states = [await manager.get_unit_file_state("ssh.service")]
        await manager.disable_unit_files(["ssh.service"])
        changes = await manager.mask_unit_files(["ssh.service"])
        assert changes == [systemd.UnitFileChange("symlink", "/etc/systemd/system/ssh.service",
                                                  "/dev/null")]
        await manager.reload()
        states.append(await manager.get_unit_file_state("ssh.service"))
        states.append(await manager.get_load_state("ssh.service"))
        await manager.unmask_unit_files(["ssh.service"])
        await manager.enable_unit_files(["ssh.service"])
        states.append(await manager.get_unit_file_state("ssh.service"))
        return states

    assert with_systemd(cycle) == ["enabled", "masked", "masked", "enabled"]
    assert ("MaskUnitFiles", (["ssh.service"], False, True)) in fakebus.systemd.calls


def test_list_units_and_properties(fakebus: FakeBus) -> None:
    fakebus.systemd.add("getty@tty1.service", active_state="active")
    fakebus.systemd.add("getty@tty2.service")
    fakebus.systemd.add("ssh.service", active_state="active")

    async def listing(manager: systemd.Systemd) -> Any:
        units = await manager.list_units(["getty@*.service"])
        files = await manager.list_unit_files(["ssh*"])
        state = await manager.get_active_state("getty@tty1.service")
        missing = await manager.get_active_state("nothere.service")
        return sorted(u.name for u in units), files, state, missing

    units, files, state, missing = with_systemd(listing)
    assert units == ["getty@tty1.service", "getty@tty2.service"]
    assert files == [("/usr/lib/systemd/system/ssh.service", "disabled")]
    assert (state, missing) == ("active", "inactive")


def test_unit_files_changed_and_reloading_signals(fakebus: FakeBus) -> None:
    fakebus.systemd.add("ssh.service")

    async def listen(manager: systemd.Systemd) -> List[Any]:
        heard: List[Any] = []
        done = asyncio.Event()
        await manager.on_unit_files_changed(lambda: heard.append("changed"))

        def reloading(active: bool) -> None:
            heard.append(("reloading", active))
            if not active:
                done.set()

        await manager.on_reloading(reloading)
        await manager.mask_unit_files(["ssh.service"])
        await manager.reload()
        await asyncio.wait_for(done.wait(), 10)
        return heard

    assert with_systemd(listen) == ["changed", ("reloading", True), ("reloading", False)]


def test_logind_sessions_terminate_and_signals(fakebus: FakeBus) -> None:
    fakebus.do(fakebus.logind.add, FakeSession("3", tty="tty1", leader=42, scope="session-3.scope"))
    fakebus.do(fakebus.logind.add, FakeSession("c1", type="unspecified", class_="background"))

    async def scenario(logind: systemd.Logind) -> Any:
        new: List[str] = []
        removed: List[str] = []
        arrived = asyncio.Event()
        logind.on_session_new(lambda s: (new.append(s), arrived.set()))
        logind.on_session_removed(removed.append)
        await logind.subscribed()
        sessions = await logind.list_sessions()
        await logind.kill_session("3", 9)
        await logind.terminate_session("3")
        fakebus.do(fakebus.logind.add, FakeSession("4", remote=True))
        await asyncio.wait_for(arrived.wait(), 10)
        with pytest.raises(systemd.UnknownUnitError, match="No session"):
            await logind.terminate_session("nosuch")
        return sessions, new, removed

    sessions, new, removed = with_logind(scenario)
    first = next(s for s in sessions if s.id == "3")
    assert (first.tty, first.leader, first.scope, first.class_, first.remote) == \
        ("tty1", 42, "session-3.scope", "user", False)
    assert {s.id for s in sessions} == {"3", "c1"}
    assert new == ["4"] and removed == ["3"]
    assert ("KillSession", ("3", "all", 9)) in fakebus.logind.calls


def test_logind_access_denied(fakebus: FakeBus) -> None:
    fakebus.logind.denied.add("TerminateSession")
    with pytest.raises(systemd.AccessDeniedError):
        with_logind(lambda l: l.terminate_session("3"))


def test_the_command_talks_to_systemd_without_gobject() -> None:
    """bin/statemesh-node refuses `gi` (dbus-next's GLib backend, which the node never
    uses, cost every command 0.7 s to import): dbus-next's asyncio bus must load all the
    same, and nothing of GObject with it."""
    script = (Path(__file__).parent.parent / "bin" / "statemesh-node").read_text()
    preamble = script.split("from statemesh.cli import main")[0]
    probe = (f"{preamble}\nsys.path.insert(0, {str(Path(__file__).parent.parent)!r})\n"
             "from statemesh import systemd\n"
             "from dbus_next.aio import MessageBus\n"
             "print(sorted(name for name in sys.modules if name.split('.')[0] == 'gi'"
             " and sys.modules[name] is not None))\n")
    done = subprocess.run(["/usr/bin/python3", "-IS", "-c", probe], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_units_path_is_loaded_once_per_connection_until_a_reload(fakebus: FakeBus) -> None:
    """status reads a few hundred properties: one LoadUnit per unit, not per property; a
    reload forgets them (a mask loaded gives an alias's name a path of its own)."""
    fakebus.systemd.add("cron.service", active_state="active")

    async def read() -> None:
        async with systemd.manager() as manager:
            for _ in range(3):
                assert await manager.get_active_state("cron.service") == "active"
            await manager.reload()
            await manager.get_active_state("cron.service")
    fakebus.call(read())
    loads = [args for member, args in fakebus.systemd.calls if member == "LoadUnit"]
    assert loads == ["cron.service", "cron.service"]


@pytest.mark.parametrize("name", ["ssh.service", "getty@tty1.service",
                                  "sys-subsystem-net-devices-eth0.device", "système.service"])
def test_the_object_path_of_a_unit_is_escaped_as_systemd_does(name: str) -> None:
    expected = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else f"_{b:02x}"
                       for b in name.encode())
    assert systemd._bus_label(name) == expected
    assert systemd._bus_label("0day.service").startswith("_30day")
