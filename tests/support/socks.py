"""A SOCKS5 client for the tests."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import struct

from claude_proxy.cli.probes import read_exactly
from tests.conftest import ProxyProcess

SUCCEEDED, NOT_ALLOWED, COMMAND_NOT_SUPPORTED, NO_ACCEPTABLE_METHOD = 0x00, 0x02, 0x07, 0xFF


def socks_request(host: str, port: int, command: int = 1) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        encoded = host.encode()
        target = b"\x03" + bytes([len(encoded)]) + encoded
    else:
        target = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
    return b"\x05" + bytes([command]) + b"\x00" + target + struct.pack("!H", port)


def socks_connect(
    proxy: ProxyProcess, host: str, port: int = 443, command: int = 1
) -> tuple[socket.socket, int]:
    """Greet without authentication, ask for host:port; the socket and the reply code."""
    sock = socket.create_connection(("127.0.0.1", proxy.socks_port), timeout=10)
    sock.sendall(b"\x05\x01\x00")
    assert read_exactly(sock, 2) == b"\x05\x00"
    sock.sendall(socks_request(host, port, command))
    reply = read_exactly(sock, 10)
    assert len(reply) == 10 and reply[0] == 5, reply
    return sock, reply[1]


def socks_tunnel(proxy: ProxyProcess, host: str, sni: str | None = None) -> ssl.SSLSocket:
    sock, code = socks_connect(proxy, host)
    assert code == SUCCEEDED
    context = proxy.client_context()
    context.set_alpn_protocols(["http/1.1"])
    return context.wrap_socket(sock, server_hostname=sni or host)
