"""SOCKS5 gets the same enforcement as CONNECT; both loopback addresses are served."""

from __future__ import annotations

import socket
import ssl

import pytest

from claude_proxy.cli.probes import read_exactly
from tests.conftest import ProxyProcess, curl, read_head, read_until_closed
from tests.support.net import REFUSED_CONNECTS, this_machines_address
from tests.support.socks import (
    COMMAND_NOT_SUPPORTED,
    NO_ACCEPTABLE_METHOD,
    NOT_ALLOWED,
    SUCCEEDED,
    socks_connect,
    socks_request,
    socks_tunnel,
)
from tests.upstream import Upstream


def test_allowed_destination_through_socks(proxy: ProxyProcess, upstream: Upstream) -> None:
    tls = socks_tunnel(proxy, "api.anthropic.com")
    tls.sendall(b"GET /via-socks HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\n\r\n")
    answer = read_until_closed(tls)
    tls.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert upstream.seen.requests == [("GET", "/via-socks", "api.anthropic.com")]
    assert upstream.seen.snis == ["api.anthropic.com"]


def test_curl_socks5_hostname(proxy: ProxyProcess, upstream: Upstream) -> None:
    result = curl(
        proxy, "--proxy", f"socks5h://127.0.0.1:{proxy.socks_port}", "https://claude.ai/socks"
    )
    assert result.returncode == 0, result.stderr
    assert upstream.seen.requests == [("GET", "/socks", "claude.ai")]


def socks_target(authority: bytes) -> tuple[str, int]:
    text = authority.decode("utf-8")
    host, _, port = text.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


@pytest.mark.parametrize("authority", REFUSED_CONNECTS, ids=lambda a: a.decode(errors="replace"))
def test_refused_target_gets_not_allowed(
    proxy: ProxyProcess, upstream: Upstream, authority: bytes
) -> None:
    host, port = socks_target(authority)
    sock, code = socks_connect(proxy, host, port)
    assert code == NOT_ALLOWED
    assert read_until_closed(sock) == b""
    sock.close()
    assert upstream.seen.connections == 0


def test_refusal_is_logged_with_the_reason(proxy: ProxyProcess, upstream: Upstream) -> None:
    sock, code = socks_connect(proxy, "mozilla.org")
    sock.close()
    assert code == NOT_ALLOWED
    assert 'BLOCK SOCKS5 mozilla.org:443 - - "mozilla.org is not on the allowlist"' in (
        proxy.log_text()
    )


@pytest.mark.parametrize(
    "raw",
    [b"GET / HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n", b"SSH-2.0-OpenSSH_9.6\r\n"],
    ids=["http", "ssh"],
)
def test_non_tls_to_an_allowed_host_closes(
    proxy: ProxyProcess, upstream: Upstream, raw: bytes
) -> None:
    sock, code = socks_connect(proxy, "api.anthropic.com")
    assert code == SUCCEEDED
    sock.sendall(raw)
    assert read_until_closed(sock) == b""
    sock.close()
    assert upstream.seen.connections == 0


@pytest.mark.parametrize("sni", ["evil.example", "claude.ai"])
def test_sni_must_name_the_socks_target(proxy: ProxyProcess, upstream: Upstream, sni: str) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        socks_tunnel(proxy, "api.anthropic.com", sni=sni)
    assert upstream.seen.connections == 0


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: claude.ai\r\n\r\n",
        b"GET https://evil.example/ HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n",
    ],
    ids=["host", "other-allowed-host", "absolute"],
)
def test_request_naming_another_host_in_a_socks_tunnel(
    proxy: ProxyProcess, upstream: Upstream, head: bytes
) -> None:
    tls = socks_tunnel(proxy, "api.anthropic.com")
    tls.sendall(head)
    answer = read_head(tls)
    tls.close()
    assert answer.startswith(b"HTTP/1.1 403"), answer
    assert upstream.seen.requests == []


@pytest.mark.parametrize(("command", "name"), [(2, "bind"), (3, "udp-associate")])
def test_bind_and_udp_associate_are_not_supported(
    proxy: ProxyProcess, upstream: Upstream, command: int, name: str
) -> None:
    sock, code = socks_connect(proxy, "api.anthropic.com", 443, command)
    sock.close()
    assert code == COMMAND_NOT_SUPPORTED, name
    assert upstream.seen.connections == 0


def test_username_password_is_refused(proxy: ProxyProcess, upstream: Upstream) -> None:
    sock = socket.create_connection(("127.0.0.1", proxy.socks_port), timeout=10)
    sock.sendall(b"\x05\x01\x02")  # only username/password
    assert read_exactly(sock, 2) == bytes([5, NO_ACCEPTABLE_METHOD])
    read_until_closed(sock)  # mitmproxy pads the answer; what matters is that it closes
    sock.close()
    assert upstream.seen.connections == 0


@pytest.mark.parametrize("listener", ["http", "socks"])
def test_ipv6_loopback_is_served(proxy: ProxyProcess, upstream: Upstream, listener: str) -> None:
    if socket.has_ipv6 is False:
        pytest.skip("no IPv6 on this machine")
    port = proxy.port if listener == "http" else proxy.socks_port
    sock = socket.create_connection(("::1", port), timeout=10)
    if listener == "http":
        sock.sendall(b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n")
        assert read_head(sock).startswith(b"HTTP/1.1 200")
    else:
        sock.sendall(b"\x05\x01\x00")
        assert read_exactly(sock, 2) == b"\x05\x00"
        sock.sendall(socks_request("api.anthropic.com", 443))
        assert read_exactly(sock, 10)[1] == SUCCEEDED
    context = proxy.client_context()
    tls = context.wrap_socket(sock, server_hostname="api.anthropic.com")
    tls.sendall(b"GET /v6 HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\n\r\n")
    assert read_until_closed(tls).startswith(b"HTTP/1.1 200")
    tls.close()
    assert upstream.seen.requests == [("GET", "/v6", "api.anthropic.com")]


def test_other_addresses_of_this_machine_are_not_listened_on(proxy: ProxyProcess) -> None:
    own = this_machines_address()
    if own is None:
        pytest.skip("this machine has no non-loopback address")
    for port in (proxy.port, proxy.socks_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((own, port), timeout=10)


def test_a_connect_to_the_socks_port_is_not_http(proxy: ProxyProcess, upstream: Upstream) -> None:
    raw = socket.create_connection(("127.0.0.1", proxy.socks_port), timeout=10)
    raw.sendall(b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n")
    assert read_until_closed(raw) == b""
    raw.close()
    assert upstream.seen.connections == 0
