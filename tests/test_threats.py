"""Every vector of the threat model, against the real proxy; proof is what reached the upstream."""

from __future__ import annotations

import socket
import ssl

import pytest

from tests.conftest import (
    ProxyFactory,
    ProxyProcess,
    curl,
    open_tunnel,
    read_head,
    read_response,
    read_until_closed,
    send_connect,
)
from tests.support.h2 import h2_request, h2_tunnel
from tests.support.net import REFUSED_CONNECTS
from tests.upstream import Upstream


@pytest.mark.parametrize("authority", REFUSED_CONNECTS, ids=lambda a: a.decode(errors="replace"))
def test_refused_connect_never_reaches_upstream(
    proxy: ProxyProcess, upstream: Upstream, authority: bytes
) -> None:
    sock = send_connect(proxy, authority)
    head = read_head(sock)
    sock.close()
    status_line = head.split(b"\r\n", 1)[0]
    assert status_line.split()[1] in (b"400", b"403"), head
    assert upstream.seen.connections == 0


def test_refusal_says_why_and_where_the_allowlist_lives(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    result = curl(proxy, "-i", "https://mozilla.org/")
    assert "CONNECT tunnel failed, response 403" in result.stderr
    assert "x-claude-proxy: refused" in result.stdout.lower()
    assert 'details="mozilla.org is not on the allowlist"' in result.stdout
    sock = send_connect(proxy, b"mozilla.org:443")
    body = read_response(sock)[1].decode()
    sock.close()
    assert body.startswith(
        "claude-proxy refused mozilla.org:443: mozilla.org is not on the allowlist"
    )
    assert "sandbox's policy, not a network fault: do not retry another way" in body
    config = proxy.home / ".config" / "claude-proxy" / "config.toml"
    assert f"The policy is {config} and the built-in defaults;" in body
    assert upstream.seen.connections == 0


def test_refusal_of_head_has_no_body(proxy: ProxyProcess, upstream: Upstream) -> None:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(b"HEAD http://mozilla.org/ HTTP/1.1\r\nHost: mozilla.org\r\n\r\n")
    head = read_head(sock)
    assert head.startswith(b"HTTP/1.1 403")
    assert b"content-length: 0" in head.lower()
    # Nothing follows the head: the next bytes are the answer to the next request (or the end).
    sock.sendall(b"HEAD http://mozilla.org/ HTTP/1.1\r\nHost: mozilla.org\r\n\r\n")
    after = read_head(sock)
    assert after == b"" or after.startswith(b"HTTP/1.1 403"), after
    sock.close()
    assert upstream.seen.connections == 0


def test_allowed_host_goes_through(proxy: ProxyProcess, upstream: Upstream) -> None:
    result = curl(proxy, "https://api.anthropic.com/v1/models")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from upstream\n"
    assert upstream.seen.requests == [("GET", "/v1/models", "api.anthropic.com")]
    assert upstream.seen.snis == ["api.anthropic.com"]


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n",  # plain HTTP
        b"SSH-2.0-OpenSSH_9.6\r\n",  # an SSH banner
        b"\x16\x03\x01\x00\x05\x00\x00\x00\x00\x00",  # a TLS record that is no ClientHello
    ],
    ids=["http", "ssh", "bad-tls"],
)
def test_raw_bytes_in_allowed_tunnel_close_it(
    proxy: ProxyProcess, upstream: Upstream, raw: bytes
) -> None:
    sock = send_connect(proxy, b"api.anthropic.com:443")
    assert read_head(sock).startswith(b"HTTP/1.1 200")
    sock.sendall(raw)
    assert read_until_closed(sock) == b""
    assert upstream.seen.connections == 0


@pytest.mark.parametrize("sni", ["evil.example", "claude.ai", "api.anthropic.com.evil.example"])
def test_sni_must_name_the_connect_host(proxy: ProxyProcess, upstream: Upstream, sni: str) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):  # closed; a hang (TimeoutError) fails
        open_tunnel(proxy, "api.anthropic.com", sni=sni)
    assert upstream.seen.connections == 0


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: claude.ai\r\n\r\n",  # allowed, but not this tunnel's host
        b"GET / HTTP/1.1\r\nHost: api.anthropic.com:8443\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: api.anthropic.com\r\nHost: evil.example\r\n\r\n",
        b"GET https://evil.example/ HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n",
        b"GET https://claude.ai/ HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: evil.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    ],
    ids=[
        "host",
        "other-allowed-host",
        "host-port",
        "two-hosts",
        "absolute",
        "absolute-allowed",
        "websocket",
    ],
)
def test_request_naming_another_host_in_tunnel(
    proxy: ProxyProcess, upstream: Upstream, request_head: bytes
) -> None:
    tls = open_tunnel(proxy, "api.anthropic.com")
    tls.sendall(request_head)
    head = read_head(tls)
    tls.close()
    assert head.startswith(b"HTTP/1.1 403"), head
    assert b"x-claude-proxy: refused" in head.lower()
    assert upstream.seen.requests == []


def test_second_request_on_kept_alive_tunnel_naming_another_host(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    tls = open_tunnel(proxy, "api.anthropic.com")
    tls.sendall(b"GET /first HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n")
    first = read_head(tls)
    assert first.startswith(b"HTTP/1.1 200"), first
    tls.recv(65536)  # the body, if it came separately
    tls.sendall(b"GET /second HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    second = read_head(tls)
    tls.close()
    assert b"403" in second.split(b"\r\n")[0] or b"HTTP/1.1 403" in second, second
    assert upstream.seen.requests == [("GET", "/first", "api.anthropic.com")]


@pytest.mark.parametrize(
    ("authority", "status", "reached"),
    [("evil.example", 403, 0), ("claude.ai", 403, 0), ("api.anthropic.com", 200, 1)],
)
def test_http2_authority_must_name_the_connect_host(
    proxy: ProxyProcess, upstream: Upstream, authority: str, status: int, reached: int
) -> None:
    tls = h2_tunnel(proxy)
    assert h2_request(tls, authority) == status
    tls.close()
    assert len(upstream.seen.requests) == reached
    if reached:
        assert upstream.seen.requests[0][2] == "api.anthropic.com"


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET http://evil.example/ HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n",
        b"GET http://api.anthropic.com:443/ HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        b"GET http://api.anthropic.com/ HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n",  # port 80
        b"GET http://mitm.it/ HTTP/1.1\r\nHost: mitm.it\r\n\r\n",
        b"GET http://127.0.0.1:443/ HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n",  # origin-form, the Host names the target
    ],
    ids=["url-evil", "host-evil", "port-80", "onboarding", "ip-url", "origin-form"],
)
def test_plain_http_requests(proxy: ProxyProcess, upstream: Upstream, request_head: bytes) -> None:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(request_head)
    head = read_head(sock)
    sock.close()
    assert head.split(b" ")[1] in (b"400", b"403"), head
    assert upstream.seen.connections == 0


def test_garbage_to_the_listener_is_refused_and_others_still_served(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    for garbage in (b"\x00\xff\xfe garbage\r\n\r\n", b"\x16\x03\x01\x00\x05hello", b"\r\n" * 50):
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        sock.sendall(garbage)
        sock.shutdown(socket.SHUT_WR)
        read_until_closed(sock)
        sock.close()
    assert upstream.seen.connections == 0
    result = curl(proxy, "https://api.anthropic.com/still-serving")
    assert result.returncode == 0, result.stderr
    assert upstream.seen.requests == [("GET", "/still-serving", "api.anthropic.com")]


def test_websocket_to_allowed_host_works(proxy: ProxyProcess, upstream: Upstream) -> None:
    tls = open_tunnel(proxy, "api.anthropic.com")
    tls.sendall(
        b"GET /ws HTTP/1.1\r\nHost: api.anthropic.com\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    head = read_head(tls)
    assert head.startswith(b"HTTP/1.1 101"), head
    mask = b"\x01\x02\x03\x04"
    payload = b"ping"
    tls.sendall(
        bytes([0x81, 0x80 | len(payload)])
        + mask
        + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    )
    echoed = tls.recv(2 + len(payload))
    tls.close()
    assert echoed == bytes([0x81, len(payload)]) + payload
    assert upstream.seen.requests == [("GET", "/ws", "api.anthropic.com")]


def test_no_upstream_connection_before_a_request_passes(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """An allowed CONNECT and a finished TLS handshake still open nothing upstream."""
    tls = open_tunnel(proxy, "api.anthropic.com")
    assert tls.version() is not None
    tls.sendall(b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert read_head(tls).startswith(b"HTTP/1.1 403")
    tls.close()
    assert upstream.seen.connections == 0


@pytest.mark.parametrize(
    "authority", [b"claude.ai:443", b"api.anthropic.com:443", b"evil.example:443"]
)
def test_connect_inside_a_tunnel_is_refused(
    proxy: ProxyProcess, upstream: Upstream, authority: bytes
) -> None:
    tls = open_tunnel(proxy, "api.anthropic.com")
    tls.sendall(b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n\r\n")
    head = read_head(tls)
    tls.close()
    assert head.split(b" ")[1] in (b"400", b"403"), head  # mitmproxy refuses it first (400)
    assert upstream.seen.connections == 0


@pytest.mark.parametrize("tunnel", [False, True], ids=["plain-http", "in-tunnel"])
@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: 50000000", b"Transfer-Encoding: chunked"],
    ids=["length", "chunked"],
)
def test_refused_upload_is_not_read(
    proxy: ProxyProcess, upstream: Upstream, tunnel: bool, framing: bytes
) -> None:
    """A large body to a refused destination is cut off, not buffered until it ends."""
    if tunnel:
        sock: socket.socket = open_tunnel(proxy, "api.anthropic.com")
        target = b"/"
    else:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        target = b"http://evil.example/"
    sock.sendall(b"POST " + target + b" HTTP/1.1\r\nHost: evil.example\r\n" + framing + b"\r\n\r\n")
    sock.sendall(b"x" * 4096)  # the rest never comes: a proxy that waits for it never answers
    sock.settimeout(5)
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except (ConnectionError, ssl.SSLError):
        pass  # reset: closed without reading the body, fine
    except TimeoutError:
        pytest.fail(f"the proxy is still reading the refused body (answered {answer[:40]!r})")
    finally:
        sock.close()
    assert answer == b"" or answer.startswith(b"HTTP/1.1 403"), answer
    assert upstream.seen.connections == 0


@pytest.fixture(scope="module")
def idna_proxy(module_proxy: ProxyFactory) -> ProxyProcess:
    return module_proxy("--allow", "bücher.example")


def test_a_unicode_rule_matches_the_a_label_clients_send(
    idna_proxy: ProxyProcess, upstream: Upstream
) -> None:
    sock = send_connect(idna_proxy, b"xn--bcher-kva.example:443")
    head = read_head(sock)
    assert head.startswith(b"HTTP/1.1 200"), head
    context = idna_proxy.client_context()
    context.set_alpn_protocols(["h2"])
    tls = context.wrap_socket(sock, server_hostname="xn--bcher-kva.example")
    assert tls.selected_alpn_protocol() == "h2"
    assert h2_request(tls, "xn--bcher-kva.example") != 403  # :authority names the tunnel's host
    tls.close()
    assert "BLOCK" not in idna_proxy.log_text()
