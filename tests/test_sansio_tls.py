"""The client TLS guard sans I/O, in mitmproxy's Playbook style: each handshake once with the
proxy's layer (`ours`) and once with mitmproxy's own `ClientTLSLayer` (`mitmproxy`), which shows
what the proxy would do without mitm/client_tls.py. OpenSSL is real; the ClientHellos are
written byte by byte (tests/tlsclient.py). The same refusals end to end are in tests/test_tls.py
and tests/test_limits.py::test_endless_client_hello_is_cut_off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import trustme
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import tls
from mitmproxy.tls import TlsData
from OpenSSL import SSL

from claude_proxy.mitm.client_tls import GuardedClientTLSLayer
from claude_proxy.proxy.tls_guard import HELLO_RETRY_RANDOM, MAX_HELLO
from claude_proxy.record.decisions import Recorder
from tests.support.playbook import Placeholder, Playbook, StrMatching, reply
from tests.support.sansio import client_context
from tests.tlsclient import Hello, client_hello, x25519_public_key

HOST = "api.anthropic.com"
ILLEGAL_PARAMETER, NO_APPLICATION_PROTOCOL = 47, 120


def alert(description: int) -> bytes:
    return b"\x15\x03\x03\x00\x02\x02" + bytes([description])


class Silent(layer.Layer):
    """What would follow the handshake: nothing, here."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from ()


Make = Callable[[Context], tls.ClientTLSLayer]


def guarded(context: Context) -> tls.ClientTLSLayer:
    return GuardedClientTLSLayer(context, Recorder())


@pytest.fixture(params=["ours", "mitmproxy"])
def make(request: pytest.FixtureRequest) -> Make:
    return guarded if request.param == "ours" else tls.ClientTLSLayer


def ours(make: Make) -> bool:
    return make is guarded


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A key and certificate chain for HOST, in one PEM file."""
    path = tmp_path_factory.mktemp("tls") / "leaf.pem"
    trustme.CA().issue_cert(HOST).private_key_and_cert_chain_pem.write_to_path(str(path))
    return path


def reply_tls_start_client(certificate: Path) -> reply:
    """Answer tls_start_client as TlsConfig would, less its ALPN choice (not this layer's)."""

    def make_ssl_conn(tls_start: TlsData) -> None:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
        context.use_certificate_chain_file(str(certificate))
        context.use_privatekey_file(str(certificate))
        tls_start.ssl_conn = SSL.Connection(context)
        tls_start.ssl_conn.set_accept_state()

    return reply(side_effect=make_ssl_conn)


def stack(make: Make) -> tuple[Context, Playbook]:
    """The client TLS layer under the server TLS layer, as the Enforcer builds them."""
    tctx = client_context()
    tctx.server.address = (HOST, 443)
    server_layer = tls.ServerTLSLayer(tctx)
    client_layer = make(tctx)
    server_layer.child_layer = client_layer
    client_layer.child_layer = Silent(tctx)
    return tctx, Playbook(server_layer)


def hello(spec: Hello, *, retry: bool = False, random: bytes = b"r" * 32) -> bytes:
    """A ClientHello record; `retry`: with no key share, so that OpenSSL asks for another."""
    spec = spec if retry else replace(spec, key_share=spec.key_share or x25519_public_key())
    return client_hello(spec, random, b"s" * 32)


def is_hello_retry(data: bytes) -> bool:
    return data[:1] == b"\x16" and data[5:6] == b"\x02" and data[11:43] == HELLO_RETRY_RANDOM


def server_hello_follows_retry(data: bytes) -> bool:
    """The server's flight holds a HelloRetryRequest, then a real ServerHello."""
    first = 5 + int.from_bytes(data[3:5])
    rest = data[first:]
    while rest[:1] == b"\x14":  # a ChangeCipherSpec in between
        rest = rest[5 + int.from_bytes(rest[3:5]) :]
    return is_hello_retry(data) and rest[:1] == b"\x16" and rest[5:6] == b"\x02"


def refused(tctx: Context, playbook: Playbook, description: int) -> bool:
    return bool(
        playbook
        << commands.SendData(tctx.client, alert(description))
        << tls.TlsFailedClientHook(Placeholder(TlsData))
        >> reply()
        << commands.CloseConnection(tctx.client)
    )


@pytest.mark.parametrize("offers", [[b"h3"], [b"h3-29", b"spdy/3.1"], []], ids=str)
def test_a_hello_offering_no_protocol_served_over_tcp_is_refused(
    make: Make, offers: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    tctx, playbook = stack(make)
    playbook >> events.DataReceived(tctx.client, hello(Hello(HOST, offers)))
    if ours(make):
        assert refused(tctx, playbook, NO_APPLICATION_PROTOCOL)
        assert "the client offers no protocol the proxy serves over TCP" in caplog.text
    else:  # mitmproxy goes on to handshake it
        assert playbook << tls.TlsClienthelloHook(Placeholder())


CHANGES = [
    pytest.param(Hello(HOST, [b"http/1.1"]), Hello(HOST, [b"h2"]), "ALPN offers", id="alpn"),
    pytest.param(Hello(HOST, [b"h2"]), Hello("evil.example", [b"h2"]), "server name", id="sni"),
]


@pytest.mark.parametrize(("first", "second", "change"), CHANGES)
def test_a_second_hello_that_changes_sni_or_alpn_is_refused(
    make: Make,
    first: Hello,
    second: Hello,
    change: str,
    certificate: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    tctx, playbook = stack(make)
    answer = Placeholder(bytes)
    assert (
        playbook
        >> events.DataReceived(tctx.client, hello(first, retry=True))
        << tls.TlsClienthelloHook(Placeholder())
        >> reply()
        << tls.TlsStartClientHook(Placeholder())
        >> reply_tls_start_client(certificate)
        << commands.SendData(tctx.client, answer)
    )
    assert is_hello_retry(answer())
    assert tctx.client.sni == first.sni and tctx.client.alpn_offers == list(first.alpn or [])
    playbook >> events.DataReceived(tctx.client, hello(second))
    if ours(make):
        assert refused(tctx, playbook, ILLEGAL_PARAMETER)
        assert f"the second ClientHello changes the {change}" in caplog.text
    else:  # OpenSSL answers the second hello; what mitmproxy passes on is still the first's
        flight = Placeholder(bytes)
        assert playbook << commands.SendData(tctx.client, flight)
        assert flight()[:1] == b"\x16" and flight()[5:6] == b"\x02"  # a ServerHello
        assert tctx.client.sni == first.sni and tctx.client.alpn_offers == list(first.alpn or [])


def test_a_second_hello_like_the_first_is_answered(make: Make, certificate: Path) -> None:
    tctx, playbook = stack(make)
    same = Hello(HOST, [b"h2", b"http/1.1"])
    random = os.urandom(32)
    answer = Placeholder(bytes)
    assert (
        playbook
        >> events.DataReceived(
            tctx.client, hello(same, retry=True, random=random) + hello(same, random=random)
        )
        << tls.TlsClienthelloHook(Placeholder())
        >> reply()
        << tls.TlsStartClientHook(Placeholder())
        >> reply_tls_start_client(certificate)
        << commands.SendData(tctx.client, answer)
    )
    assert server_hello_follows_retry(answer())


def test_a_second_hello_past_max_hello_is_cut_off(make: Make, certificate: Path) -> None:
    """After a HelloRetryRequest, records that promise a second ClientHello of 16 MiB. The guard
    holds a second hello until it is whole, and stops holding at MAX_HELLO; mitmproxy's layer
    hands each record to OpenSSL, which refuses the announced size itself."""
    tctx, playbook = stack(make)
    assert (
        playbook
        >> events.DataReceived(tctx.client, hello(Hello(HOST, [b"h2"]), retry=True))
        << tls.TlsClienthelloHook(Placeholder())
        >> reply()
        << tls.TlsStartClientHook(Placeholder())
        >> reply_tls_start_client(certificate)
        << commands.SendData(tctx.client, Placeholder(bytes))
    )
    body = b"\x01\xff\xff\xff" + bytes(16 * 1024 - 4)
    record = b"\x16\x03\x03" + len(body).to_bytes(2) + body
    if not ours(make):  # OpenSSL refuses the size; mitmproxy blames the client's trust in the CA
        assert (
            playbook
            >> events.DataReceived(tctx.client, record)
            << commands.Log(StrMatching("may not trust the proxy's certificate"), logging.WARNING)
            << tls.TlsFailedClientHook(Placeholder(TlsData))
            >> reply()
            << commands.CloseConnection(tctx.client)
        )
        return
    held = 0
    while held + len(record) <= MAX_HELLO:
        assert playbook >> events.DataReceived(tctx.client, record) << None
        held += len(record)
        record = b"\x16\x03\x03" + (16 * 1024).to_bytes(2) + bytes(16 * 1024)
    playbook >> events.DataReceived(tctx.client, record)
    assert refused(tctx, playbook, ILLEGAL_PARAMETER)
