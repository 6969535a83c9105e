"""Where the proxy listens: both loopback addresses by default, one port each for HTTP and SOCKS5.

Claude Code's sandbox (Seatbelt's `localhost:PORT`, sandbox-runtime's `http://localhost:PORT`) may
reach the proxy on 127.0.0.1 or on ::1, so the default listens on both, with the same port.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

LOOPBACK_V4 = "127.0.0.1"
LOOPBACK_V6 = "::1"
PORT_TRIES = 20


def loopback_hosts() -> tuple[str, ...]:
    """127.0.0.1, and ::1 where this machine has IPv6 loopback."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind((LOOPBACK_V6, 0))
    except OSError as e:
        if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            return (LOOPBACK_V4,)
        raise
    return (LOOPBACK_V4, LOOPBACK_V6)


def common_free_port(hosts: Sequence[str]) -> int:
    """A port that is free on every one of `hosts` right now (what `--port 0` means)."""
    for _ in range(PORT_TRIES):
        held: list[socket.socket] = []
        try:
            port = 0
            for host in hosts:
                sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
                held.append(sock)
                sock.bind((host, port))
                port = sock.getsockname()[1]
            return port
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
        finally:
            for sock in held:
                sock.close()
    raise OSError(errno.EADDRINUSE, f"no port is free on all of {', '.join(hosts)}")


def mode_specs(hosts: Sequence[str], port: int, socks_port: int | None) -> list[str]:
    """mitmproxy `mode` values: a regular proxy (and SOCKS5) on each host, one port each.

    A port 0 is chosen here, free on every host: mitmproxy would take `host:0` twice (two hosts,
    or both listeners on one) as one address and refuse the second."""
    if port == 0:
        port = common_free_port(hosts)
    specs = [f"regular@{host}:{port}" for host in hosts]
    if socks_port is not None:
        if socks_port == 0:
            socks_port = common_free_port(hosts)
            while socks_port == port:  # free again: the HTTP listener does not hold it yet
                socks_port = common_free_port(hosts)
        specs += [f"socks5@{host}:{socks_port}" for host in hosts]
    return specs


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
