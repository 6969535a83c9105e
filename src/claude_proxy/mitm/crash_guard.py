"""A layer that crashes closes its client instead of leaving it hanging.

mitmproxy 12.3 catches an exception raised while a connection's layers handle an event, logs
"mitmproxy has crashed!" with its traceback, and carries on: the layers are left half-way, the
client gets neither an answer nor a close, and every deadline those layers kept is gone with them.
`install` wraps each connection's top layer as it is set: after an exception, the client is
closed and every later event ignored; one line says so (one per LOG_EVERY seconds at most, with
how many more).
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import Any

from mitmproxy.proxy import commands, events, layer, server

from claude_proxy.record.throttle import Throttle

logger = logging.getLogger(__name__)


class CrashGuard:
    """Stands for a connection's top layer (server_event only calls its handle_event)."""

    def __init__(self, inner: layer.Layer, crashes: Throttle) -> None:
        self.inner = inner
        self.crashes = crashes  # the one line per interval, for every connection
        self.broken = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def handle_event(self, event: events.Event) -> Generator[commands.Command, Any, None]:
        if self.broken:
            return
        try:
            yield from self.inner.handle_event(event)
        except Exception as e:
            self.broken = True
            client = self.inner.context.client
            if (skipped := self.crashes.allow()) is not None:
                more = f" ({skipped} more since the last line)" if skipped else ""
                logger.error(
                    "closing a client (port %s): handling it failed: %r%s",
                    client.peername[1] if client.peername else "?",
                    e,
                    more,
                    exc_info=logger.isEnabledFor(logging.DEBUG),
                )
            yield commands.CloseConnection(client)


def _get_layer(handler: server.ConnectionHandler) -> Any:
    return handler.__dict__["_guarded_layer"]


def install() -> None:
    """Every connection's top layer, as the handler sets it, is wrapped in a CrashGuard."""
    crashes = Throttle()

    def set_layer(handler: server.ConnectionHandler, top: layer.Layer) -> None:
        """The handler sets its first layer, then the listener replaces it with its own."""
        guarded = top if isinstance(top, CrashGuard) else CrashGuard(top, crashes)
        handler.__dict__["_guarded_layer"] = guarded

    server.ConnectionHandler.layer = property(_get_layer, set_layer)  # type: ignore[assignment]
