"""Drive a mitmproxy layer sans I/O, in the manner of mitmproxy's own Playbook: events in,
commands out, on a clock the test moves. Deadlines are then tested by handing the layer the
wakeup it asked for, at the moment the test chooses, instead of waiting real seconds.

Next to tests/support/playbook.py (mitmproxy's Playbook, which asserts the exact sequence of
commands a layer yields): `Driver` completes every blocking hook itself and lets the test ask what
was sent, closed or opened, for layers (the HTTP servers and streams) whose exact command order
is mitmproxy's, not the proxy's, and would only make the tests brittle.

The layers of `claude_proxy.mitm` are built here only (`bounded_layer`, `timed_layer`,
`bounded_http1_server`, `bounded_http2_server`): when their constructors change, these change,
not the tests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import h2.config
import h2.connection
import pytest
from mitmproxy import connection, options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import commands, context, events, layer
from mitmproxy.proxy.layers.http import HTTPMode

from claude_proxy.mitm.bounded_http import (
    BoundedHttp1Server,
    BoundedHttp2Server,
    BoundedHttpLayer,
    Bounds,
)
from claude_proxy.mitm.timed_http import TimedHttpLayer
from claude_proxy.proxy.held_bodies import Held
from claude_proxy.proxy.upstream_timeouts import Recheck, Timeouts
from claude_proxy.record.decisions import Recorder

WALL = 1_700_000_000.0  # time.time() when the test clock reads 0


def client_context(alpn: bytes | None = None, **settings: object) -> context.Context:
    """A client connection's context, with the options mitmproxy's proxy server and the proxy's
    upstream limits declare (`settings` set some of them)."""
    opts = options.Options()
    Proxyserver().load(opts)
    Timeouts(Held()).load(opts)
    opts.update(**settings)
    client = connection.Client(
        peername=("127.0.0.1", 50000),
        sockname=("127.0.0.1", 9051),
        timestamp_start=time.time(),
        state=connection.ConnectionState.OPEN,
        alpn=alpn,
    )
    return context.Context(client, opts)


# The one place the tests build the layers of claude_proxy.mitm. `held` is the budget their
# streams count in (each test its own: the `held` fixture).


def bounded_layer(
    ctx: context.Context,
    mode: HTTPMode = HTTPMode.regular,
    bounds: Bounds | None = None,
    recheck: Recheck | None = None,
    held: Held | None = None,
) -> BoundedHttpLayer:
    return BoundedHttpLayer(ctx, mode, bounds or Bounds(), held or Held(), Recorder(), recheck)


def timed_layer(
    ctx: context.Context,
    mode: HTTPMode = HTTPMode.regular,
    recheck: Recheck | None = None,
    held: Held | None = None,
) -> TimedHttpLayer:
    return TimedHttpLayer(ctx, mode, held or Held(), Recorder(), recheck)


def bounded_http1_server(ctx: context.Context, bounds: Bounds | None = None) -> BoundedHttp1Server:
    return BoundedHttp1Server(ctx, bounds or Bounds(), Recorder())


def bounded_http2_server(
    ctx: context.Context, bounds: Bounds | None = None, held: Held | None = None
) -> BoundedHttp2Server:
    return BoundedHttp2Server(ctx, bounds or Bounds(), Recorder(), held or Held())


@pytest.fixture
def held() -> Held:
    """A budget of held bytes of the test's own, handed to the layers it builds."""
    return Held()


@dataclass
class Clock:
    """time.monotonic (and time.time, WALL ahead) for the code under test; moves only when the
    test says so."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """One clock for every module that reads time.monotonic or time.time."""
    fake = Clock()
    monkeypatch.setattr(time, "monotonic", fake)
    monkeypatch.setattr(time, "time", fake.wall)
    return fake


@dataclass
class Driver:
    """Feeds events to a layer and keeps what it yields. It completes every blocking hook at once
    (as mitmproxy does when no addon holds it), and nothing else: the test answers the rest."""

    layer: layer.Layer
    clock: Clock
    out: list[commands.Command] = field(default_factory=list)
    due: dict[commands.RequestWakeup, float] = field(default_factory=dict)  # wakeup → when

    def feed(self, event: events.Event) -> list[commands.Command]:
        got: list[commands.Command] = []
        pending = [event]
        while pending:
            for command in self.layer.handle_event(pending.pop(0)):
                got.append(command)
                if isinstance(command, commands.RequestWakeup):
                    self.due[command] = self.clock.now + command.delay
                elif isinstance(command, commands.StartHook) and command.blocking:
                    pending.append(events.HookCompleted(command))
        self.out += got
        return got

    def wakeups(self) -> Iterator[commands.RequestWakeup]:
        return iter(self.due)

    def wake(self) -> list[commands.Command]:
        """Move the clock to the earliest wakeup asked for (unless past it), and deliver it."""
        assert self.due, "the layer asked for no wakeup"
        earliest = min(self.due, key=self.due.__getitem__)
        self.clock.now = max(self.clock.now, self.due.pop(earliest))
        return self.feed(events.Wakeup(earliest))

    def wake_until(self, at: float) -> list[commands.Command]:
        """Deliver every wakeup due by `at` (monotonic), in order, then move the clock to `at`."""
        got: list[commands.Command] = []
        while self.due and min(self.due.values()) <= at:
            got += self.wake()
        self.clock.now = max(self.clock.now, at)
        return got

    def sent(self, to: connection.Connection, got: list[commands.Command] | None = None) -> bytes:
        """The bytes sent to one connection (by `got`, or by every event so far)."""
        return b"".join(
            c.data
            for c in (self.out if got is None else got)
            if isinstance(c, commands.SendData) and c.connection is to
        )

    def closed(
        self, conn: connection.Connection, got: list[commands.Command] | None = None
    ) -> bool:
        return any(
            isinstance(c, commands.CloseConnection) and c.connection is conn
            for c in (self.out if got is None else got)
        )

    def opened(self) -> list[commands.OpenConnection]:
        return [c for c in self.out if isinstance(c, commands.OpenConnection)]


def h2_client() -> h2.connection.H2Connection:
    """An HTTP/2 client's side of a connection, its preface ready to send."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    return conn
