"""The ALPN choice and the ClientHello checks, in process (mitmproxy's taddons idiom)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from mitmproxy import certs, connection, tls
from mitmproxy.addons import tlsconfig
from mitmproxy.proxy import context
from mitmproxy.test import taddons

from claude_proxy.mitm.tls_config import GuardedTlsConfig
from claude_proxy.proxy import tls_guard
from tests.tlsclient import Hello, client_hello

H2, H1, H10 = b"h2", b"http/1.1", b"http/1.0"


def hello_record(hello: Hello) -> bytes:
    return client_hello(hello, os.urandom(32), b"")


def parsed(hello: Hello) -> tls.ClientHello:
    return tls.ClientHello(hello_record(hello)[9:])


@pytest.mark.parametrize(
    ("offers", "http2", "chosen"),
    [
        ([H2, H1], True, H2),
        ([H1, H2], True, H1),  # the client's order decides
        ([b"h3", H2], True, H2),
        ([b"h3-29", b"h3", H1], True, H1),
        ([b"h3"], True, None),
        ([b"foo", b"spdy/3.1"], True, None),
        ([b"http/0.9"], True, None),
        ([H10], True, H10),
        ([H2, H2], True, H2),
        ([b"H2", b"HTTP/1.1"], True, None),  # protocol names are exact bytes
        ([], True, None),
        ([H2, H1], False, H1),  # --set http2=false
        ([H2], False, None),
    ],
)
def test_choose_alpn(offers: list[bytes], http2: bool, chosen: bytes | None) -> None:
    assert tls_guard.choose_alpn(offers, http2) == chosen


@pytest.mark.parametrize(
    ("alpn", "http2", "refused"),
    [
        (None, True, False),  # no ALPN extension: HTTP/1.1
        ([], True, True),  # an empty list
        ([b"h3"], True, True),
        ([b"h3", H2], True, False),
        ([H2], False, True),
        ([b"\x00\n"], True, True),
    ],
)
def test_alpn_refusal(alpn: list[bytes] | None, http2: bool, refused: bool) -> None:
    reason = tls_guard.alpn_refusal(parsed(Hello("api.anthropic.com", alpn)), http2)
    assert (reason is not None) == refused
    assert reason is None or reason.isprintable()


def test_alpn_refusal_names_the_offers_safely() -> None:
    reason = tls_guard.alpn_refusal(parsed(Hello("a.example", [b"h3", b"x\ny"])), True)
    assert reason == ("the client offers no protocol the proxy serves over TCP (ALPN: h3, x\\ny)")


@pytest.mark.parametrize(
    ("second", "change"),
    [
        (Hello("api.anthropic.com", [H1]), None),
        (Hello("api.anthropic.com", [H1], key_share=b"k" * 32), None),
        (Hello("api.anthropic.com", [H2]), "ALPN offers"),
        (Hello("api.anthropic.com", [H1, H1]), "ALPN offers"),
        (Hello("api.anthropic.com", None), "ALPN offers"),
        (Hello("API.anthropic.com", [H1]), "server name (SNI)"),
        (Hello(None, [H1]), "server name (SNI)"),
    ],
)
def test_hello_change(second: Hello, change: str | None) -> None:
    first = parsed(Hello("api.anthropic.com", [H1]))
    found = tls_guard.hello_change(first, parsed(second))
    assert found == (change and f"the second ClientHello changes the {change}")


CCS = b"\x14\x03\x03\x00\x01\x01"


def split_record(record: bytes, at: int) -> bytes:
    """The same handshake message in two records."""
    body = record[5:]
    head, tail = body[:at], body[at:]
    return (
        b"\x16\x03\x03" + len(head).to_bytes(2) + head + b"\x16\x03\x03" + len(tail).to_bytes(2)
    ) + tail


def test_handshake_message_finds_the_hello_and_where_it_ends() -> None:
    record = hello_record(Hello("a.example", [H1]))
    assert tls_guard.handshake_message(record, skip_ccs=False) == (record[5:], len(record))
    rest = b"\x17\x03\x03\x00\x01x"
    assert tls_guard.handshake_message(record + rest, skip_ccs=False) == (
        record[5:],
        len(record),
    )
    split = split_record(record, 10)
    assert tls_guard.handshake_message(split, skip_ccs=False) == (record[5:], len(split))
    assert tls_guard.handshake_message(CCS + record, skip_ccs=True) == (
        record[5:],
        len(CCS + record),
    )


@pytest.mark.parametrize("cut", [0, 3, 5, 40, -1])
def test_handshake_message_waits_for_the_rest(cut: int) -> None:
    record = hello_record(Hello("a.example", [H1]))
    assert tls_guard.handshake_message(record[:cut], skip_ccs=False) is None
    assert tls_guard.handshake_message(split_record(record, 10)[:cut], skip_ccs=False) is None


@pytest.mark.parametrize(
    ("data", "skip_ccs"),
    [
        (CCS + b"HELLO", False),  # a ChangeCipherSpec before the first hello
        (b"\x17\x03\x03\x00\x05hello", True),  # application data
        (b"\x15\x03\x03\x00\x02\x01\x5a", True),  # an alert
        (b"\x16\x03\x03\x00\x00", True),  # an empty record
        (b"GET / HTTP/1.1\r\n", True),
    ],
)
def test_handshake_message_refuses_other_records(data: bytes, skip_ccs: bool) -> None:
    with pytest.raises(ValueError):
        tls_guard.handshake_message(data, skip_ccs=skip_ccs)


def test_handshake_message_refuses_a_hello_sharing_its_record() -> None:
    first, second = (hello_record(Hello("a.example", [H1]))[5:] for _ in range(2))
    both = first + second
    with pytest.raises(ValueError, match="shares its record"):
        tls_guard.handshake_message(b"\x16\x03\x03" + len(both).to_bytes(2) + both, skip_ccs=False)


@pytest.mark.parametrize(
    "message", [b"\x02\x00\x00\x02\x03\x03", b"\x01\x00\x00\x03\x03\x03\x00"], ids=["type", "short"]
)
def test_client_hello_refuses_what_is_not_one(message: bytes) -> None:
    with pytest.raises(ValueError):
        tls_guard.client_hello(message)


def test_is_hello_retry() -> None:
    retry = b"\x16\x03\x03\x00\x58\x02\x00\x00\x54\x03\x03" + tls_guard.HELLO_RETRY_RANDOM
    assert tls_guard.is_hello_retry(retry + b"\x20" + b"\x00" * 40)
    assert not tls_guard.is_hello_retry(retry[:11] + os.urandom(32))
    assert not tls_guard.is_hello_retry(b"\x15\x03\x03\x00\x02\x02\x28")
    assert not tls_guard.is_hello_retry(b"")


# The addon: what OpenSSL may agree to with the client, and what the upstream is offered.


def client_context(tctx: taddons.context) -> context.Context:
    client = connection.Client(
        peername=("127.0.0.1", 50000), sockname=("127.0.0.1", 9051), timestamp_start=time.time()
    )
    ctx = context.Context(client, tctx.options)
    ctx.server.address = ("api.anthropic.com", 443)
    return ctx


@pytest.mark.parametrize(
    ("offers", "http2", "pinned"),
    [
        ([b"h3", H2, H1], True, H2),
        ([H2, H1], False, H1),
        ([b"h3"], True, tls_guard.NO_ALPN),
        ([], True, tls_guard.NO_ALPN),
    ],
)
def test_client_alpn_is_pinned_from_the_first_hello(
    tmp_path: Path, offers: list[bytes], http2: bool, pinned: bytes
) -> None:
    addon = GuardedTlsConfig()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, confdir=str(tmp_path), http2=http2)
        ctx = client_context(tctx)
        ctx.client.alpn_offers = offers
        tls_start = tls.TlsData(ctx.client, ctx)
        addon.tls_start_client(tls_start)
        assert tls_start.ssl_conn is not None
        assert tls_start.ssl_conn.get_app_data()["client_alpn"] == pinned


@pytest.mark.parametrize(
    ("agreed", "offers", "upstream"),
    [
        (H2, [H2, H1], [H2]),
        (H1, [H2, H1], [H1]),
        (b"", [], []),  # no ALPN with the client: none upstream
        (None, [b"h3", H2, H1], [H2, H1]),  # no TLS with the client yet
    ],
)
def test_upstream_is_offered_the_agreed_protocol(
    agreed: bytes | None, offers: list[bytes], upstream: list[bytes]
) -> None:
    addon = GuardedTlsConfig()
    with taddons.context(addon) as tctx:
        ctx = client_context(tctx)
        ctx.client.alpn_offers = offers
        if agreed is not None:
            ctx.client.alpn, ctx.client.timestamp_tls_setup = agreed, time.time()
        tls_start = tls.TlsData(ctx.server, ctx)
        addon.tls_start_server(tls_start)
        assert tls_start.ssl_conn is not None
        assert ctx.server.alpn_offers == upstream


def test_upstream_offers_the_client_did_not_agree_to_fail_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    addon = GuardedTlsConfig()
    with taddons.context(addon) as tctx:
        ctx = client_context(tctx)
        ctx.client.alpn_offers = [b"h3"]
        ctx.client.alpn, ctx.client.timestamp_tls_setup = b"", time.time()
        tls_start = tls.TlsData(ctx.server, ctx)
        addon.tls_start_server(tls_start)
        assert tls_start.ssl_conn is None
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize(
    "addon_class", [GuardedTlsConfig, tlsconfig.TlsConfig], ids=["ours", "mitmproxy"]
)
def test_the_client_protocol_comes_from_the_first_hello_and_only_it_goes_upstream(
    tmp_path: Path, addon_class: type[tlsconfig.TlsConfig]
) -> None:
    """mitmproxy's TlsConfig leaves the choice to OpenSSL, from the hello it answers (after a
    HelloRetryRequest, the second), and offers the upstream all the client offered, h3 included."""
    addon = addon_class()
    offers = [b"h3", H2, H1]
    with taddons.context(addon) as tctx:
        tctx.configure(addon, confdir=str(tmp_path), http2=True)
        ctx = client_context(tctx)
        ctx.client.alpn_offers = offers
        client_start = tls.TlsData(ctx.client, ctx)
        addon.tls_start_client(client_start)
        assert client_start.ssl_conn is not None
        pinned = client_start.ssl_conn.get_app_data()["client_alpn"]
        ctx.client.alpn, ctx.client.timestamp_tls_setup = H2, time.time()  # what was agreed
        server_start = tls.TlsData(ctx.server, ctx)
        addon.tls_start_server(server_start)
        assert server_start.ssl_conn is not None
    if addon_class is GuardedTlsConfig:
        assert pinned == H2
        assert ctx.server.alpn_offers == [H2]
    else:
        assert pinned is None  # OpenSSL's callback picks from the hello in hand
        assert list(ctx.server.alpn_offers) == offers


@pytest.mark.parametrize("ours", [True, False], ids=["ours", "mitmproxy"])
def test_the_ca_is_loaded_once_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ours: bool
) -> None:
    """mitmproxy's TlsConfig loads the CA again when the proxy starts running, even when it was
    just loaded for the same options (each load checks the RSA key: ~50 ms of every start)."""
    monkeypatch.setenv("HOME", str(tmp_path))  # mitmproxy's default confdir is under it
    loads: list[str] = []
    load = certs.CertStore.from_store.__func__  # type: ignore[attr-defined]

    def counted(cls: type, path: str, *args: object, **kwargs: object) -> certs.CertStore:
        loads.append(path)
        return load(cls, path, *args, **kwargs)

    monkeypatch.setattr(certs.CertStore, "from_store", classmethod(counted))
    addon = GuardedTlsConfig() if ours else tlsconfig.TlsConfig()
    confdir = tmp_path / "conf"
    with taddons.context(addon) as tctx:
        tctx.configure(addon, confdir=str(confdir))
        loads.clear()  # what taddons' own configure of every option loaded does not count
        tctx.configure(addon, confdir=str(confdir / "x"))
        addon.running()
        assert loads == ([str(confdir / "x")] if ours else [str(confdir / "x")] * 2)
        tctx.configure(addon, confdir=str(confdir))  # changed after start: loaded again
        assert loads[-1] == str(confdir)
