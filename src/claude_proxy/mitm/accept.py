"""asyncio's accept loop, handed only as many connections as a gate has room for.

asyncio's selector event loop (`BaseSelectorEventLoop._accept_connection`, Python 3.13) accepts up
to `backlog` (100) connections on a listener each time it is readable, before any of them reaches
the proxy's accounting; when accept() fails for want of descriptors it stops accepting on that
listener for a whole second. A burst of clients then takes every descriptor, and what needs one
next (a refusal to send, the audit database, an upstream connection) fails. asyncio has no public
way to accept fewer per turn or to stop and resume accepting on a listening socket (a Server can
only be closed for good). `install` puts a gate in front of the accept loop: each turn accepts at
most the gate's `room()`, through a socket that lets the gate answer (or count) each connection;
with no room the listener is taken off the selector and handed to the gate, which resumes it
when room comes back, while new clients wait in the kernel's listen queue. The counting and when
to resume are the gate's (proxy/accept_gate.py).

Upstream: python/cpython#78021 ("connection limit on listening socket in asyncio", bpo-33840),
closed without a change; the pause/resume proposal python/asyncio#448 was never merged. Without
it: tests/test_accept.py::test_one_turn_accepts_only_the_room_there_is (its `asyncio`
case shows asyncio's own accept loop) and, end to end,
tests/test_pressure.py::test_a_first_burst_past_the_descriptor_limit_is_answered.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Any, Protocol

logger = logging.getLogger(__name__)


@dataclass
class PausedListener:
    """A listening socket taken off the selector, and what asyncio needs to accept on it again."""

    loop: asyncio.AbstractEventLoop
    fd: int
    args: tuple[Any, ...]  # the accept loop's arguments; the listening socket is args[1]

    def resume(self) -> bool:
        """Accept on it again; False if it was closed meanwhile (a drain)."""
        if self.args[1].fileno() != self.fd:  # its number may now be another socket's
            return False
        self.loop._add_reader(self.fd, self.loop._accept_connection, *self.args)  # type: ignore[attr-defined]
        return True


class Gate(Protocol):
    def room(self) -> int:
        """How many more connections may be accepted now."""
        ...

    def admit(self, conn: socket.socket, listener: socket.socket) -> bool:
        """Take a new connection for the proxy (True), or keep it, answered here (False)."""
        ...

    def paused(self, listener: PausedListener) -> None:
        """A listener was taken off the selector for want of room: resume it later."""
        ...


class CountingSocket:
    """A listening socket whose accepts go through the gate (asyncio's accept loop only calls
    `accept` and `fileno`)."""

    def __init__(self, sock: socket.socket, gate: Gate) -> None:
        self.sock = sock
        self.gate = gate

    def accept(self) -> tuple[socket.socket, Any]:
        while True:  # asyncio stops at the BlockingIOError when none is waiting
            conn, address = self.sock.accept()
            if self.gate.admit(conn, self.sock):
                return conn, address

    def fileno(self) -> int:
        return self.sock.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def install(loop: asyncio.AbstractEventLoop, servers: list[asyncio.Server], gate: Gate) -> None:
    """Put `gate` in front of the accept loop of `loop`, and of each listening socket of
    `servers` that is accepting now (asyncio registered it with the unwrapped accept loop)."""
    accept = getattr(loop, "_accept_connection", None)
    selector = getattr(loop, "_selector", None)
    if accept is None or selector is None:
        logger.debug("the event loop has no accept loop to gate: %r", loop)
        return
    if not getattr(accept, "gated", False):
        original = accept

        def gated(*args: Any) -> None:
            accept_some(loop, original, gate, args)

        gated.gated = True  # type: ignore[attr-defined]
        loop._accept_connection = gated  # type: ignore[attr-defined]
    for server in servers:
        for sock in server.sockets:
            fd = sock.fileno()
            try:
                handle = selector.get_key(fd).data[0]
            except (KeyError, ValueError):
                continue  # not accepting right now (asyncio retries with the gate)
            args = handle._args
            loop._remove_reader(fd)  # type: ignore[attr-defined]
            loop._add_reader(fd, loop._accept_connection, *args)  # type: ignore[attr-defined]


def accept_some(
    loop: asyncio.AbstractEventLoop, original: Any, gate: Gate, args: tuple[Any, ...]
) -> None:
    """One turn of asyncio's accept loop, for at most the gate's room."""
    factory, sock, *rest = args
    sock = sock.sock if isinstance(sock, CountingSocket) else sock
    room = gate.room()
    if room <= 0:
        loop._remove_reader(sock.fileno())  # type: ignore[attr-defined]
        gate.paused(PausedListener(loop, sock.fileno(), (factory, sock, *rest)))
        return
    ssl_context, server, backlog, *timeouts = rest
    counting = CountingSocket(sock, gate)
    original(factory, counting, ssl_context, server, min(backlog, room), *timeouts)
