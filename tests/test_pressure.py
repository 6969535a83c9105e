"""Under pressure the proxy answers everyone, crashes nowhere and gives its memory back.

The real proxy under a low open-files limit (`prlimit`, as a macOS terminal's 256), bursts of
real clients bounded in count and time; proofs are what each client received, the proxy's log
and what it holds (/proc).
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import (
    DESCRIPTOR_LIMIT,
    ProxyProcess,
    curl,
    open_tunnel,
    read_head,
    read_until_closed,
    send_connect,
    start_proxy,
)
from tests.support import burst as bursting
from tests.support.audit import decisions
from tests.support.shared import ONE_AT_A_TIME
from tests.upstream import Upstream

BURST = 500  # clients at once: about twice the descriptors the proxy may open
ANSWER_SECONDS = 20  # bound on the whole burst; running into it fails the test
CONNECT = b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anthropic.com:443\r\n\r\n"
SOCKS_GREETING = b"\x05\x01\x00"
SOCKS_CONNECT = b"\x05\x01\x00\x03\x11api.anthropic.com\x01\xbb"

pytestmark = ONE_AT_A_TIME


def burst(port: int, first: bytes, complete: bytes) -> list[bytes]:
    """What each of BURST clients read; a client with no answer before ANSWER_SECONDS:
    b"<no answer>", which fails the caller."""
    return [
        a.data if a.seconds is not None else b"<no answer>"
        for a in bursting.burst(port, BURST, first, complete, ANSWER_SECONDS)
    ]


def log_file(proxy: ProxyProcess) -> str:
    return (proxy.home / ".local/state/claude-proxy/log/claude-proxy.log").read_text()


@pytest.mark.usefixtures("limited_descriptors")
@pytest.mark.parametrize("listener", ["http", "socks"])
def test_a_first_burst_past_the_descriptor_limit_is_answered(
    home: Path, upstream: Upstream, upstream_ca_file: Path, listener: str
) -> None:
    """Five hundred clients at once against a fresh proxy with 256 descriptors: each is
    admitted (200, or SOCKS 05 00) or refused (503, or 05 FF), none waits for an accept retry,
    and the proxy never runs out of descriptors nor crashes."""
    proxy = start_proxy(home, upstream, upstream_ca_file)
    if listener == "http":
        answers = burst(proxy.port, CONNECT, b"\r\n\r\n")
        admitted = [a for a in answers if a.startswith(b"HTTP/1.1 200")]
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    else:
        answers = burst(proxy.socks_port, SOCKS_GREETING, b"\x05")
        admitted = [a for a in answers if a.startswith(b"\x05\x00")]
        refused = [a for a in answers if a.startswith(b"\x05\xff")]
    others = [a for a in answers if a not in admitted and a not in refused]
    assert others == [], f"{len(others)} clients got {sorted(set(others))[:5]}"
    assert admitted and refused
    log = log_file(proxy)
    assert "cannot accept connections" not in log
    assert "Traceback" not in log and "crashed" not in log
    assert proxy.stop() == 0  # the audit writer has written what it was given
    rows = decisions(proxy, "reason LIKE 'too many clients at once%'")
    assert rows, "no refusal recorded"
    listener = "http" if listener == "http" else "socks5"
    assert [(r["client"].rsplit(":", 1)[0], r["listener"]) for r in rows] == [
        ("127.0.0.1", listener)
    ] * len(rows)  # each row names the client refused, wherever it was refused


def test_serving_clients_imports_nothing(
    home: Path, upstream: Upstream, upstream_ca_file: Path, tmp_path: Path
) -> None:
    """An import opens files: one that happens while a burst holds every descriptor crashes the
    client that needed it. Every path a client takes is loaded before the first one."""
    report = tmp_path / "modules"
    proxy = start_proxy(
        home,
        upstream,
        upstream_ca_file,
        scripts=("route_to_upstream.py", "new_modules.py"),
        env={"CLAUDE_PROXY_TEST_MODULES": str(report)},
    )
    socks = f"socks5h://127.0.0.1:{proxy.socks_port}"
    for args in (
        ["https://api.anthropic.com/h1", "--http1.1"],
        ["https://api.anthropic.com/h2", "--http2"],
        ["https://evil.example/"],
        ["http://api.anthropic.com/plain"],
        ["--proxy", socks, "https://api.anthropic.com/socks"],
        ["--proxy", socks, "https://evil.example/"],
    ):
        curl(proxy, *args)
    assert [r[1] for r in upstream.seen.requests] == ["/h1", "/h2", "/socks"]
    proxy.proc.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + ANSWER_SECONDS
    while not report.exists():
        assert time.monotonic() < deadline, "the proxy did not report its modules"
        time.sleep(0.02)
    assert report.read_text().split() == []
    assert proxy.stop() == 0


def test_a_client_whose_handling_fails_is_closed(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    """A layer that raises (here: parsing the CONNECT authority runs out of descriptors) closes
    its client at once, with one line for the lot and no traceback; the proxy serves on."""
    proxy = start_proxy(
        home, upstream, upstream_ca_file, scripts=("route_to_upstream.py", "broken_authority.py")
    )
    for _ in range(3):
        sock = send_connect(proxy, b"api.anthropic.com:443")
        sock.settimeout(ANSWER_SECONDS)
        try:
            answer = read_until_closed(sock)
        except TimeoutError:
            pytest.fail("the client got neither an answer nor a close")
        finally:
            sock.close()
        assert answer == b""
    with socket.create_connection(("127.0.0.1", proxy.socks_port), ANSWER_SECONDS) as sock:
        sock.sendall(SOCKS_GREETING)
        assert sock.recv(2) == b"\x05\x00"  # another client is served
    log = log_file(proxy)
    assert "Traceback" not in log and "crashed" not in log
    assert log.count("handling it failed: OSError(24, 'Too many open files (simulated)')") == 1
    assert proxy.stop() == 0


def test_the_cap_follows_the_limit_in_force(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    """The open-files limit is lowered while the proxy runs: clients past the new cap get a 503
    that names the limit in force, not the one read at start."""
    proxy = start_proxy(home, upstream, upstream_ca_file)
    limit = f"{DESCRIPTOR_LIMIT}:{DESCRIPTOR_LIMIT}"
    subprocess.run(["prlimit", f"--pid={proxy.proc.pid}", f"--nofile={limit}"], check=True)
    held: list[socket.socket] = []
    try:
        for _ in range(DESCRIPTOR_LIMIT):
            sock = send_connect(proxy, b"api.anthropic.com:443")
            held.append(sock)
            sock.settimeout(ANSWER_SECONDS)
            try:
                head = read_head(sock)
            except TimeoutError:
                pytest.fail(f"client {len(held)} got no answer")
            if not head.startswith(b"HTTP/1.1 200"):
                break
        assert head.startswith(b"HTTP/1.1 503"), head
        assert f"for {DESCRIPTOR_LIMIT} open files".encode() in head + sock.recv(4096)
    finally:
        for sock in held:
            sock.close()
    assert f"for {DESCRIPTOR_LIMIT} open files" in log_file(proxy)
    assert proxy.stop() == 0


CHURN = 300  # tunnels opened, used and closed, one after another


def pending(proxy: ProxyProcess, report: Path) -> dict[str, int]:
    """What the proxy holds for connections, once none is open any more (barrier: its count)."""
    deadline = time.monotonic() + ANSWER_SECONDS
    while True:
        report.unlink(missing_ok=True)
        proxy.proc.send_signal(signal.SIGUSR2)
        while not report.exists():
            assert time.monotonic() < deadline, "the proxy did not report"
            time.sleep(0.02)
        counts = json.loads(report.read_text())
        if counts["connections"] == 0:
            return counts
        assert time.monotonic() < deadline, f"connections still open: {counts}"
        time.sleep(0.05)


@pytest.mark.parametrize("listener", ["http", "socks"])
def test_closed_tunnels_leave_nothing_pending(
    home: Path, upstream: Upstream, upstream_ca_file: Path, tmp_path: Path, listener: str
) -> None:
    """A closed connection leaves no wakeup timer and no handler behind (each held ~250 KB for
    30 s: memory followed connection churn, not live clients)."""
    report = tmp_path / "pending.json"
    proxy = start_proxy(
        home,
        upstream,
        upstream_ca_file,
        scripts=("route_to_upstream.py", "pending.py"),
        env={"CLAUDE_PROXY_TEST_PENDING": str(report)},
    )
    idle = pending(proxy, report)
    context = proxy.client_context()
    context.set_alpn_protocols(["http/1.1"])
    for _ in range(CHURN):
        if listener == "http":
            sock = send_connect(proxy, b"api.anthropic.com:443")
            assert read_head(sock).startswith(b"HTTP/1.1 200")
        else:
            sock = socket.create_connection(("127.0.0.1", proxy.socks_port), ANSWER_SECONDS)
            sock.sendall(SOCKS_GREETING)
            assert sock.recv(2) == b"\x05\x00"
            sock.sendall(SOCKS_CONNECT)
            assert sock.recv(10).startswith(b"\x05\x00")
        with context.wrap_socket(sock, server_hostname="api.anthropic.com") as tls:
            tls.sendall(b"GET /churn HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n")
            assert read_head(tls).startswith(b"HTTP/1.1 200")
    after = pending(proxy, report)
    assert len(upstream.seen.requests) == CHURN
    assert after["wakeups"] == 0, after
    assert after["handlers"] == 0, after
    assert after["tasks"] <= idle["tasks"], (idle, after)
    assert proxy.stop() == 0


WAVE = 600  # idle tunnels opened together, then closed together
MIB = 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/PID/status")


def sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            count += fd.readlink().name.startswith("socket:")
    return count


def test_memory_goes_back_after_a_wave_of_idle_tunnels(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    """Six hundred idle TLS tunnels open, then close: the proxy's RSS comes back most of the way
    to its idle figure (it stayed at its peak: the allocator kept the freed pages)."""
    proxy = start_proxy(home, upstream, upstream_ca_file)
    pid = proxy.proc.pid
    with open_tunnel(proxy, "api.anthropic.com"):  # certificates made before the idle figure
        pass
    idle_sockets = sockets(pid)
    idle = rss(pid)
    tunnels = [open_tunnel(proxy, "api.anthropic.com") for _ in range(WAVE)]
    peak = rss(pid)
    for tunnel in tunnels:
        tunnel.close()
    assert peak - idle > 20 * MIB, "the wave did not cost the memory it should"
    deadline = time.monotonic() + ANSWER_SECONDS
    while sockets(pid) > idle_sockets:  # barrier: the proxy has closed every tunnel
        assert time.monotonic() < deadline, f"{sockets(pid)} sockets still open"
        time.sleep(0.05)
    deadline = time.monotonic() + ANSWER_SECONDS
    while (now := rss(pid)) > idle + (peak - idle) // 2:
        assert time.monotonic() < deadline, (
            f"idle {idle // MIB} MiB, with the tunnels {peak // MIB} MiB, "
            f"after they closed {now // MIB} MiB"
        )
        time.sleep(0.1)
    assert proxy.stop() == 0


def test_a_gate_closed_when_its_listener_stops_does_not_reopen_on_another_socket() -> None:
    """The drain stops the listeners while the gate may be closed: when room comes back, the
    gate must not start accepting on a descriptor that is no longer its listener."""
    import asyncio

    from claude_proxy.proxy.accept_gate import AcceptGate

    room = [0]
    reopened: list[int] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        gate = AcceptGate(lambda: room[0])
        gate.install(loop, [server])
        port = server.sockets[0].getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        deadline = time.monotonic() + ANSWER_SECONDS
        while not gate.closed:  # barrier: the gate has refused to accept it
            assert time.monotonic() < deadline, "the gate never closed"
            await asyncio.sleep(0.01)
        [fd] = gate.closed
        server.close()
        await server.wait_closed()
        other = socket.socket()  # may take the listener's old descriptor number
        room[0] = 1 << 20
        add_reader = loop._add_reader  # type: ignore[attr-defined]
        loop._add_reader = lambda f, *a: reopened.append(f) or add_reader(f, *a)  # type: ignore[attr-defined]
        gate.client_disconnected()
        loop._add_reader = add_reader  # type: ignore[attr-defined]
        other.close()
        client.close()
        assert fd not in reopened and not gate.closed

    asyncio.run(scenario())
