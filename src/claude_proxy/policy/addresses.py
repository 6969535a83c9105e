"""Which resolved addresses an allowed name may lead to. Pure Python, no mitmproxy.

An allowed name whose DNS an attacker controls (or a user's `*.corp.example`) can point at this
machine, the local network or a cloud metadata service; the proxy would then be a bridge from the
sandbox into them. Such addresses are refused unless a rule names the IP literal itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # asyncio costs a command that needs no proxy ~40 ms to import
    import asyncio
    import logging


def logger() -> logging.Logger:
    """This module's logger; logging is imported only when there is something to say (the
    commands that merely name these files start faster without it)."""
    import logging

    return logging.getLogger(__name__)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Each range with the name a refusal gives it. Documentation and benchmarking ranges are here
# too: no public host lives in them, and some networks use them for their own machines.
_FORBIDDEN: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "this network"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("198.18.0.0/15", "benchmarking"),
    ("2001:db8::/32", "documentation"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata lives here)"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.168.0.0/16", "private"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fc00::/7", "unique-local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)
FORBIDDEN_NETWORKS = tuple((ipaddress.ip_network(net), why) for net, why in _FORBIDDEN)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_SIIT = ipaddress.ip_network("::ffff:0:0:0/96")  # IPv4-translated (RFC 2765)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries: mapped, translated, compatible, NAT64, 6to4,
    Teredo."""
    found = []
    if ip.ipv4_mapped:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour:
        found.append(ip.sixtofour)
    if ip.teredo:
        found.extend(ip.teredo)
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64 or ip in _NAT64_LOCAL or ip in _SIIT or int(ip) >> 32 == 0:
        found.append(low32)
    return found


def forbidden(ip: IPAddress) -> str | None:
    """Why `ip` must not be connected to for a name, or None when it may."""
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        candidates += embedded_ipv4(ip)
    for candidate in candidates:
        for network, why in FORBIDDEN_NETWORKS:
            if candidate.version == network.version and candidate in network:
                return why if candidate is ip else f"{why}, embedded in {ip}"
    return None


def is_this_machine(ip: IPAddress) -> bool:
    """Whether `ip` is an address of this machine: only a local address can be bound."""
    import socket  # here: `check` and `env` need no socket module

    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(ip), 0))
        except OSError:
            return False
    return True


class ForbiddenAddress(OSError):
    """A name resolved to an address the proxy must not connect to."""


NOT_RESOLVED = "name not resolved: "  # starts the message of every failed upstream name lookup


class NameNotResolved(OSError):  # as socket.gaierror is; socket loads only when used
    """An upstream name lookup failed. mitmproxy keeps only an error's message, and the platform's
    own (`[Errno 8] …` on macOS) cannot be told from a connect error's: this one says what it is."""


def check_resolved(host: str, infos: list[Any]) -> None:
    """Raise ForbiddenAddress when any address `host` resolved to is forbidden."""
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        why = forbidden(ip)
        if why is None and is_this_machine(ip):
            why = "an address of this machine"
        if why is not None:
            raise ForbiddenAddress(
                f"claude-proxy: {host} resolves to {ip} ({why}); only a rule naming that IP "
                "literal allows it"
            )


def install_checked_resolver(loop: asyncio.AbstractEventLoop) -> None:
    """Every outbound name lookup on `loop` is checked; the connection uses what was checked.

    asyncio connects to the addresses its own lookup returned, so checking inside the lookup
    leaves no second lookup to rebind. Lookups for listening (AI_PASSIVE) are left alone; IP
    literals never reach the resolver (and pass only where a rule names them).
    """
    import socket

    resolve: Callable[..., Awaitable[list[Any]]] = loop.getaddrinfo

    async def checked_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        flags = kwargs.get("flags", args[3] if len(args) > 3 else 0)
        outbound = host is not None and not flags & socket.AI_PASSIVE
        name = host.decode() if isinstance(host, bytes) else str(host)
        try:
            infos = await resolve(host, port, *args, **kwargs)
        except socket.gaierror as e:
            if not outbound:
                raise
            raise NameNotResolved(f"{NOT_RESOLVED}{name} ({e.strerror or e})") from e
        if outbound:
            try:
                check_resolved(name, infos)
            except ForbiddenAddress as e:
                logger().warning(
                    "BLOCK upstream connection: %s", str(e).removeprefix("claude-proxy: ")
                )
                raise
        return infos

    loop.getaddrinfo = checked_getaddrinfo  # type: ignore[method-assign]


def is_loopback(host: str) -> bool:
    """Whether `host` (a name, or an IP with or without a scope id) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback
