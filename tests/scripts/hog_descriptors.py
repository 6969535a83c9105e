"""Test-only mitmproxy script: once running, holds every free descriptor; SIGUSR1 gives them back.

Stands for a proxy that has run out of descriptors (too many clients, a leak): accepts then fail.
"""

import asyncio
import os
import signal

held: list[int] = []


def running() -> None:
    while True:
        try:
            held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            break
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, release)


def release() -> None:
    while held:
        os.close(held.pop())
