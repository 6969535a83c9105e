"""The gate in front of asyncio's accept loop (mitm/accept.py), turn by turn: a real listening
socket with connections waiting in its queue, and each turn of the accept loop run by hand
instead of waiting for the event loop. The `asyncio` case runs the same turn with asyncio's own
accept loop, which takes every waiting connection at once. What the proxy does with the gate
under a burst is in tests/test_pressure.py and tests/test_limits.py."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest

from claude_proxy.mitm import accept
from claude_proxy.mitm.accept import PausedListener

WAITING = 10


class Room:
    """A gate with a fixed number of places."""

    def __init__(self, places: int) -> None:
        self.places = places
        self.admitted: list[socket.socket] = []
        self.paused_listeners: list[PausedListener] = []

    def room(self) -> int:
        return self.places - len(self.admitted)

    def admit(self, conn: socket.socket, listener: socket.socket) -> bool:
        self.admitted.append(conn)
        return True

    def paused(self, listener: PausedListener) -> None:
        self.paused_listeners.append(listener)


def turn(loop: asyncio.AbstractEventLoop, listener: socket.socket) -> None:
    """What the event loop does when the listener is readable: one turn of its accept loop."""
    handle = loop._selector.get_key(listener.fileno()).data[0]  # type: ignore[attr-defined]
    handle._run()


def registered(loop: asyncio.AbstractEventLoop, listener: socket.socket) -> bool:
    try:
        loop._selector.get_key(listener.fileno())  # type: ignore[attr-defined]
    except KeyError:
        return False
    return True


def still_waiting(listener: socket.socket) -> int:
    """Connections left in the listen queue (taken out and closed to count them)."""
    count = 0
    listener.setblocking(False)
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def with_listener(
    scenario: Callable[[asyncio.AbstractEventLoop, asyncio.Server, socket.socket], Awaitable[None]],
    protocol: Callable[[], asyncio.Protocol] = asyncio.Protocol,
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        server = await loop.create_server(protocol, sock=listener)
        port = listener.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(WAITING)]
        try:
            await scenario(loop, server, listener)
            while len(asyncio.all_tasks()) > 1:  # barrier: asyncio has made what it accepted
                await asyncio.sleep(0)
        finally:
            for client in clients:
                client.close()
            server.close()
            server.close_clients()
            await server.wait_closed()

    asyncio.run(main())


@pytest.mark.parametrize("gated", [True, False], ids=["ours", "asyncio"])
def test_one_turn_accepts_only_the_room_there_is(gated: bool) -> None:
    gate = Room(3)

    async def scenario(
        loop: asyncio.AbstractEventLoop, server: asyncio.Server, listener: socket.socket
    ) -> None:
        if gated:
            accept.install(loop, [server], gate)  # the listener is already accepting
        turn(loop, listener)
        if not gated:  # asyncio takes all that wait, whatever they will cost
            assert still_waiting(listener) == 0
            return
        assert len(gate.admitted) == 3
        turn(loop, listener)  # no room: the listener leaves the selector, the rest wait
        assert not registered(loop, listener) and len(gate.paused_listeners) == 1
        gate.places += WAITING
        assert gate.paused_listeners[0].resume()
        turn(loop, listener)
        assert len(gate.admitted) == WAITING and still_waiting(listener) == 0

    with_listener(scenario)


def test_a_paused_listener_closed_meanwhile_is_not_resumed() -> None:
    gate = Room(0)

    async def scenario(
        loop: asyncio.AbstractEventLoop, server: asyncio.Server, listener: socket.socket
    ) -> None:
        accept.install(loop, [server], gate)
        turn(loop, listener)
        [paused] = gate.paused_listeners
        server.close()  # a drain
        other = socket.socket()  # may take the listener's old descriptor number
        try:
            assert not paused.resume()
            assert not registered(loop, other)
        finally:
            other.close()

    with_listener(scenario)


def test_a_connection_the_gate_keeps_never_reaches_asyncio() -> None:
    """The gate answers some connections itself (past the client cap): asyncio's accept loop
    goes on to the next one, and makes a connection only of those admitted."""
    kept: list[socket.socket] = []

    class Refusing(Room):
        def admit(self, conn: socket.socket, listener: socket.socket) -> bool:
            if len(kept) < 4:
                kept.append(conn)
                return False
            return super().admit(conn, listener)

    gate = Refusing(WAITING)
    made: list[asyncio.BaseTransport] = []

    class Counting(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(transport)

    async def scenario(
        loop: asyncio.AbstractEventLoop, server: asyncio.Server, listener: socket.socket
    ) -> None:
        accept.install(loop, [server], gate)
        turn(loop, listener)
        assert len(kept) == 4 and len(gate.admitted) == WAITING - 4
        while len(made) < WAITING - 4:  # barrier: asyncio has made its connections
            await asyncio.sleep(0)
        assert still_waiting(listener) == 0
        for conn in kept:
            conn.close()

    with_listener(scenario, Counting)
