"""Waiting for something the test cannot be told of: polled, within a bound that fails the test."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

DEADLINE = 10.0  # seconds any awaited event may take; running out fails the test


def wait_until(
    condition: Callable[[], object], what: str = "the awaited event", seconds: float = DEADLINE
) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)
