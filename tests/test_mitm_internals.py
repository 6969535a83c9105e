"""Every private part of mitmproxy (and of h11, h2 and asyncio) the proxy replaces, subclasses or
reads is still there, with the signature it was written against, in the installed version: a
rename would otherwise fail silently (a hook reaching no addon, a stream without its deadlines,
a method of ours that mitmproxy no longer calls)."""

from __future__ import annotations

import asyncio
import importlib
import inspect

import h2.config
import h2.connection
import h2.stream
import pytest
from mitmproxy import addonmanager, master
from mitmproxy.addons import tlsconfig
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import layer, mode_servers, server
from mitmproxy.proxy import server as server_module
from mitmproxy.proxy.layers import http, modes, tls
from mitmproxy.proxy.layers.http import _http1, _http2, _http_h2
from OpenSSL import SSL

from claude_proxy.mitm.timed_http import TimedHttpLayer
from claude_proxy.proxy.held_bodies import Held
from claude_proxy.record.decisions import Recorder
from tests.support.sansio import client_context

# (module, attribute path): private names imported, patched or subclassed.
NAMES = [
    ("h11._receivebuffer", "ReceiveBuffer.maybe_extract_lines"),
    ("mitmproxy.proxy.layers.http._http1", "Http1Client.send"),
    ("mitmproxy.proxy.layers.http._http1", "Http1Server.read_body"),
    ("mitmproxy.proxy.layers.http._http2", "Http2Server.handle_h2_event"),
    ("mitmproxy.proxy.layers.http._http2", "Http2Connection.protocol_error"),
    ("mitmproxy.proxy.layers.http._http2", "Http2Connection.close_connection"),
    ("mitmproxy.proxy.layers.http", "Http1Client"),  # replaced by name (framing.install)
    ("mitmproxy.proxy.layers.http._events", "HttpEvent"),
    ("mitmproxy.addonmanager", "AddonManager._iter_hooks"),
    ("mitmproxy.addonmanager", "AddonManager._configure_all"),
    ("mitmproxy.proxy.server", "ConnectionHandler.handle_connection"),
    ("asyncio.selector_events", "BaseSelectorEventLoop._accept_connection"),
    ("asyncio.selector_events", "BaseSelectorEventLoop._add_reader"),
    ("asyncio.selector_events", "BaseSelectorEventLoop._remove_reader"),
    ("asyncio.events", "Handle._args"),  # a listener's accept loop arguments (mitm/accept.py)
    ("mitmproxy.proxy.mode_servers", "Socks5Instance.make_top_layer"),  # socks5.install
    ("mitmproxy.proxy.layers.modes", "Socks5Proxy.socks_err"),
    ("mitmproxy.proxy.layers.modes", "Socks5Proxy.done"),
    ("mitmproxy.proxy.layers.modes", "Socks5Proxy.state"),
    ("mitmproxy.proxy.layers.modes", "Socks5Proxy.buf"),
    ("mitmproxy.proxy.layers.tls", "ClientTLSLayer.errored"),
    ("mitmproxy.addons.tlsconfig", "AppData"),
    ("mitmproxy.addons.tlsconfig", "alpn_select_callback"),
]

# Methods the proxy overrides (or calls from an override), with the parameters it was written
# against: a rename, or another signature, and mitmproxy would call its own instead of ours.
OVERRIDDEN = [
    (http.HttpLayer, "_handle_event", ["self", "event"]),  # TimedHttpLayer, BoundedHttpLayer
    (http.HttpLayer, "event_to_child", ["self", "child", "event"]),
    (_http1.Http1Server, "_handle_event", ["self", "event"]),  # BoundedHttp1Server
    (_http2.Http2Server, "_handle_event", ["self", "event"]),  # BoundedHttp2Server
    (http.HttpLayer, "make_stream", ["self", "stream_id"]),
    (http.HttpLayer, "register_connection", ["self", "command"]),
    (http.HttpLayer, "get_connection", ["self", "event", "reuse"]),
    (http.HttpStream, "check_invalid", ["self", "request"]),
    (http.HttpStream, "check_killed", ["self", "emit_error_hook"]),
    (http.HttpStream, "handle_protocol_error", ["self", "event"]),
    (http.HttpStream, "make_server_connection", ["self"]),
    (_http1.Http1Server, "read_body", ["self", "event"]),
    (_http1.Http1Client, "send", ["self", "event"]),
    (_http2.Http2Server, "handle_h2_event", ["self", "event"]),
    (modes.Socks5Proxy, "__init__", ["self", "context"]),
    (modes.Socks5Proxy, "state_greet", ["self"]),
    (modes.Socks5Proxy, "state_connect", ["self"]),
    (modes.Socks5Proxy, "finish_start", ["self"]),
    (modes.Socks5Proxy, "socks_err", ["self", "message", "reply_code"]),
    (mode_servers.Socks5Instance, "make_top_layer", ["self", "context"]),
    (tls.ClientTLSLayer, "__init__", ["self", "context"]),
    (tls.ClientTLSLayer, "receive_handshake_data", ["self", "data"]),
    (tls.ClientTLSLayer, "on_handshake_error", ["self", "err"]),
    (tls.TLSLayer, "tls_interact", ["self"]),
    (tls.TLSLayer, "on_handshake_error", ["self", "err"]),
    (tlsconfig.TlsConfig, "tls_start_client", ["self", "tls_start"]),
    (tlsconfig.TlsConfig, "tls_start_server", ["self", "tls_start"]),
    (server.ConnectionHandler, "handle_connection", ["self", "connection"]),
    (addonmanager.AddonManager, "trigger_event", ["self", "event"]),
    (  # the accept gate calls it with these, positionally, as _start_serving registers it
        asyncio.selector_events.BaseSelectorEventLoop,
        "_accept_connection",
        [
            "self",
            "protocol_factory",
            "sock",
            "sslcontext",
            "server",
            "backlog",
            "ssl_handshake_timeout",
            "ssl_shutdown_timeout",
        ],
    ),
]


@pytest.mark.parametrize(("module", "path"), NAMES, ids=[f"{m}:{p}" for m, p in NAMES])
def test_a_private_name_the_proxy_uses_exists(module: str, path: str) -> None:
    found: object = importlib.import_module(module)
    for part in path.split("."):
        found = getattr(found, part)


@pytest.mark.parametrize(
    ("cls", "method", "parameters"), OVERRIDDEN, ids=[f"{c.__name__}.{m}" for c, m, _ in OVERRIDDEN]
)
def test_a_method_the_proxy_overrides_has_the_signature_it_was_written_for(
    cls: type, method: str, parameters: list[str]
) -> None:
    assert list(inspect.signature(getattr(cls, method)).parameters) == parameters


def test_the_instance_state_the_proxy_reads_is_there() -> None:
    """Attributes mitmproxy sets on its objects, which the proxy reads or changes."""
    context = client_context()
    stream = http.HttpStream(context.fork(), 1)
    assert hasattr(stream, "_paused") and hasattr(stream, "_paused_event_queue")
    assert "command" in layer.Paused._fields  # what a paused stream waits for
    states = {"client_state", "server_state", "state_errored", "state_done"}
    assert states | {"state_wait_for_response_headers"} <= set(dir(stream))
    server1 = _http1.Http1Server(context.fork())
    for name in ("buf", "state", "stream_id", "conn"):
        assert hasattr(server1, name), name
    assert "body_reader" in _http1.Http1Connection.__annotations__  # set per message
    assert "self.body_reader = " in inspect.getsource(_http1.Http1Server)
    assert {"read_headers", "passthrough", "done"} <= set(dir(server1))
    server2 = _http2.Http2Server(client_context(alpn=b"h2"))
    assert isinstance(server2.h2_conn, _http_h2.BufferedH2Connection)
    assert server2.h2_conn.state_machine.state is not h2.connection.ConnectionState.CLOSED
    assert isinstance(server2.h2_conn.streams, dict)  # stream id → h2 stream, read when one ends
    assert hasattr(h2.stream.H2Stream(1, h2.config.H2Configuration(), 0, 0), "state_machine")
    assert h2.stream.StreamState.CLOSED
    parent = TimedHttpLayer(context.fork(), http.HTTPMode.regular, Held(), Recorder())
    for name in ("waiting_for_establishment", "command_sources", "connections", "streams"):
        assert hasattr(parent, name), name
    connection = _http_h2.BufferedH2Connection(h2.config.H2Configuration(client_side=False))
    assert isinstance(connection.stream_buffers, dict)
    assert isinstance(connection, h2.connection.H2Connection)
    handler_attrs = inspect.getsource(server.ConnectionHandler.__init__)
    for name in ("self.transports", "self.max_conns", "self.wakeup_timer"):
        assert name in handler_attrs, name
    assert "self._legacy_log_events" in inspect.getsource(master.Master.__init__)
    loop = asyncio.new_event_loop()
    try:
        assert all(
            hasattr(loop, n)
            for n in ("_accept_connection", "_add_reader", "_remove_reader", "_selector")
        )
    finally:
        loop.close()
    # The accept gate re-registers a listener with the arguments _start_serving gave its reader.
    start_serving = inspect.getsource(asyncio.selector_events.BaseSelectorEventLoop._start_serving)
    assert "self._add_reader(sock.fileno(), self._accept_connection," in start_serving


def test_tlsconfig_still_lets_the_client_alpn_in_app_data_decide() -> None:
    """GuardedTlsConfig pins the client's protocol through TlsConfig's `AppData["client_alpn"]`,
    which `alpn_select_callback` obeys: if it stopped, OpenSSL would choose again, silently."""
    assert "client_alpn" in tlsconfig.AppData.__annotations__
    pinned = tlsconfig.AppData(client_alpn=b"http/1.1", server_alpn=None, http2=True)

    class Connection:
        def get_app_data(self) -> tlsconfig.AppData:
            return pinned

    assert tlsconfig.alpn_select_callback(Connection(), [b"h2", b"http/1.1"]) == b"http/1.1"  # type: ignore[arg-type]
    pinned["client_alpn"] = b""
    assert (
        tlsconfig.alpn_select_callback(Connection(), [b"h2"])  # type: ignore[arg-type]
        == SSL.NO_OVERLAPPING_PROTOCOLS
    )


def test_what_connections_reads_of_the_proxyserver_is_there() -> None:
    """mitm/connections.py reads the listening servers, each client's handler and its
    transports: renamed, the proxy could no longer close, pause or count a connection."""
    assert "self._servers = []" in inspect.getsource(mode_servers.AsyncioServerInstance.__init__)
    server = Proxyserver()
    assert isinstance(server.connections, dict)
    assert hasattr(server.servers, "changed") and hasattr(server.servers, "__iter__")
    fields = server_module.ConnectionIO.__dataclass_fields__
    assert {"handler", "reader", "writer"} <= set(fields), fields
