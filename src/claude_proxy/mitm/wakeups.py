"""A closed connection leaves no wakeup behind.

mitmproxy 12.3 cancels a connection's pending wakeups (RequestWakeup: a task that sleeps out its
delay, then hands the layers an event) when its client handler ends, before it closes the
upstream connections and runs the disconnect hooks. A layer that asks for one more while those
close (an HTTP layer arming its next deadline, 30 s or 120 s) leaves a task that keeps the whole
connection (its layers, buffers and flows, ~250 KB) alive until it fires: memory then follows
the rate of connections, not the clients open. `install` cancels every wakeup still pending when
the handler has ended, and makes one asked for after that end at once, with no event.
"""

from __future__ import annotations

from mitmproxy.proxy import commands, server

_handle_client = server.ConnectionHandler.handle_client
_wakeup = server.ConnectionHandler.wakeup


async def handle_client(self: server.ConnectionHandler) -> None:
    try:
        await _handle_client(self)
    finally:
        self.__dict__["_ended"] = True
        while self.wakeup_timer:
            self.wakeup_timer.pop().cancel()


async def wakeup(self: server.ConnectionHandler, request: commands.RequestWakeup) -> None:
    if self.__dict__.get("_ended"):
        return  # the connection is gone: nothing to wake
    await _wakeup(self, request)


def install() -> None:
    server.ConnectionHandler.handle_client = handle_client  # type: ignore[method-assign]
    server.ConnectionHandler.wakeup = wakeup  # type: ignore[method-assign]
