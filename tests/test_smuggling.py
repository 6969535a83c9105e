"""Requests the proxy never checked must not ride inside one it did.

Each test sends, through an allowed tunnel, a request that tries to make the upstream see a second
request (or raw bytes) naming evil.example. The proof is the upstream's record of every byte it
read, taken after the upstream has finished reading every connection (`wait_idle`).
"""

from __future__ import annotations

import socket

import h2.config
import h2.connection
import h2.events
import pytest

from tests.conftest import ProxyProcess, open_tunnel, read_head, send_connect
from tests.upstream import Upstream

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: evil.example\r\n\r\n"


def assert_nothing_smuggled(upstream: Upstream) -> None:
    upstream.wait_idle()
    assert b"evil.example" not in upstream.seen.raw, bytes(upstream.seen.raw)
    assert all(host == "api.anthropic.com" for _, _, host in upstream.seen.requests)


class H2Tunnel:
    """An HTTP/2 connection inside an allowed tunnel; the client skips its own header checks."""

    def __init__(self, proxy: ProxyProcess) -> None:
        sock = send_connect(proxy, b"api.anthropic.com:443")
        assert read_head(sock).startswith(b"HTTP/1.1 200")
        context = proxy.client_context()
        context.set_alpn_protocols(["h2"])
        self.tls = context.wrap_socket(sock, server_hostname="api.anthropic.com")
        assert self.tls.selected_alpn_protocol() == "h2"
        config = h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        self.tls.sendall(self.conn.data_to_send())

    def request(
        self, headers: list[tuple[str, str]], body: bytes | None = None, stream_id: int = 1
    ) -> int | None:
        """Send one request; the response status, or None when the stream or connection ends."""
        self.conn.send_headers(stream_id, headers, end_stream=body is None)
        if body is not None:
            self.conn.send_data(stream_id, body, end_stream=True)
        self.flush()
        return self.response()

    def response(self) -> int | None:
        status = None
        while True:
            data = self.tls.recv(65536)
            if not data:
                return status
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    self.flush()
                    return status
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return status
            self.flush()

    def close(self) -> None:
        self.tls.close()


def h2_headers(method: str = "POST", path: str = "/upload", **extra: str) -> list[tuple[str, str]]:
    headers = [
        (":method", method),
        (":scheme", "https"),
        (":authority", "api.anthropic.com"),
        (":path", path),
    ]
    return headers + [(name.replace("_", "-"), value) for name, value in extra.items()]


def test_h2_body_without_content_length_is_framed_for_an_http1_upstream(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """HTTP/2 → HTTP/1.1 without framing would let the body be read as the next request."""
    tunnel = H2Tunnel(proxy)
    assert tunnel.request(h2_headers(), body=SMUGGLED) == 200
    tunnel.close()
    upstream.wait_idle()  # the smuggled bytes arrive inside the body: it must stay one
    assert upstream.seen.requests == [("POST", "/upload", "api.anthropic.com")]
    assert upstream.seen.bodies == [SMUGGLED]


def test_h2_body_with_content_length_still_goes_through(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    tunnel = H2Tunnel(proxy)
    headers = h2_headers(content_length=str(len(b"payload")))
    assert tunnel.request(headers, body=b"payload") == 200
    tunnel.close()
    upstream.wait_idle()
    assert upstream.seen.bodies == [b"payload"]


@pytest.mark.parametrize(
    "headers",
    [
        h2_headers("GET", "https://evil.example/x"),  # absolute URL in :path
        h2_headers("GET", "http://evil.example/x"),
        h2_headers("GET", "//evil.example/x"),
        h2_headers("GET", "/a HTTP/1.1\x0bHost: evil.example"),
        h2_headers("GET", "/ http://evil.example/"),  # a space splits the request line
        h2_headers("GET", "*"),  # asterisk-form is for OPTIONS only
        h2_headers("GET http://evil.example/", "/"),  # a method with a space
        h2_headers("GET", "/", x_note="a\rHost: evil.example"),  # a bare CR in a value
        h2_headers("GET", "/", x_note="a\x00Host: evil.example"),
        h2_headers("GET", "/", **{"x-note\rhost": "evil.example"}),  # and in a name
    ],
    ids=[
        "absolute-path",
        "absolute-http",
        "scheme-relative",
        "control-in-path",
        "space-in-path",
        "asterisk",
        "method-space",
        "cr-value",
        "nul-value",
        "cr-name",
    ],
)
def test_h2_request_that_would_not_convert_safely_is_refused(
    proxy: ProxyProcess, upstream: Upstream, headers: list[tuple[str, str]]
) -> None:
    tunnel = H2Tunnel(proxy)
    status = tunnel.request(headers)
    tunnel.close()
    assert status in (400, 403, None)
    assert_nothing_smuggled(upstream)
    assert upstream.seen.requests == []


def h1_in_tunnel(proxy: ProxyProcess, raw: bytes) -> bytes:
    tls = open_tunnel(proxy, "api.anthropic.com")
    tls.sendall(raw)
    head = read_head(tls)
    tls.close()
    return head


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: api.anthropic.com\r\nX-Note: a\rHost: evil.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: api.anthropic.com\r\nX-Note: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: api.anthropic.com\r\nX-Note: a\x7fb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: api.anthropic.com\r\nX-Note: a\r\n Host: evil.example\r\n\r\n",
        b"PRI * HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: 6\r\n\r\nSM\r\n\r\n",
        b"OPTIONS http://evil.example/ HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n",
    ],
    ids=["bare-cr", "nul", "del", "obs-fold", "pri", "absolute-options"],
)
def test_h1_request_with_control_characters_or_a_preface_is_refused(
    proxy: ProxyProcess, upstream: Upstream, raw: bytes
) -> None:
    head = h1_in_tunnel(proxy, raw)
    assert head.split(b" ", 2)[1] in (b"400", b"403"), head
    assert_nothing_smuggled(upstream)
    assert upstream.seen.connections == 0


def test_upgrade_to_anything_but_websocket_never_becomes_a_raw_relay(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """The upstream would agree to any upgrade; the proxy must not offer it one."""
    tls = open_tunnel(proxy, "api.anthropic.com")
    tls.sendall(
        b"GET /switch HTTP/1.1\r\nHost: api.anthropic.com\r\nUpgrade: tcp\r\n"
        b"Connection: Upgrade\r\n\r\n"
    )
    head = read_head(tls)
    assert not head.startswith(b"HTTP/1.1 101"), head
    tls.sendall(SMUGGLED)  # after a 101 this would be relayed raw
    tls.close()
    assert_nothing_smuggled(upstream)
    assert all("upgrade" not in headers for headers in upstream.seen.headers)


def test_h2c_upgrade_headers_never_reach_the_upstream(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    head = h1_in_tunnel(
        proxy,
        b"POST /up HTTP/1.1\r\nHost: api.anthropic.com\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Content-Length: 5\r\n\r\nhello",
    )
    assert head.startswith(b"HTTP/1.1 200"), head
    upstream.wait_idle()
    assert upstream.seen.bodies == [b"hello"]
    (headers,) = upstream.seen.headers
    assert "upgrade" not in headers and "http2-settings" not in headers


@pytest.mark.parametrize(
    "raw",
    [
        b"GET http://api.anthropic.com:443/ HTTP/1.1\r\nHost: api.anthropic.com:443\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: api.anthropic.com:443\r\n\r\n",  # origin-form, Host names it
        b"POST http://claude.ai:443/ HTTP/1.1\r\nHost: claude.ai:443\r\n"
        b"Content-Length: 2\r\n\r\nhi",
    ],
    ids=["absolute", "origin-form", "post"],
)
def test_cleartext_to_an_allowed_https_destination_is_refused(
    proxy: ProxyProcess, upstream: Upstream, raw: bytes
) -> None:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(raw)
    head = read_head(sock)
    sock.close()
    assert head.startswith(b"HTTP/1.1 403"), head
    assert b"cleartext" in head
    assert upstream.seen.connections == 0


def test_websocket_upgrade_still_works_after_the_checks(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    tls = open_tunnel(proxy, "api.anthropic.com")
    tls.sendall(
        b"GET /ws HTTP/1.1\r\nHost: api.anthropic.com\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    assert read_head(tls).startswith(b"HTTP/1.1 101")
    tls.close()


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"Content-Length: 5\r\nContent-Length: 48\r\n",
        b"Content-Length: +5\r\n",
        b"Transfer-Encoding: xchunked\r\n",
        b"Transfer-Encoding: chunked, identity\r\n",
        b"Transfer-Encoding: identity, chunked\r\n",
        b"Transfer-Encoding : chunked\r\n",
    ],
    ids=["cl-te", "te-cl", "two-cl", "plus-cl", "xchunked", "chunked-identity", "te-list", "space"],
)
def test_ambiguous_h1_framing_is_refused(
    proxy: ProxyProcess, upstream: Upstream, framing: bytes
) -> None:
    body = b"0\r\n\r\n" + SMUGGLED
    tls = open_tunnel(proxy, "api.anthropic.com")
    tls.sendall(b"POST /up HTTP/1.1\r\nHost: api.anthropic.com\r\n" + framing + b"\r\n" + body)
    head = read_head(tls)
    tls.close()
    assert head.split(b" ", 2)[1] in (b"400", b"403", b"501"), head
    assert_nothing_smuggled(upstream)


def test_h2_trailers_to_an_http1_upstream_are_dropped_without_a_crash(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    tunnel = H2Tunnel(proxy)
    headers = h2_headers(content_length="2")
    tunnel.conn.send_headers(1, headers)
    tunnel.conn.send_data(1, b"hi")
    tunnel.conn.send_headers(1, [("x-trailer", "a")], end_stream=True)
    tunnel.flush()
    status = tunnel.response()
    tunnel.close()
    upstream.wait_idle()
    assert status == 200
    assert upstream.seen.bodies == [b"hi"]
    assert b"x-trailer" not in upstream.seen.raw
    assert "Unexpected event: RequestTrailers" not in proxy.log_text()


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: %d\r\n" % len(SMUGGLED), b"Transfer-Encoding: chunked\r\n"],
    ids=["length", "chunked"],
)
def test_h1_body_on_get_or_head_is_refused(
    proxy: ProxyProcess, upstream: Upstream, method: bytes, framing: bytes
) -> None:
    """Many servers ignore a GET body (RFC 9110 §9.3.1) and read it as the next request."""
    body = SMUGGLED if framing.startswith(b"Content") else b"2e\r\n" + SMUGGLED + b"\r\n0\r\n\r\n"
    head = h1_in_tunnel(
        proxy, method + b" / HTTP/1.1\r\nHost: api.anthropic.com\r\n" + framing + b"\r\n" + body
    )
    assert head == b"" or head.startswith(b"HTTP/1.1 400"), head
    assert_nothing_smuggled(upstream)
    assert upstream.seen.connections == 0


def test_h2_body_on_get_is_refused(proxy: ProxyProcess, upstream: Upstream) -> None:
    tunnel = H2Tunnel(proxy)
    status = tunnel.request(
        h2_headers("GET", "/", content_length=str(len(SMUGGLED))), body=SMUGGLED
    )
    tunnel.close()
    assert status in (400, None)
    assert_nothing_smuggled(upstream)
    assert upstream.seen.connections == 0


@pytest.mark.parametrize(
    "named", [b"Content-Length", b"transfer-encoding", b"Host", b"keep-alive, host"]
)
def test_connection_header_naming_framing_or_host_is_refused(
    proxy: ProxyProcess, upstream: Upstream, named: bytes
) -> None:
    """An intermediary that drops what Connection names would lose the framing or the Host."""
    head = h1_in_tunnel(
        proxy,
        b"POST /up HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: " + named + b"\r\n"
        b"Content-Length: 5\r\n\r\nhello",
    )
    assert head.startswith(b"HTTP/1.1 400"), head
    assert upstream.seen.connections == 0


def test_h2_get_with_data_and_no_length_is_refused(proxy: ProxyProcess, upstream: Upstream) -> None:
    """Without content-length only the frames say a body follows: it must not reach the upstream."""
    tunnel = H2Tunnel(proxy)
    status = tunnel.request(h2_headers("GET", "/"), body=SMUGGLED)
    tunnel.close()
    assert status in (400, None)
    assert_nothing_smuggled(upstream)
    assert upstream.seen.connections == 0


def test_refused_h2_upload_without_length_is_ended_before_its_body(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """The HTTP/2 kin of a chunked upload: a proxy that reads it all before refusing never ends."""
    tunnel = H2Tunnel(proxy)
    headers = h2_headers("POST", "/up")
    headers[2] = (":authority", "evil.example")
    tunnel.conn.send_headers(1, headers)  # no content-length, no END_STREAM: a body would follow
    tunnel.flush()
    ended = False
    while not ended:
        data = tunnel.tls.recv(65536)  # a proxy waiting for the body never answers: TimeoutError
        if not data:
            break
        for event in tunnel.conn.receive_data(data):
            ended = ended or isinstance(
                event,
                h2.events.StreamReset | h2.events.ResponseReceived | h2.events.ConnectionTerminated,
            )
        tunnel.flush()
    tunnel.close()
    assert upstream.seen.connections == 0


def test_h1_request_trailers_are_dropped_without_a_crash(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """mitmproxy's HTTP/1 reader raises on request trailers: a traceback, no answer, each time."""
    head = h1_in_tunnel(
        proxy,
        b"POST /up HTTP/1.1\r\nHost: api.anthropic.com\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 200"), head
    upstream.wait_idle()
    assert upstream.seen.bodies == [b"hello"]
    assert b"X-Trailer" not in upstream.seen.raw
    assert "HTTP trailers are not implemented" not in proxy.log_text()


@pytest.mark.parametrize(
    "header", [b"Proxy-Authorization: Bearer sk-ant-api03-secret", b"Proxy-Connection: keep-alive"]
)
def test_headers_meant_for_the_proxy_never_reach_the_origin(
    proxy: ProxyProcess, upstream: Upstream, header: bytes
) -> None:
    """Proxy-* headers are for the proxy: one carrying a credential must not ride along."""
    head = h1_in_tunnel(
        proxy, b"GET /p HTTP/1.1\r\nHost: api.anthropic.com\r\n" + header + b"\r\n\r\n"
    )
    assert head.startswith(b"HTTP/1.1 200"), head
    upstream.wait_idle()
    assert header.split(b":")[0].lower() not in bytes(upstream.seen.raw).lower()
