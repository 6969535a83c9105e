"""The Enforcer addon in mitmproxy's own test idiom (taddons, tflow)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy import connection, ctx, exceptions
from mitmproxy.proxy import context, events, layer, layers, server_hooks
from mitmproxy.test import taddons, tflow, tutils

from claude_proxy.policy import config_file
from claude_proxy.policy.rules import DEFAULT_RULES, Policy
from claude_proxy.proxy import enforcer as enforcer_module
from claude_proxy.proxy import passthrough, wellformed
from claude_proxy.proxy.enforcer import Enforcer
from claude_proxy.record.decisions import BodyCount
from tests.support.fakes import FailingRecorder, OpenConnections
from tests.tlsclient import Hello, client_hello


@pytest.fixture
def enforcer() -> Iterator[Enforcer]:
    """An Enforcer configured as the service configures it."""
    e = Enforcer()
    with taddons.context(e) as tctx:
        tctx.configure(e, listen_host="127.0.0.1")
        e.use_policy(Policy.from_texts(DEFAULT_RULES))
        yield e


def connect_flow(host: str, port: int = 443) -> tflow.http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(method=b"CONNECT", host=host, port=port, path=b""))
    return f


def plain_flow(**request: object) -> tflow.http.HTTPFlow:
    """tflow's flow without its request body: a GET carrying one is refused on its own."""
    f = tflow.tflow(req=tutils.treq(**request)) if request else tflow.tflow()
    f.request.headers.pop("content-length", None)
    f.request.content = None
    return f


def tunnel_request(
    enforcer: Enforcer, tunnel: str = "api.anthropic.com", **headers: str
) -> tflow.http.HTTPFlow:
    """A request inside an allowed CONNECT tunnel to `tunnel`."""
    host = tunnel
    connect = connect_flow(host)
    enforcer.http_connect(connect)
    assert connect.response is None
    f = tflow.tflow(client_conn=connect.client_conn)
    f.request.host, f.request.port, f.request.scheme = host, 443, "https"
    f.request.headers.clear()
    for name, value in headers.items():
        f.request.headers.add(name.replace("_", "-"), value)
    return f


def test_connect_refused_with_reason() -> None:
    enforcer = Enforcer()
    with taddons.context(enforcer):
        enforcer.use_policy(Policy.from_texts(["claude.ai"], source="the test list"))
        f = connect_flow("example.com")
        enforcer.http_connect(f)
        assert f.response is not None
        assert f.response.status_code == 403
        assert f.response.headers["X-Claude-Proxy"] == "refused"
        assert "http_request_denied" in f.response.headers["Proxy-Status"]
        body = f.response.text or ""
        assert "example.com:443" in body and "the test list" in body
        assert f.client_conn.id not in enforcer.tunnels


def test_connect_inside_a_tunnel_is_refused(enforcer: Enforcer) -> None:
    outer = connect_flow("api.anthropic.com")
    enforcer.http_connect(outer)
    inner = tflow.tflow(
        client_conn=outer.client_conn,
        req=tutils.treq(method=b"CONNECT", host="claude.ai", port=443, path=b""),
    )
    enforcer.http_connect(inner)
    assert inner.response is not None and inner.response.status_code == 403
    assert enforcer.tunnels[outer.client_conn.id] == ("api.anthropic.com", 443)


def test_connect_allowed_records_the_tunnel(enforcer: Enforcer) -> None:
    f = connect_flow("API.Anthropic.com.")
    enforcer.http_connect(f)
    assert f.response is None
    assert enforcer.tunnels[f.client_conn.id] == ("api.anthropic.com", 443)
    enforcer.client_disconnected(f.client_conn)
    assert enforcer.tunnels == {}


@pytest.mark.parametrize(
    ("headers", "authority", "allowed"),
    [
        ({"host": "api.anthropic.com"}, "", True),
        ({"host": "API.anthropic.com.:443"}, "", True),
        ({}, "api.anthropic.com", True),  # HTTP/2: :authority alone
        ({"host": "evil.example"}, "", False),
        ({"host": "claude.ai"}, "", False),
        ({"host": "api.anthropic.com:8443"}, "", False),
        ({}, "evil.example", False),
        ({"host": "api.anthropic.com"}, "evil.example:443", False),
        ({"host": "api.anthropic.com@evil.example"}, "", False),
    ],
)
def test_request_names_must_match_tunnel(
    enforcer: Enforcer, headers: dict[str, str], authority: str, allowed: bool
) -> None:
    f = tunnel_request(enforcer, **headers)
    f.request.authority = authority
    enforcer.requestheaders(f)
    assert (f.response is None) is allowed
    assert bool(f.request.stream) is allowed  # streamed (through a byte count) once allowed
    assert enforcer.in_flight == int(allowed)


def test_two_host_headers_are_refused(enforcer: Enforcer) -> None:
    f = tunnel_request(enforcer, host="api.anthropic.com")
    f.request.headers.add("host", "api.anthropic.com")
    enforcer.requestheaders(f)
    assert f.response is not None and f.response.status_code == 403


def test_plain_http_is_decided_on_the_url_not_the_host_header() -> None:
    enforcer = Enforcer()
    with taddons.context(enforcer):
        enforcer.use_policy(Policy.from_texts(["http://plain.example"]))
        f = plain_flow()
        f.request.host, f.request.port = "evil.example", 80
        f.request.headers["host"] = "plain.example"
        enforcer.requestheaders(f)
        assert f.response is not None and f.response.status_code == 403
        ok = plain_flow()
        ok.request.host, ok.request.port = "plain.example", 80
        ok.request.headers["host"] = "plain.example"
        enforcer.requestheaders(ok)
        assert ok.response is None


def test_head_refusal_has_no_body(enforcer: Enforcer) -> None:
    f = plain_flow(method=b"HEAD", host="example.com", port=443)
    enforcer.requestheaders(f)
    assert f.response is not None
    assert f.response.status_code == 403 and f.response.content == b""


def test_policy_exception_refuses(enforcer: Enforcer, monkeypatch: pytest.MonkeyPatch) -> None:

    def broken(*_args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(enforcer.policy, "decide", broken)
    monkeypatch.setattr(enforcer.policy, "decide_request", broken)
    connect = connect_flow("api.anthropic.com")
    enforcer.http_connect(connect)
    assert connect.response is not None and connect.response.status_code == 403
    f = plain_flow()
    f.request.host, f.request.port = "api.anthropic.com", 443
    enforcer.requestheaders(f)
    assert f.response is not None and f.response.status_code == 403


def test_name_check_exception_refuses(enforcer: Enforcer, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tunnel_request(enforcer, host="api.anthropic.com")
    monkeypatch.setattr(enforcer_module, "misnamed", lambda *_: 1 / 0)
    enforcer.requestheaders(f)
    assert f.response is not None and f.response.status_code == 403
    assert enforcer.in_flight == 0


def test_responses_stream_and_in_flight_is_counted(enforcer: Enforcer) -> None:
    f = tunnel_request(enforcer, host="api.anthropic.com")
    enforcer.requestheaders(f)
    assert enforcer.in_flight == 1
    f.response = tutils.tresp()
    enforcer.responseheaders(f)
    assert isinstance(f.response.stream, BodyCount)  # streamed, its bytes counted
    enforcer.response(f)
    assert enforcer.in_flight == 0
    g = tunnel_request(enforcer, host="api.anthropic.com")
    enforcer.requestheaders(g)
    enforcer.error(g)
    enforcer.error(g)  # counted once, however the flow ends
    assert enforcer.in_flight == 0


@pytest.mark.parametrize(
    ("address", "tunnel", "tls", "refused"),
    [
        (("api.anthropic.com", 443), None, True, False),
        (("api.anthropic.com", 443), None, False, True),  # cleartext to an HTTPS-only rule
        (("evil.example", 443), None, True, True),
        (("127.0.0.1", 443), None, True, True),
        (("claude.ai", 443), "api.anthropic.com", True, True),  # allowed, not the tunnel's host
        (("api.anthropic.com", 443), "api.anthropic.com", True, False),
        (None, None, True, True),
    ],
)
def test_server_connect_backstop(
    enforcer: Enforcer,
    address: tuple[str, int] | None,
    tunnel: str | None,
    tls: bool,
    refused: bool,
) -> None:
    client = tflow.tclient_conn()
    if tunnel:
        enforcer.tunnels[client.id] = (tunnel, 443)
    server = connection.Server(address=address, tls=tls)
    enforcer.server_connect(server_hooks.ServerConnectionHookData(server, client))
    assert bool(server.error) is refused


@pytest.mark.parametrize(
    ("peer", "remote_ok", "refused"),
    [
        ("127.0.0.1", False, False),
        ("127.0.0.2", False, False),
        ("::1", False, False),
        ("::ffff:127.0.0.1", False, False),
        ("192.168.1.20", False, True),
        ("10.0.0.5", False, True),
        ("2001:db8::1", False, True),
        ("192.168.1.20", True, False),
    ],
)
def test_clients_from_other_machines(peer: str, remote_ok: bool, refused: bool) -> None:
    enforcer = Enforcer()
    with taddons.context(enforcer) as tctx:
        tctx.configure(
            enforcer,
            sandbox_remote_clients=remote_ok,
            listen_host="0.0.0.0" if remote_ok else "127.0.0.1",
        )
        client = tflow.tclient_conn()
        client.peername = (peer, 50000)
        enforcer.client_connected(client)
        assert bool(client.error) is refused


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ignore_hosts": [".*"]}, "ignore_hosts is not supported"),
        ({"allow_hosts": ["x"]}, "allow_hosts is not supported"),
        ({"tcp_hosts": ["x"]}, "tcp_hosts is not supported"),
        ({"mode": ["transparent"]}, "is not supported"),
        ({"mode": ["regular@0.0.0.0:8080"]}, "would let other machines"),
        ({"listen_host": "192.168.1.2"}, "would let other machines"),
    ],
)
def test_bad_options(options: dict[str, object], message: str) -> None:
    enforcer = Enforcer()
    with taddons.context(enforcer) as tctx:
        tctx.configure(enforcer, listen_host="127.0.0.1")
        with pytest.raises(exceptions.OptionsError, match=message):
            tctx.configure(enforcer, **options)


@pytest.mark.parametrize(
    ("headers", "killed"),
    [
        ({}, False),
        ({"content-length": "65536"}, False),
        ({"content-length": "65537"}, True),
        ({"transfer-encoding": "chunked"}, True),
        ({"content-length": "nonsense"}, True),
    ],
)
def test_refused_request_with_a_large_body_is_closed(
    enforcer: Enforcer, headers: dict[str, str], killed: bool
) -> None:
    f = tunnel_request(enforcer, host="evil.example", **headers)
    f.request.method = "POST"
    f.request.data.content = None  # as at requestheaders: the body is still to come
    enforcer.requestheaders(f)
    assert f.killable is not killed
    assert (f.error is not None) is killed
    if not killed:
        assert f.response is not None and f.response.status_code == 403


def request(method: bytes = b"GET", path: bytes = b"/", **headers: str) -> tflow.http.Request:
    r = tutils.treq(method=method, path=path)
    r.headers.clear()
    for name, value in headers.items():
        r.headers.add(name.replace("_", "-"), value)
    return r


@pytest.mark.parametrize(
    ("req", "problem"),
    [
        (request(), None),
        (request(b"POST", b"/v1/messages?beta=true", x_note="tab\there, obs-text \xe9"), None),
        (request(b"OPTIONS", b"*"), None),
        (request(b"GET", b"*"), "asterisk-form"),
        (request(b"GET", b"https://evil.example/"), "not origin-form"),
        (request(b"GET", b"//evil.example/"), "not origin-form"),
        (request(b"GET", b"/a b"), "not origin-form"),
        (request(b"GET", b"/a\x7f"), "not origin-form"),
        (request(b"GET", b""), "not origin-form"),
        (request(b"GET /x", b"/"), "not a token"),
        (request(b"G(T", b"/"), "not a token"),
        (request(b"PRI", b"*"), "preface"),
        (request(x_note="a\rHost: evil.example"), "control character"),
        (request(x_note="a\nb"), "control character"),
        (request(x_note="a\x00b"), "control character"),
        (request(x_note="a\x1bb"), "control character"),
        (request(**{"x note": "a"}), "header name"),
        (request(content_length="0"), None),
        (request(content_length="5"), "may not carry a body"),
        (request(b"HEAD", transfer_encoding="chunked"), "may not carry a body"),
        (request(b"POST", content_length="5"), None),
        (request(b"POST", connection="keep-alive, Content-Length"), "Connection header names"),
        (request(connection="host"), "Connection header names"),
        (request(connection="Upgrade", upgrade="websocket"), None),
        (request(connection="close, TE", te="trailers"), None),
    ],
)
def test_malformed_requests(req: tflow.http.Request, problem: str | None) -> None:
    found = wellformed.malformed(req)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


@pytest.mark.parametrize(
    ("headers", "kept"),
    [
        ({"upgrade": "websocket"}, "websocket"),
        ({"upgrade": "WebSocket "}, "WebSocket "),
        ({"upgrade": "h2c", "http2-settings": "AAMAAABk"}, None),
        ({"upgrade": "tcp"}, None),
        ({"upgrade": "websocket, h2c"}, None),
        ({"http2-settings": "AAMAAABk"}, None),
    ],
)
def test_only_a_websocket_upgrade_is_offered_upstream(
    headers: dict[str, str], kept: str | None
) -> None:
    r = request(**headers)
    wellformed.strip_hop_headers(r)
    assert r.headers.get("upgrade") == kept
    assert "http2-settings" not in r.headers


@pytest.mark.parametrize(
    ("offered", "status", "agreed", "refused"),
    [
        ("websocket", 101, "websocket", False),
        ("", 200, "", False),
        ("", 101, "tcp", True),  # a 101 nobody asked for
        ("", 101, "websocket", True),
        ("websocket", 101, "tcp", True),
    ],
)
def test_a_101_that_is_not_a_websocket_kills_the_flow(
    enforcer: Enforcer, offered: str, status: int, agreed: str, refused: bool
) -> None:
    f = tunnel_request(enforcer, host="api.anthropic.com")
    if offered:
        f.request.headers["upgrade"] = offered
    enforcer.requestheaders(f)
    f.response = tutils.tresp(status_code=status)
    if agreed:
        f.response.headers["upgrade"] = agreed
    enforcer.responseheaders(f)
    assert (f.error is not None) is refused
    enforcer.error(f) if refused else enforcer.response(f)
    assert enforcer.in_flight == 0


# The user's policy inside the Enforcer: request rules, pass-through, a policy that changes.

USER_POLICY = """
defaults = false
[[allow]]
host = "api.anthropic.com"
methods = ["GET"]
paths = ["/v1/"]
[[allow]]
host = "claude.ai"
inspect = false
[[deny]]
host = "api.anthropic.com"
paths = ["/v1/files"]
"""


def use(enforcer: Enforcer, toml: str) -> None:
    path = Path("/c/config.toml")
    enforcer.use_policy(config_file.build_policy(config_file.parse(path, toml.encode())))


@pytest.mark.parametrize(
    ("method", "path", "status", "origin"),
    [
        ("GET", "/v1/models?x=1", None, None),
        ("POST", "/v1/models", 403, None),
        ("GET", "/v2/models", 403, None),
        ("GET", "/v1/files", 403, "/c/config.toml:10"),
        ("GET", "/v1/FILES/x", 403, "/c/config.toml:10"),
        ("GET", "/v1/%2e%2e/v1/files", 403, None),
    ],
)
def test_requests_are_decided_by_method_and_path(
    enforcer: Enforcer, method: str, path: str, status: int | None, origin: str | None
) -> None:
    use(enforcer, USER_POLICY)
    f = tunnel_request(enforcer, host="api.anthropic.com")
    f.request.method, f.request.path = method, path
    enforcer.requestheaders(f)
    assert (f.response.status_code if f.response else None) == status
    if origin is not None:
        assert f.response is not None
        assert f"Decided by the rule at {origin}." in (f.response.text or "")


def test_an_open_tunnel_follows_a_new_policy(enforcer: Enforcer) -> None:
    first = tunnel_request(enforcer, host="api.anthropic.com")
    enforcer.requestheaders(first)
    assert first.response is None
    use(enforcer, "defaults = false\n[[allow]]\nhost = 'claude.ai'\n")
    again = tflow.tflow(client_conn=first.client_conn)
    again.request.host, again.request.port, again.request.scheme = "api.anthropic.com", 443, "https"
    again.request.headers.clear()
    again.request.headers["host"] = "api.anthropic.com"
    enforcer.requestheaders(again)
    assert again.response is not None and again.response.status_code == 403
    assert "api.anthropic.com is not on the allowlist" in (again.response.text or "")


def hello_bytes(sni: str | None, extra: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    return client_hello(Hello(sni, [b"http/1.1"], extra=extra), os.urandom(32), b"")


ECH = ((passthrough.ENCRYPTED_CLIENT_HELLO, b"\x00" * 40),)


@pytest.mark.parametrize(
    ("tunnel", "hello", "chosen"),
    [
        ("claude.ai", hello_bytes("claude.ai"), layers.TCPLayer),
        ("claude.ai", hello_bytes("CLAUDE.AI."), layers.TCPLayer),
        # another name
        ("claude.ai", hello_bytes("api.anthropic.com"), enforcer_module.CloseTunnel),
        ("claude.ai", hello_bytes(None), enforcer_module.CloseTunnel),  # no SNI
        # the name hidden
        ("claude.ai", hello_bytes("claude.ai", ECH), enforcer_module.CloseTunnel),
        ("claude.ai", hello_bytes("claude.ai")[:20], type(None)),  # wait for the whole hello
        ("claude.ai", b"GET / HTTP/1.1\r\n\r\n", enforcer_module.CloseTunnel),
        ("api.anthropic.com", hello_bytes("api.anthropic.com"), layers.ServerTLSLayer),
        ("api.anthropic.com", hello_bytes(None), layers.ServerTLSLayer),  # inspected: SNI optional
    ],
    ids=[  # the hellos hold random bytes: ids of their own, the same in every worker
        "sni",
        "sni-in-capitals",
        "other-name",
        "no-sni",
        "ech",
        "partial-hello",
        "not-tls",
        "inspected",
        "inspected-no-sni",
    ],
)
def test_pass_through_layer_decision(
    enforcer: Enforcer, tunnel: str, hello: bytes, chosen: type
) -> None:
    use(enforcer, USER_POLICY)
    client = tflow.tclient_conn()
    enforcer.tunnels[client.id] = (tunnel, 443)
    nextlayer = layer.NextLayer(context.Context(client, ctx.options))
    nextlayer.events.append(events.DataReceived(client, hello))
    enforcer.next_layer(nextlayer)
    assert type(nextlayer.layer) is chosen
    assert (client.id in enforcer.spliced) is (chosen is layers.TCPLayer)


def test_a_tunnel_refused_between_connect_and_hello_closes(enforcer: Enforcer) -> None:
    use(enforcer, USER_POLICY)
    client = tflow.tclient_conn()
    enforcer.tunnels[client.id] = ("claude.ai", 443)
    use(enforcer, "[[deny]]\nhost = 'claude.ai'\n")
    nextlayer = layer.NextLayer(context.Context(client, ctx.options))
    nextlayer.events.append(events.DataReceived(client, hello_bytes("claude.ai")))
    enforcer.next_layer(nextlayer)
    assert type(nextlayer.layer) is enforcer_module.CloseTunnel


def test_a_spliced_tunnel_connects_upstream_as_tls(enforcer: Enforcer) -> None:
    """Its upstream connection carries TLS as bytes: the backstop decides it as HTTPS."""
    use(enforcer, USER_POLICY)
    client = tflow.tclient_conn()
    enforcer.tunnels[client.id] = ("claude.ai", 443)
    enforcer.spliced.add(client.id)
    server = connection.Server(address=("claude.ai", 443), tls=False)
    enforcer.server_connect(server_hooks.ServerConnectionHookData(server, client))
    assert not server.error
    enforcer.spliced.discard(client.id)
    enforcer.server_connect(server_hooks.ServerConnectionHookData(server, client))
    assert server.error  # the same connection, not spliced: cleartext to port 443


def test_a_failure_closing_one_refused_tunnel_leaves_none_open(enforcer: Enforcer) -> None:
    """A new policy closes every tunnel it refuses, even when recording one of them fails: a
    pass-through relay asks nothing afterwards, so a tunnel missed here would stay open."""
    use(enforcer, USER_POLICY)
    clients = [tflow.tclient_conn() for _ in range(2)]
    connections = OpenConnections(clients)
    enforcer.connections = connections  # type: ignore[assignment]
    enforcer.recorder = FailingRecorder()
    for client in clients:
        enforcer.tunnels[client.id] = ("claude.ai", 443)
        enforcer.spliced.add(client.id)
    use(enforcer, "defaults = false\n[[allow]]\nhost = 'api.anthropic.com'\n")
    assert connections.closed == [c.id for c in clients]
