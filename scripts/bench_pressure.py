"""The benchmark's pressure section: memory after churn and after a wave of idle tunnels, against
idle; how fast clients past the cap get their 503 under a burst (256 open files, as a macOS
terminal). Run by `scripts/bench.py --pressure-only` (and in its full run).

Every figure comes from /proc (VmRSS, VmHWM, the descriptors open) and the clients' own clocks.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.support import burst as bursting
from tests.support import processes

CHURN_CLIENTS = 10  # threads opening, using and closing tunnels as fast as they can
IDLE_TUNNELS = 2000
BURST = 500
BURST_LIMIT = 256  # the open-files limit of the proxy the burst is aimed at
SETTLE_SECONDS = 60  # bound on the wait for the proxy to close what the clients closed
AFTER_SECONDS = 5  # RSS is read this long after the proxy has closed the last client
CONNECT = b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anthropic.com:443\r\n\r\n"


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no {field} for {pid}")


def descriptors(pid: int) -> int:
    """The sockets the proxy holds (files it opens on the way, such as the audit database's
    write-ahead log, stay open: they are not the clients')."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def settle(pid: int, idle_fds: int) -> float:
    """Barrier: the proxy holds no more sockets than when idle (every client closed);
    the seconds it took."""
    began = time.monotonic()
    while descriptors(pid) > idle_fds:
        if time.monotonic() - began > SETTLE_SECONDS:
            raise RuntimeError(f"the proxy still holds {descriptors(pid)} sockets")
        time.sleep(0.05)
    return round(time.monotonic() - began, 2)


def rss_after(pid: int) -> float:
    """RSS AFTER_SECONDS after the last client closed: the same moment for every build (the
    proxy gives memory back about a second after a wave of clients has gone)."""
    time.sleep(AFTER_SECONDS)
    return rss_mb(pid)


def churn(connect: Callable[[], object], use: Callable[[object], None], seconds: float) -> int:
    """CHURN_CLIENTS threads: connect, one request, close, for `seconds`; how many in all."""
    counts = [0] * CHURN_CLIENTS
    stop = time.monotonic() + seconds

    def client(n: int) -> None:
        while time.monotonic() < stop:
            sock = connect()
            try:
                use(sock)
            finally:
                sock.close()  # type: ignore[attr-defined]
            counts[n] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CHURN_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts)


def memory(
    pid: int,
    connect: Callable[[], object],
    use: Callable[[object], None],
    handshake: Callable[[], object],
    seconds: float,
) -> dict[str, float]:
    """RSS idle, after `seconds` of churn, and after IDLE_TUNNELS idle tunnels have closed."""
    warm = connect()  # certificates and caches made before the idle figure
    use(warm)
    warm.close()  # type: ignore[attr-defined]
    idle_fds = descriptors(pid)
    idle = rss_mb(pid)
    made = churn(connect, use, seconds)
    churn_settle = settle(pid, idle_fds)
    after_churn = rss_after(pid)
    tunnels = [handshake() for _ in range(IDLE_TUNNELS)]
    with_tunnels = rss_mb(pid)
    for tunnel in tunnels:
        tunnel.close()  # type: ignore[attr-defined]
    tunnels_settle = settle(pid, idle_fds)
    after_tunnels = rss_after(pid)
    return {
        "idle_rss_mb": idle,
        "churn_connections_per_s": round(made / seconds, 1),
        "after_churn_rss_mb": after_churn,
        "after_churn_ratio": round(after_churn / idle, 3),
        "churn_settle_s": churn_settle,
        f"with_{IDLE_TUNNELS}_idle_tunnels_rss_mb": with_tunnels,
        f"after_{IDLE_TUNNELS}_idle_tunnels_rss_mb": after_tunnels,
        "after_idle_tunnels_ratio": round(after_tunnels / idle, 3),
        "tunnels_settle_s": tunnels_settle,
        "peak_rss_mb": rss_mb(pid, "VmHWM"),
    }


def limited(executable: Path, work: Path) -> Path:
    """A stand-in for `executable` started under an open-files limit of BURST_LIMIT."""
    return processes.limited(executable, work, BURST_LIMIT)


def burst(port: int) -> dict[str, float]:
    """BURST clients connect at once and send a CONNECT; each keeps its socket until all are
    answered. The milliseconds from a client's connect to its 503 (median, p90, max)."""
    got = bursting.burst(port, BURST, CONNECT, b"\r\n\r\n", 60)
    answers = {i: a.data for i, a in enumerate(got) if a.seconds is not None}
    answered_at = {i: a.seconds for i, a in enumerate(got) if a.seconds is not None}
    refused = sorted(
        answered_at[i] * 1000 for i, answer in answers.items() if answer.startswith(b"HTTP/1.1 503")
    )
    admitted = sum(1 for a in answers.values() if a.startswith(b"HTTP/1.1 200"))
    return {
        "admitted": admitted,
        "refused_503": len(refused),
        "unanswered": BURST - admitted - len(refused),
        "503_p50_ms": round(statistics.median(refused), 1) if refused else -1,
        "503_p90_ms": round(refused[int(len(refused) * 0.9)], 1) if refused else -1,
        "503_max_ms": round(refused[-1], 1) if refused else -1,
    }
