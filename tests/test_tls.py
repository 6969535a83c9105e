"""The TLS handshake with the client, against the real proxy: what it negotiates and refuses."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
import uuid

import pytest

from tests.conftest import ProxyProcess, curl, read_head, send_connect
from tests.support.h2 import h2_request
from tests.tlsclient import Answer, Hello, handshake, retry_handshake, wait_closed
from tests.upstream import Upstream

HOST = "api.anthropic.com"
ILLEGAL_PARAMETER, NO_APPLICATION_PROTOCOL = 47, 120


def tunnel(proxy: ProxyProcess) -> socket.socket:
    sock = send_connect(proxy, f"{HOST}:443".encode())
    assert read_head(sock).startswith(b"HTTP/1.1 200")
    return sock


def log_until_served(proxy: ProxyProcess, start: int) -> list[str]:
    """The proxy's log lines since `start`, up to a request that passed after them.

    The request proves the proxy still serves others; its own log line is the barrier that makes
    every earlier line of the attempt under test visible.
    """
    path = f"/still-serving-{uuid.uuid4().hex}"
    result = curl(proxy, f"https://{HOST}{path}")
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 10
    while not any(path in line for line in proxy.stderr[start:]):
        assert time.monotonic() < deadline, "the request's log line never came"
        time.sleep(0.02)
    return proxy.stderr[start:]


def assert_one_clean_line(lines: list[str], needle: str) -> None:
    assert not any("Traceback" in line or "has crashed" in line for line in lines), lines
    assert sum(needle in line for line in lines) == 1, lines


# Hole: SNI and ALPN used upstream come from the first hello, OpenSSL answers the second.

CHANGED_SECOND_HELLOS = [
    pytest.param(Hello(HOST, [b"http/1.1"]), Hello(HOST, [b"h2"]), id="alpn-h1-to-h2"),
    pytest.param(Hello(HOST, [b"h2", b"http/1.1"]), Hello(HOST, [b"http/1.1"]), id="alpn-narrowed"),
    pytest.param(
        Hello(HOST, [b"http/1.1", b"h2"]), Hello(HOST, [b"h2", b"http/1.1"]), id="alpn-reordered"
    ),
    pytest.param(Hello(HOST, [b"http/1.1"]), Hello(HOST, None), id="alpn-dropped"),
    pytest.param(Hello(HOST, None), Hello(HOST, [b"h2"]), id="alpn-added"),
    pytest.param(Hello(HOST, [b"h2"]), Hello("evil.example", [b"h2"]), id="sni-other"),
    pytest.param(Hello(HOST, [b"h2"]), Hello(None, [b"h2"]), id="sni-dropped"),
    pytest.param(Hello(None, [b"h2"]), Hello(HOST, [b"h2"]), id="sni-added"),
]


@pytest.mark.parametrize("pipelined", [False, True], ids=["after-retry", "pipelined"])
@pytest.mark.parametrize(("first", "second"), CHANGED_SECOND_HELLOS)
def test_second_hello_must_repeat_sni_and_alpn(
    proxy: ProxyProcess, upstream: Upstream, first: Hello, second: Hello, pipelined: bool
) -> None:
    sock = tunnel(proxy)
    answer = retry_handshake(sock, first, second, pipelined=pipelined)
    assert answer == Answer("alert", alert=ILLEGAL_PARAMETER)
    assert wait_closed(sock) == b""
    sock.close()
    assert upstream.seen.connections == 0


@pytest.mark.parametrize("pipelined", [False, True], ids=["after-retry", "pipelined"])
@pytest.mark.parametrize(
    "hello",
    [Hello(HOST, [b"http/1.1"]), Hello(HOST, [b"h2", b"http/1.1"]), Hello(HOST, None)],
    ids=["http1", "h2-http1", "no-alpn"],
)
def test_second_hello_like_the_first_is_answered(
    proxy: ProxyProcess, hello: Hello, pipelined: bool
) -> None:
    sock = tunnel(proxy)
    assert retry_handshake(sock, hello, hello, pipelined=pipelined).kind == "server-hello"
    sock.close()


def test_a_real_client_that_needs_a_retry_is_served(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """openssl s_client's first key share is for a group the proxy does not take: its handshake
    goes through a HelloRetryRequest, and a ChangeCipherSpec before the second hello."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command")
    command = [openssl, "s_client", "-proxy", f"127.0.0.1:{proxy.port}", "-connect", f"{HOST}:443"]
    command += ["-servername", HOST, "-groups", "ffdhe8192:X25519", "-alpn", "http/1.1"]
    command += ["-CAfile", str(proxy.ca_cert), "-verify_return_error", "-msg", "-quiet", "-ign_eof"]
    result = subprocess.run(
        command,
        input=f"GET /retried HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode(),
        capture_output=True,
        timeout=30,
    )
    transcript = (result.stdout + result.stderr).decode(errors="replace")
    assert "cf 21 ad 74 e5 9a 61 11" in transcript.lower(), "no HelloRetryRequest happened"
    assert "HTTP/1.1 200 OK" in transcript
    assert upstream.seen.requests == [("GET", "/retried", HOST)]


def test_changed_second_hello_is_one_log_line(proxy: ProxyProcess, upstream: Upstream) -> None:
    start = len(proxy.stderr)
    sock = tunnel(proxy)
    answer = retry_handshake(sock, Hello(HOST, [b"http/1.1"]), Hello(HOST, [b"h2"]))
    assert answer.kind == "alert"
    sock.close()
    lines = log_until_served(proxy, start)
    assert_one_clean_line(lines, "the second ClientHello changes the ALPN offers")
    assert len(upstream.seen.requests) == 1  # only the request that proved the proxy still serves


# Hole: ALPN protocols the TCP path cannot serve (h3 crashed the connection handler).


@pytest.mark.parametrize(
    "offers",
    [
        ["h3"],
        ["h3-29"],
        ["h3", "h3-29"],
        ["foo"],
        ["http/0.9"],
        ["spdy/3.1", "h3"],
        ["\x00bad\x7f"],
    ],
)
def test_only_unsupported_alpn_is_refused(
    proxy: ProxyProcess, upstream: Upstream, offers: list[str]
) -> None:
    start = len(proxy.stderr)
    context = proxy.client_context()
    context.set_alpn_protocols(offers)
    with pytest.raises(ssl.SSLError, match="alert no application protocol"):
        context.wrap_socket(tunnel(proxy), server_hostname=HOST)
    lines = log_until_served(proxy, start)
    assert_one_clean_line(lines, "no protocol the proxy serves over TCP")
    assert len(upstream.seen.requests) == 1  # only the request that proved the proxy still serves


def test_empty_alpn_list_is_refused(proxy: ProxyProcess, upstream: Upstream) -> None:
    sock = tunnel(proxy)
    answer = handshake(sock, Hello(HOST, []))
    assert answer == Answer("alert", alert=NO_APPLICATION_PROTOCOL)
    assert wait_closed(sock) == b""
    sock.close()
    assert upstream.seen.connections == 0


@pytest.mark.parametrize(
    ("offers", "chosen"),
    [
        (["h3", "h2"], "h2"),
        (["h3-29", "h3", "http/1.1"], "http/1.1"),
        (["foo", "h2", "http/1.1"], "h2"),
        (["http/1.1", "h2"], "http/1.1"),  # the client's order decides
        (["h2", "h2"], "h2"),
        (["http/1.0"], "http/1.0"),  # curl --http1.0
        (None, None),  # no ALPN: HTTP/1.1
    ],
)
def test_a_supported_alpn_is_chosen_and_served(
    proxy: ProxyProcess, upstream: Upstream, offers: list[str] | None, chosen: str | None
) -> None:
    context = proxy.client_context()
    if offers is not None:
        context.set_alpn_protocols(offers)
    tls = context.wrap_socket(tunnel(proxy), server_hostname=HOST)
    assert tls.selected_alpn_protocol() == chosen
    if chosen == "h2":
        assert h2_request(tls, HOST) == 200
    else:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        assert read_head(tls).startswith(b"HTTP/1.1 200")
    tls.close()
    assert upstream.seen.requests == [("GET", "/", HOST)]
