"""The timed HTTP layer and its streams (mitm/timed_http.py), sans I/O: the upstream connection is
answered by the test, and time moves only when the test hands the layer the wakeup it asked for,
so a 30 s limit takes no time to test.

Each scenario also runs on mitmproxy's own HttpLayer, to show what the timed layer adds: there a
request whose upstream never answers waits without end (mitmproxy's only limit, `tcp_timeout`,
closes the client connection without a status after ten minutes of silence).

The same limits end to end, through the real proxy and real sockets, are in tests/test_timeouts.py
and tests/test_limits.py."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from mitmproxy import connection, http
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.layers.http import HTTPMode

from claude_proxy.proxy.upstream_timeouts import Recheck
from tests.support.sansio import Clock, Driver, client_context, timed_layer
from tests.support.sansio import clock as clock

CONNECT, RESPONSE = 30, 600  # seconds: the limits set for these tests
REQUEST = b"GET http://api.anthropic.com/v1/models HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n"
OURS, THEIRS = "timed", "mitmproxy"


def start(clock: Clock, which: str, recheck: Recheck | None = None, tls: int = CONNECT) -> Driver:
    ctx = client_context(
        sandbox_connect_timeout=CONNECT, sandbox_tls_timeout=tls, sandbox_response_timeout=RESPONSE
    )
    built: layer.Layer
    if which == OURS:
        built = timed_layer(ctx, HTTPMode.regular, recheck)
    else:
        built = layers.HttpLayer(ctx, HTTPMode.regular)
    driver = Driver(built, clock)
    driver.feed(events.Start())
    return driver


def client(driver: Driver) -> connection.Client:
    return driver.layer.context.client


def ask(driver: Driver, request: bytes = REQUEST) -> commands.OpenConnection:
    """The client sends a request; the layer opens an upstream connection for it."""
    driver.feed(events.DataReceived(client(driver), request))
    [opened] = driver.opened()[-1:]
    assert opened.connection.address == ("api.anthropic.com", 80)
    return opened


def connecting(opened: commands.OpenConnection) -> connection.Server:
    """mitmproxy's connection handler has a slot for it and has begun to connect."""
    opened.connection.timestamp_start = time_now()
    return opened.connection


def connected(driver: Driver, opened: commands.OpenConnection) -> connection.Server:
    server = connecting(opened)
    server.timestamp_tcp_setup = time_now()
    server.state = connection.ConnectionState.OPEN
    driver.feed(events.OpenConnectionCompleted(opened, None))
    return server


def failed(driver: Driver, opened: commands.OpenConnection, err: str) -> list[commands.Command]:
    """mitmproxy reports a connection that could not be made (or that was closed as it was)."""
    opened.connection.error = err
    return driver.feed(events.OpenConnectionCompleted(opened, err))


def time_now() -> float:
    return time.time()  # the test's clock


def status(head: bytes) -> int | None:
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None


@pytest.mark.parametrize("which", [OURS, THEIRS])
@pytest.mark.parametrize(
    ("handshake", "what"),
    [
        (False, "connecting to api.anthropic.com:80 timed out after 30 s"),
        (True, "the TLS handshake with api.anthropic.com:80 timed out after 30 s"),
    ],
    ids=["tcp-connect", "tls-handshake"],
)
def test_a_connect_that_never_completes_gets_504_naming_the_step(
    clock: Clock, which: str, handshake: bool, what: str
) -> None:
    driver = start(clock, which)
    asked = clock.now
    opened = ask(driver)
    server = connecting(opened)
    if handshake:  # the TCP connection is made; the TLS handshake never ends
        server.timestamp_tcp_setup = time_now()
    got = driver.wake_until(asked + CONNECT)
    if which == THEIRS:
        assert not driver.due and not got  # nothing will ever end the wait
        return
    assert driver.closed(server, got)  # given up: mitmproxy then reports it failed
    answer = driver.sent(client(driver), failed(driver, opened, "connection cancelled"))
    assert status(answer) == 504, answer
    assert what.encode() in answer
    assert clock.now <= asked + CONNECT


def test_a_tls_limit_shorter_than_the_connect_limit_counts(clock: Clock) -> None:
    driver = start(clock, OURS, tls=5)
    opened = ask(driver)
    server = connecting(opened)
    clock.advance(1)
    server.timestamp_tcp_setup = time_now()  # connected after 1 s; the handshake never ends
    got = driver.wake_until(clock.now + 5)
    assert driver.closed(server, got)
    answer = driver.sent(client(driver), failed(driver, opened, "connection cancelled"))
    assert status(answer) == 504, answer
    assert b"the TLS handshake with api.anthropic.com:80 timed out after 5 s" in answer


@pytest.mark.parametrize("which", [OURS, THEIRS])
def test_a_response_head_that_never_comes_gets_504(clock: Clock, which: str) -> None:
    driver = start(clock, which)
    opened = ask(driver)
    server = connected(driver, opened)
    assert driver.sent(server).startswith(b"GET /v1/models HTTP/1.1\r\n")
    sent_at = clock.now
    got = driver.wake_until(sent_at + RESPONSE)
    if which == THEIRS:
        assert not driver.due and not got
        return
    answer = driver.sent(client(driver), got)
    assert status(answer) == 504, answer
    what = "waiting for the response head from api.anthropic.com:80 timed out after 600 s"
    assert what.encode() in answer
    assert driver.closed(server, got)  # HTTP/1: the request is abandoned with its connection


def test_a_response_whose_head_arrived_is_never_cut(clock: Clock) -> None:
    """An SSE stream may pause for longer than the limit once its response has begun."""
    driver = start(clock, OURS)
    server = connected(driver, ask(driver))
    clock.advance(RESPONSE - 1)
    driver.feed(
        events.DataReceived(server, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    )
    driver.feed(events.DataReceived(server, b"6\r\nevent1\r\n"))
    got = driver.wake_until(clock.now + 10 * RESPONSE)  # a long pause after the head
    assert not driver.sent(client(driver), got) and not driver.closed(server, got)
    driver.feed(events.DataReceived(server, b"6\r\nevent2\r\n0\r\n\r\n"))
    answer = driver.sent(client(driver))
    assert status(answer) == 200, answer
    assert b"\r\nevent1event2\r\n" in answer


@pytest.mark.parametrize("which", [OURS, THEIRS])
def test_a_request_waiting_for_a_free_connection_slot_gets_504_within_the_connect_limit(
    clock: Clock, which: str
) -> None:
    """mitmproxy's connection handler opens at most five connections to one destination at once:
    a sixth does not start connecting (no timestamp_start) until one of them closes."""
    driver = start(clock, which)
    asked = clock.now
    opened = ask(driver)  # and mitmproxy's handler never gets a slot for it
    got = driver.wake_until(asked + CONNECT)
    if which == THEIRS:
        assert not driver.due and not got
        return
    answer = driver.sent(client(driver), got)
    assert status(answer) == 504, answer
    assert b"waiting for a free connection to api.anthropic.com:80" in answer
    assert b"timed out after 30 s" in answer
    assert clock.now <= asked + CONNECT
    # Its slot comes at last: the request that was answered is not sent.
    server = connected(driver, opened)
    assert driver.sent(server) == b""


def refuse(flow: http.HTTPFlow) -> bool:
    flow.response = http.Response.make(403, b"refused by the policy now in force\n")
    return True


def allow(flow: http.HTTPFlow) -> bool:
    return False


@pytest.mark.parametrize(
    ("recheck", "refused"), [(refuse, True), (allow, False)], ids=["now-refused", "still-allowed"]
)
def test_a_request_that_waited_for_its_connection_is_decided_again(
    clock: Clock, recheck: Callable[[http.HTTPFlow], bool], refused: bool
) -> None:
    driver = start(clock, OURS, recheck)
    opened = ask(driver)
    clock.advance(CONNECT / 2)  # the policy may change while the connection opens
    server = connected(driver, opened)
    answer = driver.sent(client(driver))
    if refused:
        assert status(answer) == 403, answer
        assert answer.endswith(b"refused by the policy now in force\n")
        assert driver.sent(server) == b""  # nothing of it reached the upstream
    else:
        assert answer == b""
        assert driver.sent(server).startswith(b"GET /v1/models HTTP/1.1\r\n")


@pytest.mark.parametrize("which", [OURS, THEIRS])
def test_a_retry_after_a_failed_connection_gets_a_new_connection(clock: Clock, which: str) -> None:
    """A connection that failed (a timeout, a name that did not resolve) may work a moment later:
    a retry on the same client connection tries again instead of failing with the old error."""
    driver = start(clock, which)
    first = ask(driver)
    answer = driver.sent(client(driver), failed(driver, first, "connection cancelled"))
    assert status(answer) == 502 if which == OURS else answer.startswith(b"HTTP/1.1 502")
    opened = len(driver.opened())
    driver.feed(events.DataReceived(client(driver), REQUEST))
    retried = len(driver.opened()) > opened
    assert retried is (which == OURS)
