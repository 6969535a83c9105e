"""Give freed memory back to the system once a wave of clients has gone.

Python frees a closed connection's objects, but the C allocator keeps the pages for later: after
2000 idle tunnels close, the proxy stays at ~290 MB although nothing holds them (glibc's
malloc_trim brings it back to ~110 MB). `release` asks the allocator to return what is free:
glibc's `malloc_trim(0)`, macOS's `malloc_zone_pressure_relief(NULL, 0)`; elsewhere nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import sys
from collections.abc import Callable

logger = logging.getLogger(__name__)

WAVE = 100  # clients gone since the last peak that make a release worth its cost
SHARE = 4  # ... once at most a quarter of that peak is left
DELAY = 1.0  # seconds for the handlers of the clients gone to end before memory is released


@functools.cache
def _releaser() -> Callable[[], object] | None:
    try:
        if sys.platform == "darwin":
            system = ctypes.CDLL(ctypes.util.find_library("System"))
            relief = system.malloc_zone_pressure_relief
            relief.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            return lambda: relief(None, 0)
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        trim = libc.malloc_trim  # glibc only: musl and others have none
        trim.argtypes = [ctypes.c_size_t]
        return lambda: trim(0)
    except (OSError, AttributeError, TypeError):
        return None


def release() -> None:
    """Collect the connections' reference cycles, then return the allocator's free pages to the
    system (some ms on a large heap: run it off the event loop)."""
    gc.collect()  # a connection's layers and flows refer to each other: the collector frees them
    if (releaser := _releaser()) is not None:
        releaser()


class Waves:
    """Follows the number of clients; says when enough of them have gone to release memory."""

    def __init__(self) -> None:
        self.peak = 0

    def count(self, clients: int) -> bool:
        """Whether to release now, with `clients` open."""
        if clients > self.peak:
            self.peak = clients
            return False
        if self.peak - clients >= WAVE and clients * SHARE <= self.peak:
            self.peak = clients
            return True
        return False
