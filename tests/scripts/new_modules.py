"""Test-only mitmproxy script: which modules were imported after the proxy started serving.

SIGUSR2 writes their names, one a line, to $CLAUDE_PROXY_TEST_MODULES (then renamed into place,
so the test reads it whole).
"""

import asyncio
import os
import signal
import sys

before: set[str] = set()


def running() -> None:
    before.update(sys.modules)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, report)


def report() -> None:
    path = os.environ["CLAUDE_PROXY_TEST_MODULES"]
    with open(path + ".part", "w") as out:
        out.write("".join(f"{name}\n" for name in sorted(set(sys.modules) - before)))
    os.replace(path + ".part", path)
