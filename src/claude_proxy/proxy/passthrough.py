"""Pass-through tunnels (`inspect = false`): the client's own TLS, relayed and never decrypted.

For clients that pin their roots or present client certificates. The destination is decided on
the CONNECT (or SOCKS5) target; the ClientHello must then name that same host in its SNI, in the
clear: a hello without one, or one that hides it (Encrypted Client Hello), is refused. After that
the proxy sees nothing but bytes, so it re-decides the destination whenever the policy has changed
and the client sends more, and closes the tunnel if it is no longer a pass-through.
"""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import tls
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.context import Context

from claude_proxy.policy import rules
from claude_proxy.record.decisions import printable

ENCRYPTED_CLIENT_HELLO = 0xFE0D  # the extension type of ECH (RFC 9849)


def hello_refusal(hello: tls.ClientHello, host: str) -> str | None:
    """Why this ClientHello may not open a pass-through tunnel to `host`, or None if it may."""
    if any(kind == ENCRYPTED_CLIENT_HELLO for kind, _ in hello.extensions):
        return "the ClientHello hides its server name (Encrypted Client Hello)"
    if hello.sni is None:
        return "a pass-through tunnel needs the server name (SNI) in the ClientHello"
    try:
        named = rules.normalize_host(hello.sni)
    except ValueError:
        named = None
    if named != host:
        return f"SNI {printable(hello.sni)} does not name {host}"
    return None


class SplicedTunnel(layers.TCPLayer):
    """Relays bytes both ways without keeping them (no flow); closes when `refusal` says why."""

    def __init__(self, context: Context, refusal: Callable[[], str | None]) -> None:
        super().__init__(context, ignore=True)
        self.refusal = refusal  # None while the tunnel may stay open

    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        if (
            isinstance(event, events.DataReceived)
            and event.connection == self.context.client
            and self.refusal() is not None
        ):
            for connection in (self.context.server, self.context.client):
                if connection.state is not ConnectionState.CLOSED:
                    yield commands.CloseConnection(connection)
            self._handle_event = self.done
            return
        yield from super().relay_messages(event)
