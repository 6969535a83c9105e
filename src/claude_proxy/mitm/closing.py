"""A connection closed by a command is closed, whichever task the command came from.

mitmproxy 12.3's `ConnectionHandler.handle_connection` closes its socket when it is cancelled while
reading or draining, but not when the cancellation reaches it while it waits to hand received data
to the layers. That happens when another task (an async hook finishing, e.g. the organization guard
refusing a request while its client still sends the body) closes the connection: the handler then
ends with the socket open and the client waits for an answer that never comes. `install` wraps the
handler so that the socket is closed in that case too. It is the one fix for this leak (not
reported to mitmproxy yet); without it these fail: tests/test_orgguard.py
(`test_other_organizations_key_never_delivers_a_body`,
`test_a_new_credential_with_a_large_upload_is_refused_before_any_probe`) and tests/test_limits.py
(`test_endless_client_hello_is_cut_off`, `test_http2_oversized_head_is_cut_off`).
"""

from __future__ import annotations

import asyncio
import contextlib

from mitmproxy.connection import Connection
from mitmproxy.proxy import server

_handle_connection = server.ConnectionHandler.handle_connection


async def handle_connection(self: server.ConnectionHandler, connection: Connection) -> None:
    try:
        await _handle_connection(self, connection)
    except asyncio.CancelledError:
        io = self.transports.pop(connection, None)  # still there only if mitmproxy did not close it
        if io is not None and io.writer is not None:
            with contextlib.suppress(OSError):
                io.writer.close()
        raise


def install() -> None:
    server.ConnectionHandler.handle_connection = handle_connection  # type: ignore[method-assign]
