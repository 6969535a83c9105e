"""Accept only the connections there are descriptors for; let the rest wait in the listen queue.

asyncio accepts up to 100 connections per turn of the event loop on each listener, before any of
them reaches the proxy's accounting; a burst of clients then takes every descriptor, and what
needs one next (the 503 to a refused client, a lazy import, the audit database, an upstream
connection) fails, while asyncio waits a whole second before it accepts again. The gate gives
each turn's accept loop only the room left below the open-files limit (less a spare), and stops
accepting while there is none; a connection that closes opens the gate again. Its count is an
estimate kept cheaply (accepts, clients, upstream connections); when it says "full", the real
count of open descriptors is read and replaces it. How it sits in front of asyncio's accept loop
is mitm/accept.py; what is here is how many, and when.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import time
from collections.abc import Callable

from claude_proxy.mitm import accept
from claude_proxy.mitm.accept import PausedListener

logger = logging.getLogger(__name__)

RECHECK_SECONDS = 0.05  # while closed, how often the real count is read again
SAY_AFTER = 1.0  # a gate closed this long is said (a burst of refusals closes it for less)


def open_files_limit() -> int:
    """The soft open-files limit in force now (it can change while the proxy runs)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def descriptors_in_use() -> int:
    return len(os.listdir("/dev/fd")) - 1  # less the one listdir itself held


class AcceptGate:
    def __init__(self, ceiling: Callable[[], int]) -> None:
        self.ceiling = ceiling  # descriptors the process may have open, less a spare
        self.base = 0  # descriptors open that are neither clients nor upstream connections
        self.clients = 0  # client connections the proxy knows of
        self.upstreams = 0  # upstream connections open
        self.unclaimed = 0  # accepted, not yet known as clients
        self.closed: dict[int, PausedListener] = {}  # listeners paused for want of room, by fd
        self.recheck: asyncio.TimerHandle | None = None
        self.closed_at = 0.0  # when the gate closed (monotonic)
        self.said = False  # whether that was logged
        # Answers a connection past the client cap on its raw socket and keeps it until it is
        # closed (True), or lets it through (False); set by the addon that keeps the cap.
        self.refuse: Callable[[socket.socket, socket.socket], bool] | None = None
        self.refusing = 0  # refused connections still open

    def estimate(self) -> int:
        return self.base + self.clients + self.upstreams + self.unclaimed + self.refusing

    def room(self) -> int:
        room = self.ceiling() - self.estimate()
        if room <= 0:  # the estimate may have drifted: read the truth
            truth = descriptors_in_use()
            self.unclaimed = max(
                0, truth - self.base - self.clients - self.upstreams - self.refusing
            )
            room = self.ceiling() - truth
        return room

    def install(self, loop: asyncio.AbstractEventLoop, servers: list[asyncio.Server]) -> None:
        """Put the gate in front of each listening socket's accept loop."""
        self.base = descriptors_in_use() - self.clients - self.upstreams
        accept.install(loop, servers, self)

    # What the accept loop asks

    def admit(self, conn: socket.socket, listener: socket.socket) -> bool:
        if self.refuse is not None and self.refuse(conn, listener):
            return False  # answered here: mitmproxy never sees it
        self.unclaimed += 1
        return True

    def paused(self, listener: PausedListener) -> None:
        if not self.closed:
            self.closed_at = time.monotonic()
        self.closed[listener.fd] = listener
        self._recheck_later(listener.loop)

    def reopen(self) -> None:
        """Accept again where the gate closed, if there is room now."""
        if not self.closed or self.room() <= 0:
            return
        closed, self.closed = self.closed, {}
        if self.recheck is not None:
            self.recheck.cancel()
            self.recheck = None
        for listener in closed.values():
            listener.resume()  # not if it was closed meanwhile (a drain)
        if self.said:
            self.said = False
            logger.warning(
                "accepting connections again after %.1f s without descriptors",
                time.monotonic() - self.closed_at,
            )

    def _recheck_later(self, loop: asyncio.AbstractEventLoop) -> None:
        """Descriptors can come back without a client closing (an upstream, a file)."""
        if self.recheck is None:
            self.recheck = loop.call_later(RECHECK_SECONDS, self._recheck)

    def _recheck(self) -> None:
        self.recheck = None
        if not self.closed:
            return
        loop = next(iter(self.closed.values())).loop
        self.reopen()
        if not self.closed:
            return
        if not self.said and time.monotonic() - self.closed_at >= SAY_AFTER:
            self.said = True
            logger.error(
                "cannot accept connections: %d descriptors open (open-files limit %d); "
                "new clients wait until some close",
                descriptors_in_use(),
                open_files_limit(),
            )
        self._recheck_later(loop)

    # What the proxy's hooks report

    def client_connected(self) -> None:
        self.clients += 1
        self.unclaimed = max(0, self.unclaimed - 1)

    def client_disconnected(self) -> None:
        self.clients = max(0, self.clients - 1)
        self.reopen()

    def upstream_connected(self) -> None:
        self.upstreams += 1

    def upstream_disconnected(self) -> None:
        self.upstreams = max(0, self.upstreams - 1)
        self.reopen()
