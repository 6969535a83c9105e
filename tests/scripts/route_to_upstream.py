"""Test-only mitmproxy script: names resolve to made-up public addresses, sockets go upstream.

Like an /etc/hosts entry for every name: every name resolves (through the system resolver the
proxy checks) to 203.0.113.10, or to what CLAUDE_PROXY_TEST_RESOLVE says (`name=ip;name=ip,ip`;
`name=` alone: the name does not resolve); then every upstream TCP connection goes to the local
test upstream, or to the loopback port CLAUDE_PROXY_TEST_ROUTE names for its host
(`name=port;name=port`). The proxy keeps the real destination everywhere (its checks, SNI, Host,
logs); only the socket connects to 127.0.0.1. Routing every host here means a leak to any host
would be counted by the upstream.
"""

import asyncio
import ipaddress
import os
import socket
from typing import Any

UPSTREAM = ("127.0.0.1", int(os.environ["CLAUDE_PROXY_TEST_UPSTREAM_PORT"]))
# host:port destinations left alone (the benchmark's "blocked" one), comma-separated
UNROUTED = set(filter(None, os.environ.get("CLAUDE_PROXY_TEST_UNROUTED", "").split(",")))
PUBLIC = "203.0.113.10"  # TEST-NET-3: never a real host; the one range made "public" below
RESOLVE = {
    name: addresses.split(",")
    for name, _, addresses in (
        entry.partition("=")
        for entry in os.environ.get("CLAUDE_PROXY_TEST_RESOLVE", "").split(";")
        if entry
    )
}
ROUTES = {
    name: int(port)
    for name, _, port in (
        entry.partition("=")
        for entry in os.environ.get("CLAUDE_PROXY_TEST_ROUTE", "").split(";")
        if entry
    )
}
_open_connection = asyncio.open_connection
_getaddrinfo = socket.getaddrinfo


def _fake_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
    name = host.decode() if isinstance(host, bytes) else host
    if name is None or _is_ip(name) or kwargs.get("flags", 0) & socket.AI_PASSIVE:
        return _getaddrinfo(host, port, *args, **kwargs)
    result = []
    if RESOLVE.get(name) == [""]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    for address in RESOLVE.get(name, [PUBLIC]):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sockaddr = (address, int(port or 0), 0, 0) if ":" in address else (address, int(port or 0))
        result.append((family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
    return result


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


async def _to_upstream(host: Any = None, port: Any = None, **kwargs: Any) -> Any:
    if f"{host}:{port}" in UNROUTED:
        return await _open_connection(host, port, **kwargs)
    if not _is_ip(str(host)):
        # Resolve as asyncio would before connecting: the proxy's check of the addresses runs here.
        await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return await _open_connection("127.0.0.1", ROUTES.get(str(host), UPSTREAM[1]), **kwargs)


def running() -> None:
    asyncio.open_connection = _to_upstream
    socket.getaddrinfo = _fake_getaddrinfo
    _treat_as_public(PUBLIC)


def _treat_as_public(address: str) -> None:
    """The test-only setting: the proxy refuses documentation ranges, so the made-up public
    address's own range is taken out of its list of forbidden networks, in this process only."""
    try:
        from claude_proxy.policy import addresses
    except ImportError:  # a build from before the subpackages (scripts/bench.py --before)
        from claude_proxy import addresses  # type: ignore[no-redef]

    ip = ipaddress.ip_address(address)
    addresses.FORBIDDEN_NETWORKS = tuple(
        (network, why) for network, why in addresses.FORBIDDEN_NETWORKS if ip not in network
    )


def done() -> None:
    asyncio.open_connection = _open_connection
    socket.getaddrinfo = _getaddrinfo
