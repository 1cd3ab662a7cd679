"""One asyncio D-Bus connection, over dbus-next or jeepney.

statemesh.systemd needs little of a D-Bus library: a method call with its reply, signals,
and the value inside a variant. dbus-next does it where Debian and Ubuntu package it
(Debian 12 on, Ubuntu 24.04 on); jeepney, in Ubuntu 22.04's `main` (0.7.1) and in Debian,
does it where dbus-next is not packaged. Both are pure Python and both speak the wire
protocol themselves; each connection here turns what its library reads into the same
`Received`, so the callers never see which one it was.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, TypeVar

from statemesh import backend

# Which library connect() uses: "dbus-next", "jeepney", or unset for dbus-next where it is
# installed and jeepney elsewhere. The test suites set it to run the same tests on both;
# set in the service manager's environment, preflight and status name it (statemesh.planted).
log = logging.getLogger(__name__)
BACKEND_VARIABLE = "STATEMESH_DBUS_BACKEND"
BACKENDS = ("dbus-next", "jeepney")
SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"
HELLO_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class Received:
    """A reply or signal as read from the bus, whichever library read it."""

    kind: str  # "return", "error" or "signal"
    error_name: str
    interface: str
    member: str
    body: List[Any]


SignalHandler = Callable[[Received], None]
T = TypeVar("T")


class Connection(abc.ABC):
    """A connected bus: calls, signals, variants, disconnection."""

    library = ""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """Whether the connection still reads from the bus."""

    @abc.abstractmethod
    async def call(self, destination: str, path: str, interface: str, member: str,
                   signature: str = "", body: Sequence[Any] = ()) -> Received:
        """Send a method call and return its reply (a "return" or an "error")."""

    @abc.abstractmethod
    def add_signal_handler(self, handler: SignalHandler) -> None:
        """handler(signal) for every signal this connection receives (after AddMatch)."""

    @abc.abstractmethod
    def unwrap(self, value: Any) -> Any:
        """The value inside a variant of a reply's body."""

    @abc.abstractmethod
    def disconnect(self) -> None:
        """Close the connection; calls still waiting fail."""


def chosen_backend() -> str:
    """The library connect() uses here: the variable's, else dbus-next where installed."""
    return backend.choose(BACKEND_VARIABLE, BACKENDS, "dbus_next")


async def _answered(opening: Awaitable[T]) -> T:
    """A connection's opening (authentication, Hello) within HELLO_TIMEOUT: a socket that
    accepts and never answers would leave the caller waiting for ever."""
    try:
        return await asyncio.wait_for(opening, HELLO_TIMEOUT)
    except asyncio.TimeoutError:
        raise ConnectionError(f"no answer to authentication and Hello within {HELLO_TIMEOUT:.0f} s") from None


async def connect(address: Optional[str] = None) -> Connection:
    """Connect to `address` (a D-Bus address), or to the system bus. Raises what the
    library raises when the bus cannot be reached (OSError, EOFError, authentication)."""
    if chosen_backend() == "dbus-next":
        return await DbusNextConnection.open(address)
    return await JeepneyConnection.open(address)


class DbusNextConnection(Connection):
    """dbus-next's asyncio MessageBus."""

    library = "dbus-next"

    def __init__(self, bus: Any):
        self._bus = bus

    @classmethod
    async def open(cls, address: Optional[str]) -> "DbusNextConnection":
        from dbus_next.aio import MessageBus
        # The system bus by its fixed address, as jeepney's connection has it: dbus-next's
        # BusType.SYSTEM would take DBUS_SYSTEM_BUS_ADDRESS from the environment.
        bus = MessageBus(bus_address=address or SYSTEM_BUS)
        return cls(await _answered(bus.connect()))

    @property
    def connected(self) -> bool:
        return bool(self._bus.connected)

    @staticmethod
    def _received(message: Any) -> Received:
        from dbus_next import MessageType
        kinds = {MessageType.METHOD_RETURN: "return", MessageType.ERROR: "error",
                 MessageType.SIGNAL: "signal"}
        return Received(kinds.get(message.message_type, "other"), message.error_name or "",
                        message.interface or "", message.member or "", list(message.body))

    async def call(self, destination: str, path: str, interface: str, member: str,
                   signature: str = "", body: Sequence[Any] = ()) -> Received:
        from dbus_next import Message
        if not self.connected:  # dbus-next would wait for ever for the reply
            raise EOFError("the bus connection is closed")
        reply = await self._bus.call(Message(destination=destination, path=path,
                                             interface=interface, member=member,
                                             signature=signature, body=list(body)))
        if reply is None:
            raise EOFError("no reply")
        return self._received(reply)

    def add_signal_handler(self, handler: SignalHandler) -> None:
        from dbus_next import MessageType

        def on_message(message: Any) -> None:
            if message.message_type == MessageType.SIGNAL:
                handler(self._received(message))

        self._bus.add_message_handler(on_message)

    def unwrap(self, value: Any) -> Any:
        from dbus_next import Variant
        return value.value if isinstance(value, Variant) else value

    def disconnect(self) -> None:
        self._bus.disconnect()


class JeepneyVariant:
    """A variant as jeepney reads it, (signature, value), with its value converted."""

    __slots__ = ("signature", "value")

    def __init__(self, signature: str, value: Any):
        self.signature = signature
        self.value = value


def complete_types(signature: str) -> List[str]:
    """A D-Bus signature split into its complete types: "sa{sv}(ii)" -> s, a{sv}, (ii)."""
    types, start, depth = [], 0, 0
    for index, char in enumerate(signature):
        if char in "({":
            depth += 1
        elif char in ")}":
            depth -= 1
        if depth == 0 and char != "a":
            types.append(signature[start:index + 1])
            start = index + 1
    return types


def plain(signature: str, value: Any) -> Any:
    """jeepney's value of one complete type as dbus-next gives it: structs as lists,
    variants as objects with `.value` (jeepney has tuples for both)."""
    head = signature[0]
    if head == "v":
        inner_signature, inner = value
        return JeepneyVariant(inner_signature, plain(inner_signature, inner))
    if head == "(":
        return [plain(t, v) for t, v in zip(complete_types(signature[1:-1]), value)]
    if head == "a" and signature[1] == "{":
        key_type, value_type = complete_types(signature[2:-1])
        return {key: plain(value_type, item) for key, item in value.items()}
    if head == "a" and signature != "ay":
        return [plain(signature[1:], item) for item in value]
    return value


class JeepneyConnection(Connection):
    """jeepney's asyncio connection, with the reply matching and signal dispatch of its
    own (a task reading the bus), on jeepney's public API of 0.7 (Ubuntu 22.04) and 0.8."""

    library = "jeepney"

    def __init__(self, connection: Any):
        self._connection = connection
        self._replies: Dict[int, "asyncio.Future[Received]"] = {}
        self._handlers: List[SignalHandler] = []
        self._closed = False
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, address: Optional[str]) -> "JeepneyConnection":
        from jeepney.io.asyncio import open_dbus_connection
        return cls(await _answered(open_dbus_connection(address or SYSTEM_BUS)))

    @property
    def connected(self) -> bool:
        return not self._closed and not self._reader.done()

    @staticmethod
    def _received(message: Any) -> Received:
        from jeepney import HeaderFields, MessageType
        fields = message.header.fields
        kinds = {MessageType.method_return: "return", MessageType.error: "error",
                 MessageType.signal: "signal"}
        signature = fields.get(HeaderFields.signature, "")
        body = [plain(t, v) for t, v in zip(complete_types(signature), message.body)]
        return Received(kinds.get(message.header.message_type, "other"),
                        fields.get(HeaderFields.error_name, ""), fields.get(HeaderFields.interface, ""),
                        fields.get(HeaderFields.member, ""), body)

    async def _read(self) -> None:
        """Until the bus closes the connection (or disconnect() ends this task)."""
        from jeepney import HeaderFields
        try:
            while True:
                message = await self._connection.receive()
                received = self._received(message)
                serial = message.header.fields.get(HeaderFields.reply_serial)
                if received.kind == "signal":
                    self._dispatch(received)
                elif serial in self._replies:
                    future = self._replies.pop(serial)
                    if not future.done():
                        future.set_result(received)
        except (EOFError, OSError):
            log.info("the bus closed the connection")
        except Exception:  # noqa: BLE001 - a bug here must be seen, not end the connection quietly
            log.exception("reading from the bus failed")
        finally:
            for future in self._replies.values():
                if not future.done():
                    future.set_exception(EOFError("the bus connection closed"))
            self._replies.clear()

    def _dispatch(self, signal: Received) -> None:
        """Each handler in turn; one that fails is logged, and the reading goes on (as
        dbus-next does)."""
        for handler in list(self._handlers):
            try:
                handler(signal)
            except Exception:  # noqa: BLE001 - a handler's bug must not end the connection
                log.exception("a handler of %s.%s failed", signal.interface, signal.member)

    async def call(self, destination: str, path: str, interface: str, member: str,
                   signature: str = "", body: Sequence[Any] = ()) -> Received:
        from jeepney import DBusAddress, new_method_call
        if not self.connected:
            raise EOFError("the bus connection is closed")
        address = DBusAddress(path, bus_name=destination, interface=interface)
        message = new_method_call(address, member, signature or None, tuple(body))
        serial = next(self._connection.outgoing_serial)
        future = asyncio.get_running_loop().create_future()
        self._replies[serial] = future
        try:
            await self._connection.send(message, serial=serial)
            return await future
        finally:
            self._replies.pop(serial, None)

    def add_signal_handler(self, handler: SignalHandler) -> None:
        self._handlers.append(handler)

    def unwrap(self, value: Any) -> Any:
        return value.value if isinstance(value, JeepneyVariant) else value

    def disconnect(self) -> None:
        self._closed = True
        self._reader.cancel()
        self._connection.writer.close()
