"""Drive a mitmproxy layer sans I/O, in the manner of mitmproxy's own Playbook: events in,
commands out, on a clock the test moves. Deadlines are then tested by handing the layer the
wakeup it asked for, at the moment the test chooses, instead of waiting real seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from mitmproxy import connection, options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import commands, context, events, layer


def client_context() -> context.Context:
    """A client connection's context, with the options mitmproxy's proxy server declares."""
    opts = options.Options()
    Proxyserver().load(opts)
    client = connection.Client(
        peername=("127.0.0.1", 50000),
        sockname=("127.0.0.1", 9051),
        timestamp_start=time.time(),
        state=connection.ConnectionState.OPEN,
    )
    return context.Context(client, opts)


@dataclass
class Clock:
    """time.monotonic for the modules under test; moves only when the test says so."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Driver:
    """Feeds events to a layer and keeps what it yields; answers no blocking command itself."""

    layer: layer.Layer
    clock: Clock
    out: list[commands.Command] = field(default_factory=list)

    def feed(self, event: events.Event) -> list[commands.Command]:
        got = list(self.layer.handle_event(event))
        self.out += got
        return got

    def wakeups(self) -> Iterator[commands.RequestWakeup]:
        return (c for c in self.out if isinstance(c, commands.RequestWakeup))

    def wake(self) -> list[commands.Command]:
        """Move the clock to the earliest wakeup asked for, and deliver it."""
        wakeups = list(self.wakeups())
        assert wakeups, "the layer asked for no wakeup"
        earliest = min(wakeups, key=lambda w: w.delay)
        self.out = [c for c in self.out if c is not earliest]
        self.clock.advance(earliest.delay)
        return self.feed(events.Wakeup(earliest))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """One clock for every module that reads time.monotonic."""
    fake = Clock()
    monkeypatch.setattr(time, "monotonic", fake)
    return fake
