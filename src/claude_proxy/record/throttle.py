"""The one rate limit on log lines: a failure or refusal that repeats is said once per interval,
with how many were left out. (The audit log's runs of refusals alike, `decisions.Repeats`, also
count what they leave out, but keep every refusal in the database: a record, not a log line.)
"""

from __future__ import annotations

import time

LOG_EVERY = 10.0  # seconds between two lines about the same repeated failure


class Throttle:
    """At most one line per `interval` seconds; the caller learns how many were left out."""

    def __init__(self, interval: float = LOG_EVERY) -> None:
        self.interval = interval
        self.next_at = 0.0
        self.skipped = 0

    def allow(self) -> int | None:
        """None: stay quiet. Else the number of lines left out since the last one."""
        now = time.monotonic()
        if now < self.next_at:
            self.skipped += 1
            return None
        self.next_at = now + self.interval
        skipped, self.skipped = self.skipped, 0
        return skipped
