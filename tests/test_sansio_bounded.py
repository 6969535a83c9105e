"""The bounded HTTP/1 and HTTP/2 servers (mitm/bounded_http.py), sans I/O: the layer gets the
wakeups it asked for at the moment the test moves its clock to, so a 30 s deadline takes no time
to test. Each limit also runs on mitmproxy's own server, to show what the bounded one adds.
The same limits end to end, with real sockets, are in tests/test_limits.py."""

from __future__ import annotations

import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from mitmproxy import http
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.layers.http import (
    HTTPMode,
    ReceiveHttp,
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    ResponseData,
    ResponseHeaders,
)
from mitmproxy.proxy.layers.http._http1 import Http1Server
from mitmproxy.proxy.layers.http._http2 import Http2Server

from claude_proxy.mitm.bounded_http import Bounds
from claude_proxy.proxy.held_bodies import Held
from tests.support.sansio import (
    Clock,
    Driver,
    bounded_http1_server,
    bounded_http2_server,
    bounded_layer,
    client_context,
    h2_client,
    held,
    timed_layer,
)
from tests.support.sansio import clock as clock

BOUNDS = Bounds(head_timeout=30, idle_timeout=120)
OURS, THEIRS = "bounded", "mitmproxy"
MIB = 1024 * 1024
__all__ = ["held"]  # a fixture


def server(clock: Clock, which: str = OURS) -> Driver:
    context = client_context()
    built = bounded_http1_server(context, BOUNDS) if which == OURS else Http1Server(context)
    driver = Driver(built, clock)
    driver.feed(events.Start())
    return driver


def sent(commands_: list[commands.Command]) -> bytes:
    return b"".join(c.data for c in commands_ if isinstance(c, commands.SendData))


def closed(commands_: list[commands.Command]) -> bool:
    return any(isinstance(c, commands.CloseConnection) for c in commands_)


def received(commands_: list[commands.Command]) -> list[object]:
    return [c.event for c in commands_ if isinstance(c, ReceiveHttp)]


@pytest.mark.parametrize("which", [OURS, THEIRS])
def test_a_first_head_not_complete_in_time_gets_408(clock: Clock, which: str) -> None:
    driver = server(clock, which)
    if which == THEIRS:  # no deadline: a client may take forever over its head
        assert list(driver.wakeups()) == []
        return
    assert [w.delay for w in driver.wakeups()] == [30]  # counted from the connection's start
    client = driver.layer.context.client
    assert driver.feed(events.DataReceived(client, b"GET / HTTP/1.1\r\nHost: a")) == []
    clock.advance(29)
    assert driver.feed(events.DataReceived(client, b"pi.anthropic.com\r\nX")) == []
    answer = driver.wake()  # 30 s after the start: a trickle does not move the deadline
    assert sent(answer).startswith(b"HTTP/1.1 408 ")
    assert b"request head not complete within 30 s" in sent(answer)
    assert closed(answer)


def test_a_head_complete_in_time_is_served_and_its_wakeup_does_nothing(clock: Clock) -> None:
    driver = server(clock)
    client = driver.layer.context.client
    got = driver.feed(
        events.DataReceived(client, b"GET / HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n")
    )
    assert any(isinstance(c, ReceiveHttp) and isinstance(c.event, RequestHeaders) for c in got)
    after = driver.wake()
    assert not sent(after) and not closed(after)


def test_a_connection_that_never_sends_is_closed_at_the_head_deadline(clock: Clock) -> None:
    driver = server(clock)
    answer = driver.wake()
    assert closed(answer)
    assert sent(answer).startswith(b"HTTP/1.1 408 ")


def many_fields(fields: int, value_size: int = 1) -> bytes:
    """A request head with `fields` header fields (Host among them)."""
    lines = [b"GET / HTTP/1.1", b"Host: api.anthropic.com"]
    lines += [b"X-%d: %s" % (i, b"v" * value_size) for i in range(fields - 1)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@pytest.mark.parametrize("which", [OURS, THEIRS])
@pytest.mark.parametrize(
    ("head", "why"),
    [
        (many_fields(257), b"more than 256 header fields"),
        (many_fields(2, 70_000), b"request head larger than 64 KiB"),
    ],
    ids=["257-fields", "70-KB-head"],
)
def test_an_http1_head_over_the_limits_arriving_at_once_gets_431(
    clock: Clock, which: str, head: bytes, why: bytes
) -> None:
    """h11's receive buffer hands out a whole head however large: the bounded one refuses it."""
    driver = server(clock, which)
    got = driver.feed(events.DataReceived(driver.layer.context.client, head))
    if which == THEIRS:
        assert isinstance(received(got)[0], RequestHeaders)  # parsed and passed on
        return
    assert received(got) == []
    assert sent(got).startswith(b"HTTP/1.1 431 ") and why in sent(got)
    assert closed(got)


@pytest.mark.parametrize("which", [OURS, THEIRS])
def test_an_endless_request_line_gets_414_once_past_the_limit(clock: Clock, which: str) -> None:
    driver = server(clock, which)
    client = driver.layer.context.client
    got = driver.feed(events.DataReceived(client, b"GET /" + b"a" * 40_000))
    assert got == []
    got = driver.feed(events.DataReceived(client, b"a" * 40_000))
    if which == THEIRS:  # buffered, and the next piece will be too
        assert got == [] and len(driver.layer.buf) > 80_000  # type: ignore[attr-defined]
        return
    assert sent(got).startswith(b"HTTP/1.1 414 ")
    assert b"request line longer than 64 KiB" in sent(got)
    assert closed(got)


TRAILERS = (
    b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\nX-Checksum: 1\r\n\r\n"
)


@pytest.mark.parametrize("which", [OURS, THEIRS])
def test_http1_request_trailers_end_the_message(clock: Clock, which: str) -> None:
    """Trailers never change where a message ends; mitmproxy's HTTP/1 server raises on them (a
    traceback, and a client left waiting)."""
    driver = server(clock, which)
    data = events.DataReceived(driver.layer.context.client, TRAILERS)
    if which == THEIRS:
        with pytest.raises(NotImplementedError, match="trailers"):
            driver.feed(data)
        return
    got = received(driver.feed(data))
    assert [type(e) for e in got] == [RequestHeaders, RequestData, RequestEndOfMessage]
    assert isinstance(got[1], RequestData) and got[1].data == b"hello"


def test_a_kept_alive_connection_idle_for_its_limit_is_closed_without_an_answer(
    clock: Clock,
) -> None:
    driver = server(clock)
    client = driver.layer.context.client
    driver.feed(events.DataReceived(client, b"GET / HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n"))
    response = http.Response.make(200, b"ok")
    driver.feed(ResponseHeaders(1, response, end_stream=False))
    driver.feed(ResponseData(1, b"ok"))
    driver.feed(layers.http.ResponseEndOfMessage(1))
    served = clock.now
    got = driver.wake_until(served + 120)
    assert closed(got) and sent(got) == b""  # housekeeping, not a refusal
    assert clock.now == served + 120


# HTTP/2


def http2(
    clock: Clock, which: str, held: Held | None = None
) -> tuple[Driver, h2.connection.H2Connection]:
    context = client_context(alpn=b"h2")
    if which == OURS:
        built: layer.Layer = bounded_http2_server(context, BOUNDS, held)
    else:
        built = Http2Server(context)
    driver = Driver(built, clock)
    peer = h2_client()
    peer.receive_data(sent(driver.feed(events.Start())))  # the server's preface and SETTINGS
    return driver, peer


def exchange(
    driver: Driver, peer: h2.connection.H2Connection, data: bytes = b""
) -> tuple[list[commands.Command], list[h2.events.Event]]:
    """Send what the client has queued (and `data`); what the server did, what the client got."""
    got = driver.feed(events.DataReceived(driver.layer.context.client, peer.data_to_send() + data))
    return got, peer.receive_data(sent(got)) if sent(got) else []


def h2_head(fields: int = 0) -> list[tuple[bytes, bytes]]:
    head = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/v1/models")]
    head.append((b":authority", b"api.anthropic.com"))
    return head + [(b"x-%d" % i, b"v") for i in range(fields)]


@pytest.mark.parametrize("which", [OURS, THEIRS])
def test_an_http2_header_block_over_the_limit_is_refused_before_it_arrives(
    clock: Clock, which: str
) -> None:
    """h2 checks a frame's length only once all of it has arrived (frames up to 128 KiB here,
    64 CONTINUATION frames of them): the bounded server reads the frame header and refuses."""
    driver, peer = http2(clock, which)
    frame_header = (70_000).to_bytes(3) + bytes([0x1, 0x0]) + (1).to_bytes(4)  # HEADERS, open
    got, seen = exchange(driver, peer, frame_header)
    if which == THEIRS:  # waiting for the 70 KB (and then for CONTINUATION frames)
        assert not closed(got) and not any(
            isinstance(e, h2.events.ConnectionTerminated) for e in seen
        )
        return
    [goaway] = [e for e in seen if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert b"header block larger than 64 KiB" in (goaway.additional_data or b"")
    assert closed(got)


@pytest.mark.parametrize("which", [OURS, THEIRS])
def test_an_http2_request_with_too_many_fields_gets_431_on_its_stream(
    clock: Clock, which: str
) -> None:
    driver, peer = http2(clock, which)
    peer.send_headers(1, h2_head(257), end_stream=True)
    got, seen = exchange(driver, peer)
    if which == THEIRS:
        assert isinstance(received(got)[0], RequestHeaders)
        return
    assert received(got) == []
    [response] = [e for e in seen if isinstance(e, h2.events.ResponseReceived)]
    assert (b":status", b"431") in response.headers
    body = b"".join(e.data for e in seen if isinstance(e, h2.events.DataReceived))
    assert b"more than 256 header fields" in body
    assert not closed(got)  # the connection and its other streams go on


@pytest.mark.parametrize("which", [OURS, THEIRS])
def test_an_http2_client_may_open_at_most_a_hundred_streams(clock: Clock, which: str) -> None:
    """Both say so in their SETTINGS: h2 itself defaults to 100, which the bounded server keeps
    whatever h2's default (tests/test_limits.py has the same end to end)."""
    driver, peer = http2(clock, which)
    code = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
    assert peer.remote_settings[code] == 100
    peer.remote_settings[code] = 1000  # a client that does not listen
    peer.remote_settings.acknowledge()
    for _ in range(100):
        peer.send_headers(peer.get_next_available_stream_id(), h2_head(), end_stream=True)
    got, _ = exchange(driver, peer)
    assert len([e for e in received(got) if isinstance(e, RequestHeaders)]) == 100
    peer.send_headers(peer.get_next_available_stream_id(), h2_head(), end_stream=True)
    got, seen = exchange(driver, peer)
    assert not any(isinstance(e, RequestHeaders) for e in received(got))  # not passed on
    [ended] = [
        e
        for e in seen
        if isinstance(e, h2.events.ConnectionTerminated)
        or (isinstance(e, h2.events.StreamReset) and e.stream_id == 201)
    ][:1]
    assert ended.error_code in (
        h2.errors.ErrorCodes.PROTOCOL_ERROR,
        h2.errors.ErrorCodes.REFUSED_STREAM,
    )


@pytest.mark.parametrize("which", [OURS, THEIRS])
def test_a_silent_http2_client_gets_goaway_at_the_head_deadline(clock: Clock, which: str) -> None:
    driver, peer = http2(clock, which)
    if which == THEIRS:
        assert list(driver.wakeups()) == []
        return
    got = driver.wake()
    [goaway] = [
        e for e in peer.receive_data(sent(got)) if isinstance(e, h2.events.ConnectionTerminated)
    ]
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert closed(got)


@pytest.mark.parametrize("which", [OURS, THEIRS])
def test_an_http2_client_that_does_not_read_stops_the_reading_of_its_upstream(
    clock: Clock, which: str, held: Held
) -> None:
    """mitmproxy queues what waits for the client's flow-control window without limit, and keeps
    reading the upstream: the bounded server asks for its upstream to be paused instead."""
    calls: list[bool] = []
    held.upstream_control = lambda client, stop: calls.append(stop)
    driver, peer = http2(clock, which, held)
    peer.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})  # reads nothing
    peer.send_headers(1, h2_head(), end_stream=True)
    exchange(driver, peer)
    driver.feed(ResponseHeaders(1, http.Response.make(200), end_stream=False))
    for _ in range(6):
        driver.feed(ResponseData(1, bytes(MIB)))
    waiting = sum(len(c.data) for q in driver.layer.h2_conn.stream_buffers.values() for c in q)  # type: ignore[attr-defined]
    assert waiting == 6 * MIB
    assert calls == ([] if which == THEIRS else [True, True])  # past 4 MiB: pause, again and again


@pytest.mark.parametrize("which", ["bounded", "timed"])
def test_the_bounded_layer_serves_its_client_with_the_bounded_servers(
    clock: Clock, which: str
) -> None:
    context = client_context()
    built: layer.Layer = (bounded_layer if which == "bounded" else timed_layer)(
        context, HTTPMode.regular
    )
    driver = Driver(built, clock)
    driver.feed(events.Start())
    head = many_fields(257).replace(b"GET / ", b"GET http://api.anthropic.com/ ")
    answer = sent(driver.feed(events.DataReceived(context.client, head)))
    if which == "timed":  # mitmproxy's own server: the request goes on upstream
        assert answer == b"" and driver.opened()
        return
    assert answer.startswith(b"HTTP/1.1 431 ") and not driver.opened()
