"""Pass-through tunnels (`inspect = false`): the client's own TLS, relayed and never decrypted.

For clients that pin their roots or present client certificates. The destination is decided on
the CONNECT (or SOCKS5) target; the ClientHello must then name that same host in its SNI, in the
clear: a hello without one, or one that hides it (Encrypted Client Hello), is refused. After that
the proxy sees nothing but bytes (mitmproxy's TCP layer relays them and keeps none); a new policy
that no longer passes the destination through closes the tunnel at once (Enforcer.close_refused).
"""

from __future__ import annotations

from mitmproxy import tls

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
