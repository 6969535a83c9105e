"""Test-only mitmproxy script: a drain lasts CLAUDE_PROXY_TEST_DRAIN seconds, not ten."""

import os

from claude_proxy.proxy import service

_drain = service.drain
SECONDS = float(os.environ.get("CLAUDE_PROXY_TEST_DRAIN", "1"))


async def _quick(m: object, enforcer: object, connections: object, seconds: float) -> None:
    await _drain(m, enforcer, connections, SECONDS)  # type: ignore[arg-type]


service.drain = _quick  # type: ignore[assignment]
