"""Benchmark: direct connection vs plain mitmdump vs claude-proxy, side by side, in one run;
then claude-proxy with a 200-rule config.toml against its default policy, and a reload under load.

    uv run python scripts/bench.py [--seconds 3] [--download-mb 1024] [--json out.json]
    uv run python scripts/bench.py --policy-only     # only the policy comparison and the reload
    uv run python scripts/bench.py --audit-only     # the audit database on vs off, and its size
    uv run python scripts/bench.py --before OLD/claude-proxy [--versions-only]
        # also an earlier build: both running, measured in alternating rounds, and on its own
    uv run python scripts/bench.py --fetch-only     # the server-fetch check on vs off
    uv run python scripts/bench.py --flood-only     # RSS under an HTTP/2 stream flood
    uv run python scripts/bench.py --startup-only   # env, check, --help, paths, status vs python
    uv run python scripts/bench.py --pressure-only [--churn-seconds 30] [--before OLD/claude-proxy]
        # RSS after churn and after 2000 idle tunnels close, against idle; 503s under a burst

Everything is on loopback: a local HTTPS upstream (tests/upstream.py) plays api.anthropic.com,
and both proxies route upstream connections to it with the same test script. The machine is
shared and noisy: the figures that matter are medians and ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import trustme

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts import bench_pressure  # noqa: E402
from tests.upstream import Account, Upstream  # noqa: E402

BIN = Path(sys.executable).parent
ROUTE = ROOT / "tests" / "scripts" / "route_to_upstream.py"
HOST = "api.anthropic.com"
BLOCKED = b"127.0.0.1:9"  # refused by claude-proxy's policy; mitmdump tries it (ECONNREFUSED)
ORG = "0a0a0a0a-aaaa-4aaa-8aaa-00000000000a"  # the organization the benchmark's keys belong to
REFUSED_NAME = b"a.b.refused.example.org:443"  # a name: the policy walks its parent domains
POLICY_ROUNDS = 5  # each policy is measured this many times, alternately; medians reported
RELOADS = 20
VERSION_ROUNDS = 6  # this build and --before are compared this many times, alternately
FETCH_ROUNDS = 6  # the server-fetch check on and off, alternately
MESSAGES_MB = 5  # the size of the Messages body the check reads


@dataclass
class Route:
    """How a client reaches the upstream: directly, or through a proxy on `port`."""

    name: str
    port: int | None
    trust: Path
    process: subprocess.Popen[bytes] | None = None
    start_seconds: float = 0.0
    start_cpu_seconds: float = 0.0  # the process's own CPU time from exec to listening

    def tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.trust))
        context.set_alpn_protocols(["http/1.1"])
        return context

    def connect(self, upstream_port: int) -> ssl.SSLSocket:
        if self.port is None:
            raw = socket.create_connection(("127.0.0.1", upstream_port), timeout=20)
        else:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=20)
            raw.sendall(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
            head = read_head(raw)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"{self.name}: CONNECT failed: {head[:80]!r}")
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.tls_context().wrap_socket(raw, server_hostname=HOST)

    def rss_kb(self, field: str = "VmRSS") -> int | None:
        if self.process is None:
            return None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return None


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data[:80]!r}")
        data += chunk
    return data


def get(
    sock: ssl.SSLSocket, path: str, sink: Callable[[bytes], None] | None = None, key: str = ""
) -> int:
    """One GET with a Content-Length response (with `key`: as x-api-key); returns the body size."""
    credential = f"x-api-key: {key}\r\n" if key else ""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n{credential}\r\n".encode())
    data = read_head(sock)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    received = len(body)
    if sink:
        sink(body)
    while received < length:
        chunk = sock.recv(min(1 << 20, length - received))
        if not chunk:
            raise ConnectionError("body cut short")
        received += len(chunk)
        if sink:
            sink(chunk)
    return received


def start(name: str, args: list[str], home: Path, trust: Path, upstream: Upstream) -> Route:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env.update(
        HOME=str(home),
        CLAUDE_PROXY_TEST_UPSTREAM_PORT=str(upstream.port),
        CLAUDE_PROXY_TEST_UNROUTED=BLOCKED.decode(),
    )
    began = time.perf_counter()
    process = subprocess.Popen(
        args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output = process.stdout
    assert output is not None
    for raw in output:
        line = raw.decode(errors="replace")
        if match := re.search(r"listening (?:on|at) \S*:(\d+)", line):
            port = int(match[1])
            break
    else:
        raise RuntimeError(f"{name} did not start")
    elapsed = time.perf_counter() - began
    threading.Thread(target=output.read, daemon=True).start()  # keep the pipe drained
    route = Route(name, port, trust, process, elapsed)
    route.start_cpu_seconds = cpu_seconds(route)
    return route


def start_claude_proxy(
    work: Path,
    upstream: Upstream,
    upstream_ca: Path,
    *,
    name: str = "claude-proxy",
    executable: Path = BIN / "claude-proxy",
    extra: tuple[str, ...] = ("--socks-port", "0"),
    pin: str | None = None,
    config: str | None = None,
) -> Route:
    home = work / f"{name}-home".replace(" ", "-").replace(",", "")
    home.mkdir(exist_ok=True)
    if pin:
        env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
        env["HOME"] = str(home)
        pinned = [str(BIN / "claude-proxy"), "pin", pin]
        subprocess.run(pinned, env=env, check=True, capture_output=True)
    if config is not None:
        (home / ".config" / "claude-proxy").mkdir(parents=True, exist_ok=True)
        (home / ".config" / "claude-proxy" / "config.toml").write_text(config)
    args = [
        str(executable), "--port", "0", *extra,
        "--set", f"scripts={ROUTE}",
        "--set", f"ssl_verify_upstream_trusted_ca={upstream_ca}",
    ]  # fmt: skip
    trust = home / ".config" / "claude-proxy" / "mitmproxy-ca-cert.pem"
    return start(name, args, home, trust, upstream)


def start_mitmdump(work: Path, upstream: Upstream, upstream_ca: Path) -> Route:
    confdir = work / "mitmdump-conf"
    args = [
        str(BIN / "mitmdump"), "--listen-host", "127.0.0.1", "--listen-port", "0",
        "--set", f"confdir={confdir}", "-s", str(ROUTE),
        "--set", f"ssl_verify_upstream_trusted_ca={upstream_ca}",
    ]  # fmt: skip
    return start("mitmdump", args, work, confdir / "mitmproxy-ca-cert.pem", upstream)


def refused_per_second(target: Route, seconds: float, blocked: bytes = BLOCKED) -> float | None:
    if target.port is None:
        return None
    count, deadline = 0, time.perf_counter() + seconds
    began = time.perf_counter()
    while time.perf_counter() < deadline and count < 100_000:
        with socket.create_connection(("127.0.0.1", target.port), timeout=30) as sock:
            sock.sendall(b"CONNECT " + blocked + b" HTTP/1.1\r\nHost: " + blocked + b"\r\n\r\n")
            status = read_head(sock).split(b" ", 2)[1]
            assert status in (b"403", b"502"), status
        count += 1
    return count / (time.perf_counter() - began)


def keepalive_per_second(target: Route, upstream: Upstream, seconds: float, key: str = "") -> float:
    sock = target.connect(upstream.port)
    get(sock, "/warm", key=key)
    count, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds and count < 200_000:
        get(sock, "/ka", key=key)
        count += 1
    sock.close()
    return count / (time.perf_counter() - began)


def fresh_connection_ms(target: Route, upstream: Upstream, rounds: int) -> float:
    timings = []
    for _ in range(rounds):
        began = time.perf_counter()
        sock = target.connect(upstream.port)
        get(sock, "/fresh")
        timings.append((time.perf_counter() - began) * 1000)
        sock.close()
    return statistics.median(timings)


def first_event_ms(target: Route, upstream: Upstream, rounds: int) -> float:
    """Request to first SSE event, on an open connection; events are 50 ms apart."""
    timings = []
    for _ in range(rounds):
        sock = target.connect(upstream.port)
        began = time.perf_counter()
        sock.sendall(f"GET /sse?n=6&gap=0.05 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        data = b""
        while b"data: 0" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        timings.append((time.perf_counter() - began) * 1000)
        while sock.recv(65536):
            pass
        sock.close()
    return statistics.median(timings)


def download(target: Route, upstream: Upstream, size: int) -> tuple[float, int | None]:
    """MB/s for one `size`-byte body, and the proxy's peak RSS (kB) afterwards."""
    sock = target.connect(upstream.port)
    began = time.perf_counter()
    received = get(sock, f"/bytes?size={size}")
    elapsed = time.perf_counter() - began
    sock.close()
    assert received == size
    return size / elapsed / 1e6, target.rss_kb("VmHWM")


def measure(
    target: Route, upstream: Upstream, args: argparse.Namespace
) -> dict[str, float | int | None]:
    print(f"measuring {target.name}…", file=sys.stderr, flush=True)
    idle = target.rss_kb()
    result: dict[str, float | int | None] = {
        "start_s": round(target.start_seconds, 2) if target.process else None,
        "start_cpu_s": round(target.start_cpu_seconds, 2) if target.process else None,
        "idle_rss_mb": round(idle / 1024, 1) if idle else None,
    }
    refused = refused_per_second(target, args.seconds)
    result["refused_per_s"] = round(refused) if refused else None
    result["keepalive_rps"] = round(keepalive_per_second(target, upstream, args.seconds))
    result["fresh_conn_p50_ms"] = round(fresh_connection_ms(target, upstream, args.rounds), 2)
    result["first_sse_event_p50_ms"] = round(first_event_ms(target, upstream, 15), 2)
    mbps, peak = download(target, upstream, args.download_mb * 1024 * 1024)
    result["download_mb_per_s"] = round(mbps, 1)
    result["peak_rss_mb"] = round(peak / 1024, 1) if peak else None
    return result


def measure_pin(
    work: Path, upstream: Upstream, upstream_ca: Path, args: argparse.Namespace
) -> dict[str, float]:
    """Keep-alive requests/s with a key, pinned or not (interleaved); a new key's first request."""
    print("measuring the organization pin…", file=sys.stderr, flush=True)
    key = "sk-ant-api03-bench-key"
    upstream.accounts[key] = Account(ORG)
    plain = start_claude_proxy(work, upstream, upstream_ca, name="claude-proxy-unpinned")
    pinned = start_claude_proxy(work, upstream, upstream_ca, name="claude-proxy-pinned", pin=ORG)
    rates: dict[str, list[float]] = {"plain": [], "pinned": []}
    first, later = [], []
    try:
        for _ in range(6):  # interleaved, so that the machine's noise hits both alike
            rates["plain"].append(keepalive_per_second(plain, upstream, args.seconds / 3, key))
            rates["pinned"].append(keepalive_per_second(pinned, upstream, args.seconds / 3, key))
        sock = pinned.connect(upstream.port)
        for i in range(args.rounds):
            new_key = f"sk-ant-api03-bench-new-key-{i}"
            upstream.accounts[new_key] = Account(ORG)
            for timings in (first, later):  # the first request waits for the probe
                began = time.perf_counter()
                get(sock, "/pin", key=new_key)
                timings.append((time.perf_counter() - began) * 1000)
        sock.close()
    finally:
        for target in (plain, pinned):
            assert target.process is not None
            target.process.terminate()
            target.process.wait(30)
    plain_rps, pinned_rps = statistics.median(rates["plain"]), statistics.median(rates["pinned"])
    return {
        "keepalive_with_key_rps": round(plain_rps),
        "keepalive_with_key_pinned_rps": round(pinned_rps),
        "pinned_vs_plain": round(pinned_rps / plain_rps, 3),
        "new_key_first_request_p50_ms": round(statistics.median(first), 2),
        "new_key_later_request_p50_ms": round(statistics.median(later), 2),
    }


def audit_comparison(
    work: Path, upstream: Upstream, upstream_ca: Path, args: argparse.Namespace
) -> dict[str, float | int]:
    """The audit database on vs off, measured in turns in the same run, and its size."""
    on = start_claude_proxy(work, upstream, upstream_ca, name="audit-on")
    off_flags = ("--socks-port", "0", "--set", "sandbox_audit=false")
    off = start_claude_proxy(work, upstream, upstream_ca, name="audit-off", extra=off_flags)
    rates: dict[str, dict[str, list[float]]] = {
        t.name: {"keepalive_rps": [], "refused_per_s": []} for t in (on, off)
    }
    try:
        for turn in range(args.audit_rounds):
            print(f"audit on vs off, round {turn + 1}…", file=sys.stderr, flush=True)
            for target in (on, off) if turn % 2 == 0 else (off, on):
                rates[target.name]["keepalive_rps"].append(
                    keepalive_per_second(target, upstream, args.seconds)
                )
                rates[target.name]["refused_per_s"].append(
                    refused_per_second(target, args.seconds) or 0.0
                )
    finally:
        for target in (on, off):
            assert target.process is not None
            target.process.terminate()  # the writer flushes and checkpoints as it stops
            target.process.wait(30)
    db = work / "audit-on-home" / ".local" / "state" / "claude-proxy" / "audit.db"
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT count(*) FROM decisions").fetchone()[0]
    size = sum(p.stat().st_size for p in db.parent.glob("audit.db*"))
    result: dict[str, float | int] = {}
    for metric in ("keepalive_rps", "refused_per_s"):
        with_audit = statistics.median(rates["audit-on"][metric])
        without = statistics.median(rates["audit-off"][metric])
        result[f"{metric}_audit_on"] = round(with_audit)
        result[f"{metric}_audit_off"] = round(without)
        result[f"{metric}_on_vs_off"] = round(with_audit / without, 3)
    result["decisions_recorded"] = rows
    result["database_bytes"] = size
    result["mb_per_million_decisions"] = round(size / rows, 1)  # bytes per row = MB per million
    return result


def ratio(a: float | int | None, b: float | int | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def print_table(results: dict[str, dict[str, float | int | None]]) -> None:
    before = results.get("before", {})
    print(f"{'metric':<24}{'direct':>12}{'mitmdump':>12}{'claude-proxy':>14}{'before':>10}"
          f"{'cp/direct':>11}{'cp/mitmdump':>13}{'cp/before':>11}")  # fmt: skip
    for key in results["direct"]:
        d, m, c = (results[n][key] for n in ("direct", "mitmdump", "claude-proxy"))
        b = before.get(key)
        print(f"{key:<24}{d if d is not None else '-':>12}{m if m is not None else '-':>12}"
              f"{c if c is not None else '-':>14}{b if b is not None else '-':>10}"
              f"{ratio(c, d):>11}{ratio(c, m):>13}{ratio(c, b):>11}")  # fmt: skip


def policy_config(extra: str = "") -> str:
    """200 rules: exact, wildcard and path rules, and denies (one on the measured host's paths)."""
    rules = ["defaults = false", extra]
    rules.append(
        f'[[allow]]\nhost = "{HOST}"\nmethods = ["GET", "POST"]\n'
        'paths = ["/warm", "/ka", "/fresh", "/sse", "/bytes", "/v1/"]'
    )
    rules.append(f'[[deny]]\nhost = "{HOST}"\npaths = ["/admin", "/v1/files"]')
    rules += [f'[[allow]]\nhost = "host{i}.example.com"\nports = [443, 8443]' for i in range(80)]
    rules += [f'[[allow]]\nhost = "*.zone{i}.example.net"' for i in range(60)]
    rules += [
        f'[[allow]]\nhost = "api{i}.example.org"\nmethods = ["GET"]\n'
        f'paths = ["/v{i}/", "/pkg/*/tarball", "/docs/**"]'
        for i in range(50)
    ]
    rules += [f'[[deny]]\nhost = "deny{i}.zone{i}.example.net"' for i in range(8)]
    return "\n\n".join(rules) + "\n"


def cpu_seconds(target: Route) -> float:
    assert target.process is not None
    fields = Path(f"/proc/{target.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fresh_per_second(target: Route, upstream: Upstream, seconds: float) -> float:
    """Allowed fresh connections (CONNECT, TLS, one GET) per second, one client."""
    count, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        sock = target.connect(upstream.port)
        get(sock, "/fresh")
        sock.close()
        count += 1
    return count / (time.perf_counter() - began)


# A measurement: its figure, and how many operations it took (for the proxy's CPU per operation).
Metric = Callable[[Route], tuple[float, int]]


def rate_metric(measure: Callable[[Route], float], seconds: float) -> Metric:
    def run(target: Route) -> tuple[float, int]:
        rate = measure(target)
        return rate, max(1, round(rate * seconds))

    return run


def compare(
    a: Route, b: Route, metrics: dict[str, Metric], rounds: int, label: str
) -> dict[str, dict[str, float]]:
    """The same measurements on both, in rounds (AB, BA, AB, …: the machine's load drifts).

    Reports each one's median, and the median of the per-round ratios (b / a). Beside each
    figure, the proxy's own CPU time per operation: what other load on the machine does to the
    rates, it does far less to this.
    """
    samples: dict[str, dict[str, list[float]]] = {a.name: {}, b.name: {}}
    for n in range(rounds):
        print(f"{label} round {n + 1} of {rounds}…", file=sys.stderr, flush=True)
        for key, measure_one in metrics.items():
            for target in (a, b) if n % 2 == 0 else (b, a):
                before = cpu_seconds(target)
                value, operations = measure_one(target)
                per_op = (cpu_seconds(target) - before) / operations * 1e6
                found = samples[target.name]
                found.setdefault(key, []).append(value)
                found.setdefault(cpu_key(key), []).append(per_op)
    result = {
        name: {key: round(statistics.median(values), 2) for key, values in found.items()}
        for name, found in samples.items()
    }
    result["ratio"] = {
        key: round(
            statistics.median(
                [x / y for x, y in zip(samples[b.name][key], samples[a.name][key], strict=True)]
            ),
            3,
        )
        for key in samples[b.name]
    }
    return result


def cpu_key(key: str) -> str:
    """refused_per_s → refused_cpu_us; first_sse_event_ms → first_sse_event_cpu_us."""
    return key.split("_per_")[0].removesuffix("_ms") + "_cpu_us"


def compare_policies(
    defaults: Route, rules: Route, upstream: Upstream, seconds: float
) -> dict[str, dict[str, float]]:
    metrics = {
        "refused_per_s": rate_metric(
            lambda t: refused_per_second(t, seconds, REFUSED_NAME) or 0.0, seconds
        ),
        "keepalive_per_s": rate_metric(
            lambda t: keepalive_per_second(t, upstream, seconds), seconds
        ),
        "fresh_per_s": rate_metric(lambda t: fresh_per_second(t, upstream, seconds), seconds),
    }
    return compare(defaults, rules, metrics, POLICY_ROUNDS, "policy")


def compare_versions(
    before: Route, now: Route, upstream: Upstream, seconds: float
) -> dict[str, dict[str, float]]:
    """This build against an earlier one: the figures a change must not make worse."""
    sse_rounds = 15

    def first_sse(target: Route) -> tuple[float, int]:
        return first_event_ms(target, upstream, sse_rounds), sse_rounds

    metrics = {
        "keepalive_per_s": rate_metric(
            lambda t: keepalive_per_second(t, upstream, seconds), seconds
        ),
        "first_sse_event_ms": first_sse,
        "refused_per_s": rate_metric(lambda t: refused_per_second(t, seconds) or 0.0, seconds),
    }
    return compare(before, now, metrics, VERSION_ROUNDS, "before vs now")


def reload_under_load(target: Route, upstream: Upstream) -> dict[str, int]:
    """Keep-alive and fresh-connection clients run while the config is replaced RELOADS times
    (by rename, or in place plus SIGHUP); every request must get its 200."""
    home = target.trust.parent.parent.parent
    config = home / ".config" / "claude-proxy" / "config.toml"
    state = home / ".local" / "state" / "claude-proxy" / f"proxy-{target.port}.json"
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    lock = threading.Lock()

    def client(fresh: bool) -> None:
        sock = None
        while not stop.is_set():
            try:
                if sock is None or fresh:
                    sock = target.connect(upstream.port)
                get(sock, "/ka")
                outcome = "ok"
            except Exception:
                outcome, sock = "failed", None
            with lock:
                counts[outcome] += 1
            if fresh and sock is not None:
                sock.close()

    threads = [threading.Thread(target=client, args=(n % 2 == 1,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for n in range(RELOADS):
        text = policy_config(f"# reload {n}")
        if n % 2:
            with config.open("r+") as file:
                file.truncate(0)
                file.write(text)
            assert target.process is not None
            target.process.send_signal(signal.SIGHUP)
        else:
            config.with_name("config.toml.new").write_text(text)
            os.replace(config.with_name("config.toml.new"), config)
        digest = hashlib.sha256(text.encode()).hexdigest()
        deadline = time.monotonic() + 30
        while json.loads(state.read_text())["digest"] != digest:
            if time.monotonic() > deadline:
                raise RuntimeError(f"reload {n} was not applied")
            time.sleep(0.01)
    stop.set()
    for thread in threads:
        thread.join(60)
    return {"reloads": RELOADS, "requests_ok": counts["ok"], "requests_failed": counts["failed"]}


def messages_body(megabytes: int) -> bytes:
    """A Messages request of about this size, shaped like Claude Code's: a long conversation of
    text and tool results, a list of tools, one MCP server on an allowed host."""
    turn = {"role": "user", "content": [{"type": "text", "text": "x" * 2000}]}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "line\n" * 400}
    messages = []
    while len(json.dumps(messages)) < megabytes * 1024 * 1024:
        messages += [turn, {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
        messages += [{"role": "user", "content": [result]}]
        messages += [{"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
    tools = [{"name": f"tool{i}", "input_schema": {"type": "object"}} for i in range(40)]
    body = {
        "model": "claude-bench",
        "max_tokens": 16,
        "stream": True,
        "messages": [*messages, turn],
        "tools": tools,
        "mcp_servers": [{"type": "url", "url": "https://mcp.anthropic.com/sse", "name": "m"}],
    }
    return json.dumps(body).encode()


def post_messages_ms(target: Route, upstream: Upstream, body: bytes, rounds: int) -> float:
    """A Messages POST on a new tunnel, to the first SSE event of its answer."""
    timings = []
    head = (
        f"POST /v1/messages HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    for _ in range(rounds):
        sock = target.connect(upstream.port)
        began = time.perf_counter()
        sock.sendall(head + body)
        data = b""
        while b"event: message_start" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"{target.name}: no answer to the Messages POST: {data[:80]!r}")
            data += chunk
        timings.append((time.perf_counter() - began) * 1000)
        while sock.recv(65536):
            pass
        sock.close()
    return statistics.median(timings)


def compare_fetch_check(
    on: Route, off: Route, upstream: Upstream, seconds: float
) -> dict[str, dict[str, float]]:
    body = messages_body(MESSAGES_MB)
    sse_rounds, post_rounds = 15, 5

    def first_sse(target: Route) -> tuple[float, int]:
        return first_event_ms(target, upstream, sse_rounds), sse_rounds

    def messages_post(target: Route) -> tuple[float, int]:
        return post_messages_ms(target, upstream, body, post_rounds), post_rounds

    metrics = {
        "keepalive_per_s": rate_metric(
            lambda t: keepalive_per_second(t, upstream, seconds), seconds
        ),
        "first_sse_event_ms": first_sse,
        f"messages_{MESSAGES_MB}mb_ms": messages_post,
    }
    return compare(off, on, metrics, FETCH_ROUNDS, "server-fetch check off vs on")


def run_fetch_check(work: Path, upstream: Upstream, upstream_ca: Path, seconds: float) -> dict:
    """The server-fetch check on (the default) against off (a rule's check_server_fetch)."""
    from claude_proxy.proxy.fetch_guard import FetchGuard

    off_config = f'[[allow]]\nhost = "{HOST}"\ncheck_server_fetch = false\n'
    started: list[Route] = []
    try:
        started.append(on := start_claude_proxy(work, upstream, upstream_ca, name="check on"))
        started.append(
            off := start_claude_proxy(
                work, upstream, upstream_ca, name="check off", config=off_config
            )
        )
        results: dict = compare_fetch_check(on, off, upstream, seconds)
    finally:
        for target in started:
            assert target.process is not None
            target.process.terminate()
            target.process.wait(30)
    body = messages_body(MESSAGES_MB)
    judge = functools.partial(FetchGuard.judge, _AllowAll(), "/v1/messages", body)  # type: ignore[arg-type]
    runs = [timeit.timeit(judge, number=5) / 5 for _ in range(5)]
    results["judge_5mb_ms_in_process"] = round(min(runs) * 1000, 1)
    print(json.dumps(results, indent=2))
    return results


class _AllowAll:
    """The guard's view of a policy that allows every host: the parse alone is measured."""

    class _Enforcer:
        @staticmethod
        def decide(host: str, port: int, scheme: str) -> object:
            return type("Decision", (), {"allowed": True})()

    enforcer = _Enforcer()


FLOOD_STREAMS = 100  # per connection: the most the proxy lets one open at once
FLOOD_HEAD = 60_000  # bytes of header value per stream (the head limit is 64 KiB)


def h2_flood(target: Route, connections: int) -> dict[str, float]:
    """`connections` HTTP/2 connections, each with FLOOD_STREAMS streams whose 60 KB heads wait
    on a hung upstream; the proxy's RSS growth at its peak, and how many streams were answered
    503 (refused past the memory budget) within a second of the last one sent."""
    import h2.config
    import h2.connection
    import h2.events

    assert target.port is not None and target.process is not None
    before = target.rss_kb() or 0
    peak, refused, sockets = before, 0, []
    head = [(":method", "GET"), (":scheme", "https"), (":authority", HOST)]
    try:
        for _ in range(connections):
            raw = socket.create_connection(("127.0.0.1", target.port), timeout=120)
            raw.sendall(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
            assert read_head(raw).startswith(b"HTTP/1.1 200")
            context = ssl.create_default_context(cafile=str(target.trust))
            context.set_alpn_protocols(["h2"])
            tls = context.wrap_socket(raw, server_hostname=HOST)
            sockets.append(tls)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.encoder.encode = functools.partial(conn.encoder.encode, huffman=False)  # type: ignore[method-assign]
            conn.initiate_connection()
            for _ in range(FLOOD_STREAMS):
                sid = conn.get_next_available_stream_id()
                path = "/hang?gate=flood&bound=600"
                fields = [*head, (":path", path), ("x-pad", "p" * FLOOD_HEAD)]
                conn.send_headers(sid, fields, end_stream=True)
                tls.sendall(conn.data_to_send())
            tls.settimeout(1)
            try:
                while data := tls.recv(1 << 20):
                    for event in conn.receive_data(data):
                        refused += isinstance(event, h2.events.ResponseReceived)
                    tls.sendall(conn.data_to_send())
            except TimeoutError:
                pass  # a second with nothing more to read: the refusals have come
            peak = max(peak, target.rss_kb() or 0)
    finally:
        for tls in sockets:
            tls.close()
    return {
        "streams": connections * FLOOD_STREAMS,
        "rss_growth_mb": round((peak - before) / 1024, 1),
        "refused_503": refused,
    }


def run_flood(work: Path, upstream: Upstream, upstream_ca: Path, connections: int) -> dict:
    """claude-proxy with its default memory budget against the same build with none to speak of
    (100 GiB), under the same stream flood."""
    results: dict = {}
    unbounded = ("--socks-port", "0", "--set", "sandbox_waiting_memory_mib=102400")
    for starter in (
        lambda: start_claude_proxy(work, upstream, upstream_ca, name="no budget", extra=unbounded),
        lambda: start_claude_proxy(work, upstream, upstream_ca),
    ):
        target = starter()
        try:
            results[target.name] = h2_flood(target, connections)
        finally:
            upstream.gate("flood").set()
            assert target.process is not None
            target.process.terminate()
            target.process.wait(30)
            upstream.reset()
    print(json.dumps(results, indent=2))
    return results


def decision_cost() -> dict[str, dict[str, float]]:
    """Microseconds per decision, in process: the policy's own cost, without the network's."""
    from claude_proxy.policy import config_file
    from claude_proxy.policy import rules as policy_rules

    rules = config_file.parse(Path("/bench/config.toml"), policy_config().encode())
    policies = {
        "claude-proxy": policy_rules.Policy(policy_rules.default_rules()),
        "claude-proxy, 200 rules": config_file.build_policy(rules),
    }
    host = HOST
    refused = REFUSED_NAME.decode().rsplit(":", 1)[0]
    calls = {
        "refused_us": lambda p: p.decide(refused, 443),
        "connect_us": lambda p: p.decide(host, 443),
        "request_us": lambda p: p.decide_request(host, 443, "https", "GET", "/v1/messages?x=1"),
    }
    result = {}
    for name, chosen in policies.items():
        result[name] = {}
        for key, call in calls.items():
            bound = functools.partial(call, chosen)
            runs = [timeit.timeit(bound, number=20_000) for _ in range(5)]
            result[name][key] = round(min(runs) / 20_000 * 1e6, 1)
    return result


def run_policy(work: Path, upstream: Upstream, upstream_ca: Path, seconds: float) -> dict:
    started: list[Route] = []
    try:
        started.append(defaults := start_claude_proxy(work, upstream, upstream_ca))
        started.append(
            rules := start_claude_proxy(
                work, upstream, upstream_ca, name="claude-proxy, 200 rules", config=policy_config()
            )
        )
        results: dict = compare_policies(defaults, rules, upstream, seconds)
        for name, costs in decision_cost().items():
            results[name].update(costs)
        results["reload_under_load"] = reload_under_load(rules, upstream)
    finally:
        for target in started:
            assert target.process is not None
            target.process.terminate()
            target.process.wait(30)
    base, many, ratios = results[defaults.name], results[rules.name], results["ratio"]
    print(f"{'metric':<16}{'defaults':>12}{'200 rules':>12}{'ratio':>8}")
    for key in base:  # rates (higher is better), then µs per decision in process
        shown = f"{ratios[key]:.2f}x" if key in ratios else ratio(many[key], base[key])
        print(f"{key:<16}{base[key]:>12}{many[key]:>12}{shown:>8}")
    print(f"reload under load: {results['reload_under_load']}")
    return results


def run_versions(
    work: Path, upstream: Upstream, upstream_ca: Path, executable: Path, seconds: float
) -> dict[str, dict[str, float]]:
    started: list[Route] = []
    try:
        started.append(
            before := start_claude_proxy(
                work, upstream, upstream_ca, name="before", executable=executable, extra=()
            )
        )
        started.append(now := start_claude_proxy(work, upstream, upstream_ca))
        results = compare_versions(before, now, upstream, seconds)
    finally:
        for target in started:
            assert target.process is not None
            target.process.terminate()
            target.process.wait(30)
    print(f"{'metric':<24}{'before':>12}{'now':>12}{'now/before':>12}")
    for key, value in results["before"].items():
        print(f"{key:<24}{value:>12}{results['claude-proxy'][key]:>12}{results['ratio'][key]:>11}x")
    return results


def run_pressure(
    work: Path, upstream: Upstream, upstream_ca: Path, seconds: float, before: Path | None
) -> dict[str, dict[str, float]]:
    """This build (and `before`): memory after churn and idle tunnels; a burst past the cap."""
    builds = [("claude-proxy", BIN / "claude-proxy")]
    if before is not None:
        builds.append(("before", before))
    results: dict[str, dict[str, float]] = {}
    for name, executable in builds:
        print(f"pressure: {name}, {seconds:g} s of churn, then idle tunnels…", file=sys.stderr)
        target = start_claude_proxy(work, upstream, upstream_ca, name=f"{name}-pressure",
                                    executable=executable)  # fmt: skip
        assert target.process is not None
        try:
            figures = bench_pressure.memory(
                target.process.pid,
                lambda t=target: t.connect(upstream.port),
                lambda sock: get(sock, "/churn"),  # type: ignore[arg-type]
                lambda t=target: t.connect(upstream.port),
                seconds,
            )
        finally:
            target.process.terminate()
            target.process.wait(30)
        print(f"pressure: {name}, a burst of {bench_pressure.BURST}…", file=sys.stderr)
        limited = bench_pressure.limited(executable, work)
        target = start_claude_proxy(work, upstream, upstream_ca, name=f"{name}-burst",
                                    executable=limited)  # fmt: skip
        assert target.process is not None and target.port is not None
        try:
            figures.update(bench_pressure.burst(target.port))
        finally:
            target.process.terminate()
            target.process.wait(30)
        results[name] = figures
    return results


STARTUP_ROUNDS = 31  # every command once per round, alternately; medians reported
STARTUP_COMMANDS = {
    "env": ["env", "--shell", "sh"],
    "check": ["check", "api.anthropic.com"],
    "--help": ["--help"],
    "paths": ["paths"],
    "status": ["status"],  # on two ports held bound but not listening: both probes are refused
}


def startup_times(rounds: int = STARTUP_ROUNDS) -> dict[str, float]:
    """Wall time of the commands that need no proxy, against `python -c pass` with the same
    interpreter, measured in alternating rounds (the machine is shared: same-run ratios count).

    Bytecode is written and used, as in an installed tool (one warm-up run of each first), and
    HOME is a fresh one with a CA, as after `claude-proxy ca`; the commands run in it.
    """
    executable = BIN / "claude-proxy"
    python = BIN / "python"
    with tempfile.TemporaryDirectory() as home, socket.socket() as http, socket.socket() as socks:
        for held in (http, socks):
            held.bind(("127.0.0.1", 0))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "PYTHON"))}
        env["HOME"] = home
        subprocess.run([executable, "ca"], env=env, check=True, capture_output=True)
        commands = {"python -c pass": [python, "-c", "pass"]}
        commands |= {name: [executable, *words] for name, words in STARTUP_COMMANDS.items()}
        ports = [str(held.getsockname()[1]) for held in (http, socks)]
        commands["status"] += ["--port", ports[0], "--socks-port", ports[1]]
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for round_ in range(rounds + 1):
            for name, words in commands.items():
                began = time.perf_counter()
                subprocess.run(words, env=env, cwd=home, check=False, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
                if round_:  # the first round is the warm-up: it writes the bytecode
                    samples[name].append(time.perf_counter() - began)
    medians = {name: statistics.median(values) * 1000 for name, values in samples.items()}
    base = medians["python -c pass"]
    found: dict[str, float] = {f"{name}_ms": round(ms, 1) for name, ms in medians.items()}
    found |= {f"{name}_ratio": round(medians[name] / base, 2) for name in STARTUP_COMMANDS}
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput measurement")
    parser.add_argument("--rounds", type=int, default=40, help="fresh connections to time")
    parser.add_argument("--download-mb", type=int, default=1024)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--before",
        type=Path,
        metavar="EXECUTABLE",
        help="also measure this claude-proxy (an earlier version's console script) in the same run",
    )
    parser.add_argument(
        "--pin-only", action="store_true", help="only the organization pin's figures"
    )
    parser.add_argument("--policy-only", action="store_true", help="only the policy comparison")
    parser.add_argument(
        "--versions-only", action="store_true", help="only this build against --before, in rounds"
    )
    parser.add_argument("--audit-rounds", type=int, default=4, help="turns of audit on vs off")
    parser.add_argument(
        "--audit-only", action="store_true", help="only the audit database on vs off"
    )
    parser.add_argument(
        "--fetch-only", action="store_true", help="only the server-fetch check on vs off"
    )
    parser.add_argument(
        "--flood-only", action="store_true", help="only RSS under an HTTP/2 stream flood"
    )
    parser.add_argument(
        "--flood-connections", type=int, default=30, help="HTTP/2 connections in the flood"
    )
    parser.add_argument(
        "--startup-only",
        action="store_true",
        help="only the start-up of env, check, --help, paths and status against `python -c pass`",
    )
    parser.add_argument(
        "--pressure-only", action="store_true", help="only memory after churn, and a burst"
    )
    parser.add_argument("--churn-seconds", type=float, default=30.0, help="of churn, for RSS")
    args = parser.parse_args()
    if args.startup_only:
        print(json.dumps({"startup": startup_times()}, indent=2))
        return 0

    ca = trustme.CA()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        upstream_ca = work / "upstream-ca.pem"
        ca.cert_pem.write_to_path(str(upstream_ca))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(HOST).configure_cert(context)
        upstream = Upstream(context)
        upstream.serve_in_background()

        if args.flood_only:
            run_flood(work, upstream, upstream_ca, args.flood_connections)
            upstream.shutdown()
            return 0
        if args.fetch_only:
            run_fetch_check(work, upstream, upstream_ca, args.seconds)
            upstream.shutdown()
            return 0
        if args.pressure_only:
            pressure = run_pressure(work, upstream, upstream_ca, args.churn_seconds, args.before)
            upstream.shutdown()
            print(json.dumps(pressure, indent=2))
            if args.json:
                args.json.write_text(json.dumps(pressure, indent=2) + "\n")
            return 0
        versions: dict[str, dict[str, float]] = {}
        if args.before:
            versions = run_versions(work, upstream, upstream_ca, args.before, args.seconds)
            if args.versions_only:
                upstream.shutdown()
                print(json.dumps(versions, indent=2))
                return 0
        skip_policy = args.pin_only or args.audit_only
        policy = {} if skip_policy else run_policy(work, upstream, upstream_ca, args.seconds)
        if args.policy_only:
            upstream.shutdown()
            print(json.dumps(policy, indent=2))
            return 0
        results: dict[str, dict[str, float | int | None]] = {}
        if not args.pin_only and not args.audit_only:
            results["direct"] = measure(Route("direct", None, upstream_ca), upstream, args)
            starters: list[Callable[[], Route]] = [
                lambda: start_mitmdump(work, upstream, upstream_ca),
                lambda: start_claude_proxy(work, upstream, upstream_ca),
            ]
            if args.before:
                starters.append(
                    lambda: start_claude_proxy(
                        work, upstream, upstream_ca, name="before", executable=args.before, extra=()
                    )
                )
            for starter in starters:
                target = starter()
                try:
                    results[target.name] = measure(target, upstream, args)
                finally:
                    assert target.process is not None
                    target.process.terminate()
                    target.process.wait(30)
        if not args.audit_only:
            results["pin"] = {
                **measure_pin(work, upstream, upstream_ca, args),
                # What a probe costs at least: a fresh TLS connection and one GET.
                "direct_fresh_conn_p50_ms": round(
                    fresh_connection_ms(Route("direct", None, upstream_ca), upstream, args.rounds),
                    2,
                ),
            }
        if not args.pin_only:
            results["audit"] = audit_comparison(work, upstream, upstream_ca, args)
        upstream.shutdown()
    if not args.pin_only and not args.audit_only:
        results["startup"] = startup_times()  # type: ignore[assignment]

    if "direct" in results:
        print_table(results)
    for section in ("pin", "audit", "startup"):
        for key, value in results.get(section, {}).items():
            print(f"{key:<32}{value:>12}")
    if versions:
        results["versions"] = versions  # type: ignore[assignment]
    document = json.dumps({**results, "policy": policy}, indent=2)
    print(document)
    if args.json:
        args.json.write_text(document + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
