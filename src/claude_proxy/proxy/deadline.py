"""A deadline that moves, served by few mitmproxy wakeups.

A mitmproxy wakeup (RequestWakeup) cannot be cancelled: it sleeps out its delay. A layer that asked
for one at every change of its deadline would pile them up; this asks for a new one only when the
deadline comes earlier than every wakeup pending, and looks again when one arrives.
"""

from __future__ import annotations

import time

from mitmproxy.proxy import commands, events, layer


class Deadline:
    """A deadline that moves, served by few wakeups: a new one only when it comes earlier."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.pending: dict[commands.RequestWakeup, float] = {}  # wakeup → when it is due

    def set(self, seconds: float) -> layer.CommandGenerator[None]:
        self.at = time.monotonic() + seconds
        yield from self._arm()

    def clear(self) -> None:
        self.at = None

    def passed(self, wakeup: events.Wakeup) -> layer.CommandGenerator[bool]:
        """Account for one of our wakeups; whether the deadline has passed."""
        self.pending.pop(wakeup.command, None)
        if self.at is None:
            return False
        if time.monotonic() >= self.at - 0.001:
            self.at = None
            return True
        yield from self._arm()
        return False

    def _arm(self) -> layer.CommandGenerator[None]:
        if self.at is None or any(due <= self.at for due in self.pending.values()):
            return
        wakeup = commands.RequestWakeup(max(0.0, self.at - time.monotonic()))
        self.pending[wakeup] = self.at
        yield wakeup
