"""The D-Bus client against a real dbus-daemon with stand-in systemd and logind."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any, Awaitable, Callable, List

import pytest

from statemesh import backend, dbusconn, pulledin, systemd
from tests import fakebus as fakebus_module
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


# --- the two D-Bus libraries (statemesh.dbusconn) --------------------------------------------
# `make test` runs the D-Bus tests a second time with jeepney, `make test-jammy` with jeepney
# only (Ubuntu 22.04 has no python3-dbus-next); these compare the two in one run.


@pytest.mark.parametrize("library", dbusconn.BACKENDS)
def test_each_library_reads_the_same_values(fakebus: FakeBus, monkeypatch: pytest.MonkeyPatch,
                                            library: str) -> None:
    """Structs come as lists and variants unwrapped whichever library read them; a job's
    result arrives by signal; an error reply is mapped the same."""
    monkeypatch.setenv(dbusconn.BACKEND_VARIABLE, library)
    fakebus.systemd.add("demo.service", processes=[(4242, "sleep 1")], dropins=["/etc/x.conf"])

    async def read(manager: systemd.Systemd) -> Any:
        assert manager.bus.library == library
        result = (await manager.start_unit("demo.service"),
                  await manager.list_units(["demo.*"]),
                  await manager.unit_processes("demo.service"),
                  await manager.get_unit_properties("demo.service", systemd.UNIT,
                                                    ["ActiveState", "DropInPaths", "Transient"]),
                  await manager.get_environment())
        with pytest.raises(systemd.UnknownUnitError):
            await manager.start_unit("nothere.service")
        return result

    started, units, processes, properties, environment = with_systemd(read)
    assert started == "done" and processes == [(4242, "sleep 1")]
    assert [(u.name, u.active_state) for u in units] == [("demo.service", "active")]
    assert properties == {"ActiveState": "active", "DropInPaths": ["/etc/x.conf"], "Transient": False}
    assert isinstance(environment, list)


@pytest.mark.parametrize("library", dbusconn.BACKENDS)
def test_each_library_hears_logind_s_signals(fakebus: FakeBus, monkeypatch: pytest.MonkeyPatch,
                                             library: str) -> None:
    monkeypatch.setenv(dbusconn.BACKEND_VARIABLE, library)

    async def hear() -> List[str]:
        heard: List[str] = []
        async with systemd.manager() as manager:
            logind = systemd.Logind(manager.bus)
            logind.on_session_new(heard.append)
            await logind.subscribed()
            fakebus.do(fakebus.logind.add, FakeSession("c7", 0, "root", tty="pts/3"))
            for _ in range(100):
                if heard:
                    break
                await asyncio.sleep(0.02)
            assert [s.id for s in await logind.list_sessions()] == ["c7"]
            assert manager.bus.connected
        assert not manager.bus.connected
        return heard

    assert asyncio.run(hear()) == ["c7"]


def test_jeepney_values_are_converted_by_their_signature() -> None:
    assert dbusconn.complete_types("sa{sv}(ii)aasay") == ["s", "a{sv}", "(ii)", "aas", "ay"]
    converted = dbusconn.plain("a{sv}", {"A": ("a(su)", [("x", 1)]), "B": ("ay", b"\x00")})
    assert {key: value.value for key, value in converted.items()} == {"A": [["x", 1]], "B": b"\x00"}
    assert dbusconn.plain("a(sas)", [("u", ["a", "b"])]) == [["u", ["a", "b"]]]


def test_the_d_bus_library_is_chosen_by_the_test_variable_or_what_is_installed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dbusconn.BACKEND_VARIABLE, "dbus-python")
    with pytest.raises(ValueError, match="not one of dbus-next, jeepney"):
        dbusconn.chosen_backend()
    monkeypatch.setenv(dbusconn.BACKEND_VARIABLE, "jeepney")
    assert dbusconn.chosen_backend() == "jeepney"
    monkeypatch.delenv(dbusconn.BACKEND_VARIABLE)
    assert dbusconn.chosen_backend() == "dbus-next"
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: None)
    assert dbusconn.chosen_backend() == "jeepney"  # Ubuntu 22.04: no python3-dbus-next


@pytest.mark.parametrize("library", dbusconn.BACKENDS)
def test_a_lost_bus_fails_calls_at_once_on_each_library(fakebus: FakeBus,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        library: str) -> None:
    """The tamper listener reconnects when its bus is lost: a call after the loss must fail
    (dbus-next's waited for ever), and `connected` must say so."""
    monkeypatch.setenv(dbusconn.BACKEND_VARIABLE, library)

    async def lose() -> None:
        async with systemd.manager() as manager:
            assert await manager.default_target()
            assert fakebus._daemon is not None
            fakebus._daemon.kill()
            fakebus._daemon.wait(10)
            for _ in range(100):
                if not manager.bus.connected:
                    break
                await asyncio.sleep(0.02)
            assert not manager.bus.connected
            with pytest.raises(systemd.NoBusError):
                await asyncio.wait_for(manager.default_target(), 10)

    asyncio.run(lose())


@pytest.mark.parametrize("library", dbusconn.BACKENDS)
def test_a_failing_signal_handler_does_not_end_the_connection(
        fakebus: FakeBus, monkeypatch: pytest.MonkeyPatch, library: str) -> None:
    monkeypatch.setenv(dbusconn.BACKEND_VARIABLE, library)

    def fails(session_id: str) -> None:
        raise RuntimeError(f"a bug seeing {session_id}")

    async def hear() -> List[str]:
        heard: List[str] = []
        async with systemd.manager() as manager:
            logind = systemd.Logind(manager.bus)
            logind.on_session_new(fails)
            logind.on_session_new(heard.append)
            await logind.subscribed()
            for session_id in ("c1", "c2"):
                fakebus.do(fakebus.logind.add, FakeSession(session_id))
            for _ in range(100):
                if len(heard) == 2:
                    break
                await asyncio.sleep(0.02)
            assert manager.bus.connected
        return heard

    assert asyncio.run(hear()) == ["c1", "c2"]


def test_a_bad_library_choice_is_not_a_missing_bus(fakebus: FakeBus,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dbusconn.BACKEND_VARIABLE, "dbus-python")
    with pytest.raises(systemd.SystemdError, match="no D-Bus library") as raised:
        with_systemd(lambda m: m.default_target())
    assert not isinstance(raised.value, systemd.NoBusError)


# -- systemd 249 (Ubuntu 22.04) ---------------------------------------------------------------

STAND_INS = (
    (fakebus_module.FakeSystemd, "org.freedesktop.systemd1.Manager"),
    (fakebus_module.UnitObject, "org.freedesktop.systemd1.Unit"),
    *((fakebus_module.UnitTypeObject, f"org.freedesktop.systemd1.{kind}")
      for kind in ("Service", "Scope", "Socket", "Mount", "Swap", "Slice", "Timer")),
    (fakebus_module.FakeLogind, "org.freedesktop.login1.Manager"),
    (fakebus_module.SessionObject, "org.freedesktop.login1.Session"),
)


def test_every_member_the_stand_ins_serve_is_in_systemd_249_but_upheldby() -> None:
    """The stand-ins serve what the product calls (a call they lack fails its test), so what
    they serve must be in Ubuntu 22.04's systemd 249: by the History systemd records, only
    UpheldBy is newer (251), and the product reads it as optional (pulledin._optional)."""
    history = fakebus_module.added_after_250()
    assert len(history) > 200 and history[("org.freedesktop.login1.Manager",
                                           "ListSessionsEx")] == 256
    newer = {(interface, member): history[(interface, member)]
             for cls, interface in STAND_INS for member in fakebus_module.members(cls)
             if history.get((interface, member), 0) > 249}
    assert newer == {("org.freedesktop.systemd1.Unit", "UpheldBy"): 251}


def test_a_systemd_249_without_upheldby_answers_as_249_and_the_walk_does_without(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked for UpheldBy, systemd 249 answers with the bus's UnknownProperty: an error of
    that property, not of the bus, so the boot-chain walk reads it as absent and goes on
    to TriggeredBy: a service its socket starts, the socket wanted by the boot."""
    async def ask(manager: systemd.Systemd) -> Any:
        try:
            upheld = await manager.get_unit_property("cron.service", systemd.UNIT, "UpheldBy")
        except systemd.SystemdError as error:
            upheld = error
        chain = pulledin.BootChain(manager, frozenset({"multi-user.target"}), frozenset())
        return upheld, await chain.brought_up("cron.service")

    for version in (None, 249):
        with fakebus_module.serving(monkeypatch, version) as bus:
            bus.systemd.add("cron.socket", active_state="active")
            bus.systemd.add("cron.service", active_state="active", wanted_by=[],
                            triggered_by=["cron.socket"])
            upheld, pulled_in = with_systemd(ask)
        assert pulled_in is True
        if version is None:
            assert upheld == []
        else:
            assert isinstance(upheld, systemd.SystemdError)
            assert not isinstance(upheld, (systemd.NoBusError, systemd.AccessDeniedError))
            assert "UpheldBy" in str(upheld), upheld


def test_calls_sent_together_keep_their_order_and_stay_under_the_bus_s_limit() -> None:
    """dbus-daemon refuses a connection more than 128 waiting replies: together() never has
    more than IN_FLIGHT calls waiting, whatever it is given; and a failure is raised once
    every call has ended, none left running."""
    waiting, most, ended = [0], [0], []

    async def call(n: int) -> int:
        waiting[0] += 1
        most[0] = max(most[0], waiting[0])
        await asyncio.sleep(0.001 * (n % 3))
        waiting[0] -= 1
        ended.append(n)
        if n in (150, 107):
            raise systemd.NoBusError(f"call {n}")
        return n * 2

    assert asyncio.run(systemd.together(call(n) for n in range(100))) == [
        n * 2 for n in range(100)]
    assert 1 < most[0] <= systemd.IN_FLIGHT < 128
    ended.clear()
    with pytest.raises(systemd.NoBusError, match="call 107"):
        asyncio.run(systemd.together(call(n) for n in range(200)))
    assert sorted(ended) == list(range(200))


def test_a_call_the_bus_refused_for_its_limits_is_no_answer_about_a_unit() -> None:
    """Raised as the bus's failure, which every judge of units passes on: taken for an
    answer, it would have made a unit "no such unit"."""
    refused = dbusconn.Received("error", "org.freedesktop.DBus.Error.LimitsExceeded", "", "",
                                ["The maximum number of pending replies has been reached"])
    with pytest.raises(systemd.NoBusError):
        systemd._raise_for(refused, "Transient of way-in.service")
