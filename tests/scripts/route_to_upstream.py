"""Test-only mitmproxy script: every upstream connection goes to the local test upstream.

The address is swapped only for the TCP connect and restored at once, so the proxy (and its
backstop, which runs before scripts) sees the real destination name everywhere else. Routing
every host here means a leak to any host would be counted by the upstream.
"""

import os

from mitmproxy.proxy import server_hooks

UPSTREAM = ("127.0.0.1", int(os.environ["CLAUDE_PROXY_TEST_UPSTREAM_PORT"]))
_original: dict[str, tuple[str, int]] = {}


def server_connect(data: server_hooks.ServerConnectionHookData) -> None:
    if data.server.address is not None and not data.server.error:
        _original[data.server.id] = data.server.address
        data.server.address = UPSTREAM


def server_connected(data: server_hooks.ServerConnectionHookData) -> None:
    if (address := _original.pop(data.server.id, None)) is not None:
        data.server.address = address


def server_connect_error(data: server_hooks.ServerConnectionHookData) -> None:
    server_connected(data)
