"""An HTTP/2 client through the proxy's tunnel, for the tests."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from tests.conftest import (
    ProxyProcess,
    read_head,
    send_connect,
)

ANSWER_SECONDS = 10  # bound on every wait for the proxy; running into it fails the test


def h2_tunnel(proxy: ProxyProcess) -> ssl.SSLSocket:
    sock = send_connect(proxy, b"api.anthropic.com:443")
    assert read_head(sock).startswith(b"HTTP/1.1 200")
    context = proxy.client_context()
    context.set_alpn_protocols(["h2"])
    tls = context.wrap_socket(sock, server_hostname="api.anthropic.com")
    assert tls.selected_alpn_protocol() == "h2"
    return tls


def h2_events(tls: ssl.SSLSocket, conn: h2.connection.H2Connection) -> Iterator[h2.events.Event]:
    """The client's HTTP/2 events until the proxy closes; fails if it does neither in time."""
    tls.settimeout(ANSWER_SECONDS)
    while True:
        try:
            data = tls.recv(65536)
        except TimeoutError:
            pytest.fail("the proxy neither answered nor closed the HTTP/2 connection")
        if not data:
            return
        yield from conn.receive_data(data)
        tls.sendall(conn.data_to_send())


H2Session = tuple[ssl.SSLSocket, h2.connection.H2Connection, Iterator[h2.events.Event]]


def h2_session(proxy: ProxyProcess) -> H2Session:
    """An HTTP/2 client connection through a tunnel, its preface sent, and its events."""
    tls = h2_tunnel(proxy)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    return tls, conn, h2_events(tls, conn)


def h2_request(tls: ssl.SSLSocket, authority: str) -> int:
    """Send one HTTP/2 GET with the given :authority; return the response status."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [(":method", "GET"), (":scheme", "https"), (":authority", authority), (":path", "/")],
        end_stream=True,
    )
    tls.sendall(conn.data_to_send())
    while True:
        data = tls.recv(65536)
        assert data, "connection closed before a response"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                return int(dict(event.headers)[b":status"])
        tls.sendall(conn.data_to_send())
