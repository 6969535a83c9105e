"""Test-only mitmproxy script: every upstream TCP connection goes to the local test upstream.

Like an /etc/hosts entry for every name: the proxy keeps the real destination everywhere (its
checks, SNI, Host, logs); only the socket connects to 127.0.0.1. Routing every host here means a
leak to any host would be counted by the upstream.
"""

import asyncio
import os
from typing import Any

UPSTREAM = ("127.0.0.1", int(os.environ["CLAUDE_PROXY_TEST_UPSTREAM_PORT"]))
# host:port destinations left alone (the benchmark's "blocked" one), comma-separated
UNROUTED = set(filter(None, os.environ.get("CLAUDE_PROXY_TEST_UNROUTED", "").split(",")))
_open_connection = asyncio.open_connection


async def _to_upstream(host: Any = None, port: Any = None, **kwargs: Any) -> Any:
    if f"{host}:{port}" in UNROUTED:
        return await _open_connection(host, port, **kwargs)
    return await _open_connection(*UPSTREAM, **kwargs)


def running() -> None:
    asyncio.open_connection = _to_upstream


def done() -> None:
    asyncio.open_connection = _open_connection
