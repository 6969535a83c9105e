"""The client-side deadlines of the bounded HTTP/1 server, sans I/O: the layer gets the wakeups it
asked for at the moment the test moves its clock to, so a 30 s deadline takes no time to test.
The same deadlines end to end, with real seconds, are in tests/test_limits.py."""

from __future__ import annotations

from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http import ReceiveHttp, RequestHeaders

from claude_proxy.mitm.bounded_http import Bounds
from tests.support.sansio import Clock, Driver, bounded_http1_server, client_context
from tests.support.sansio import clock as clock

BOUNDS = Bounds(head_timeout=30, idle_timeout=120)


def server(clock: Clock) -> Driver:
    context = client_context()
    driver = Driver(bounded_http1_server(context, BOUNDS), clock)
    driver.feed(events.Start())
    return driver


def sent(commands_: list[commands.Command]) -> bytes:
    return b"".join(c.data for c in commands_ if isinstance(c, commands.SendData))


def closed(commands_: list[commands.Command]) -> bool:
    return any(isinstance(c, commands.CloseConnection) for c in commands_)


def test_a_first_head_not_complete_in_time_gets_408(clock: Clock) -> None:
    driver = server(clock)
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
