"""mitmproxy's open connections and listening sockets, as the proxy's addons reach them.

mitmproxy's addon API names a connection (`connection.Client`) but gives no way to act on its
socket: to close a client at once, to stop reading it, or to stop reading the upstreams that serve
it. Its `Proxyserver` addon keeps each client's `ConnectionHandler` (`connections`, by client id),
whose `transports` hold the asyncio task and stream writer of every connection it serves; its
mode servers keep their `asyncio.Server`s in `_servers`. Those are internals: this is the one
place that reads them, so a change in mitmproxy breaks here, and in
tests/test_mitm_internals.py, instead of silently doing nothing. Not reported upstream (the issue
one would file: "an addon API to close a client, and to pause reading a connection").

The Proxyserver comes from `service.build_master`, which made it: no addon looks it up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from mitmproxy import connection
from mitmproxy.addons.proxyserver import Proxyserver

SOCKS5 = "socks5"  # mitmproxy's mode name of a SOCKS5 listener
REGULAR = "regular"  # and of an HTTP proxy listener


class Connections:
    def __init__(self, proxyserver: Proxyserver) -> None:
        self.proxyserver = proxyserver

    def count(self) -> int:
        """Client connections whose handler has not ended."""
        return len(self.proxyserver.connections)

    def _handler(self, client_id: str) -> Any:
        return self.proxyserver.connections.get(client_id)

    def client(self, client_id: str) -> connection.Client | None:
        """A client connection still served, or None."""
        handler = self._handler(client_id)
        return handler.client if handler is not None and self.is_open(client_id) else None

    def is_open(self, client_id: str) -> bool:
        """Whether a client connection is still served (its task still runs)."""
        handler = self._handler(client_id)
        io = handler.transports.get(handler.client) if handler is not None else None
        return io is not None and io.handler is not None

    def close(self, client_id: str, why: str) -> bool:
        """Close a client connection at once, as mitmproxy's own idle timeout does: its handler
        task is cancelled, and ends as when its client goes (hooks run, upstreams close). False:
        it was gone already."""
        handler = self._handler(client_id)
        io = handler.transports.get(handler.client) if handler is not None else None
        if io is None or io.handler is None:
            return False
        io.handler.cancel(f"claude-proxy: {why}")
        return True

    def close_all(self, why: str) -> None:
        for handler in list(self.proxyserver.connections.values()):
            self.close(handler.client.id, why)

    def set_client_reading(self, client_id: str, paused: bool) -> None:
        """Stop reading a client's socket, or read it again."""
        handler = self._handler(client_id)
        io = handler.transports.get(handler.client) if handler is not None else None
        if io is None or io.writer is None:
            return  # gone already
        if paused:
            io.writer.transport.pause_reading()
        else:
            io.writer.transport.resume_reading()

    def set_upstream_reading(self, client_id: str, paused: bool) -> None:
        """Stop reading the upstream connections that serve a client, or read them again."""
        handler = self._handler(client_id)
        if handler is None:
            return  # gone already
        for conn, io in list(handler.transports.items()):
            if conn is handler.client or io.writer is None or io.writer.is_closing():
                continue
            if paused:
                io.writer.transport.pause_reading()
            else:
                io.writer.transport.resume_reading()

    def listening(self) -> Iterator[tuple[str, asyncio.Server]]:
        """Each listening asyncio server, with the mode name of its listener ("socks5", …)."""
        for instance in self.proxyserver.servers:
            # AttributeError, not silence, if it is renamed
            for server in instance._servers:  # type: ignore[attr-defined]
                if isinstance(server, asyncio.Server):
                    yield instance.mode.type_name, server

    def listen_addresses(self) -> Iterator[tuple[str, tuple[str, int]]]:
        """Each address listened on, with the mode name of its listener."""
        for instance in self.proxyserver.servers:
            for address in instance.listen_addrs:
                yield instance.mode.type_name, (address[0], address[1])

    def on_listeners_changed(self, callback: Any) -> None:
        """Call `callback` (a coroutine function) each time the listeners change."""
        self.proxyserver.servers.changed.connect(callback)
