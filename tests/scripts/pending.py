"""Test-only mitmproxy script: what the proxy still holds for connections.

SIGUSR2 writes a JSON object to $CLAUDE_PROXY_TEST_PENDING (renamed into place, so the test reads
it whole): the client connections open, the wakeup timers pending, the asyncio tasks alive and
the connection handlers that still exist (after a garbage collection).
"""

import asyncio
import gc
import json
import os
import signal

from mitmproxy import ctx
from mitmproxy.proxy import server


def running() -> None:
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, report)


def report() -> None:
    gc.collect()
    tasks = asyncio.all_tasks()
    counts = {
        "connections": len(ctx.master.addons.get("proxyserver").connections),
        "wakeups": sum(1 for t in tasks if t.get_name().startswith("wakeup timer")),
        "tasks": len(tasks),
        "handlers": sum(1 for o in gc.get_objects() if isinstance(o, server.ConnectionHandler)),
    }
    path = os.environ["CLAUDE_PROXY_TEST_PENDING"]
    with open(path + ".part", "w") as out:
        json.dump(counts, out)
    os.replace(path + ".part", path)
