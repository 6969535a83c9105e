"""One client's appetite is bounded: head size and header count, head deadline, idle connections,
descriptors and bursts of connections. The real proxy; proofs are what reached the upstream, what
the client received, and the proxy's own memory (VmRSS) and log."""

from __future__ import annotations

import functools
import logging
import select
import signal
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from claude_proxy.proxy.held_bodies import PAUSE, PER_CLIENT
from tests.conftest import (
    DESCRIPTOR_LIMIT,
    ProxyFactory,
    ProxyProcess,
    curl,
    open_tunnel,
    read_head,
    send_connect,
    start_proxy,
)
from tests.support.h2 import H2Session, h2_events, h2_session, h2_tunnel
from tests.support.shared import ONE_AT_A_TIME
from tests.upstream import CountingRelay, PeakRss, SilentUpstream, SlowConnect, Upstream

MIB = 1024 * 1024
OFFERED = 40 * MIB  # what a hostile client offers; the proxy must stop taking it long before
ANSWER_SECONDS = 10  # bound on every wait for the proxy; running into it fails the test


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/PID/status")


def read_answer(sock: socket.socket) -> bytes:
    """All the proxy sends until it closes; fails when it neither closes nor answers in time."""
    sock.settimeout(ANSWER_SECONDS)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the proxy kept the connection open; it sent {data[:80]!r}")
    except OSError:
        pass  # reset after the answer (or instead of it): the connection is closed
    return data


def read_head_in_time(sock: socket.socket) -> bytes:
    sock.settimeout(ANSWER_SECONDS)
    try:
        return read_head(sock)
    except TimeoutError:
        pytest.fail("the proxy did not answer in time")


def log_file(proxy: ProxyProcess) -> str:
    """The proxy's log file alone (log_text() also has stderr, where each line appears again)."""
    return (proxy.home / ".local/state/claude-proxy/log/claude-proxy.log").read_text()


def listener(proxy: ProxyProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=ANSWER_SECONDS)


def offer(sock: socket.socket, start: bytes, filler: bytes, offered: int = OFFERED) -> bool:
    """Send `start`, then `filler` up to `offered` bytes; whether the proxy took all of it."""
    sent = 0
    try:
        sock.sendall(start)
        while sent < offered:
            sock.sendall(filler)
            sent += len(filler)
    except OSError:
        return False
    return True


def warm_up(proxy: ProxyProcess) -> None:
    """One request through a tunnel, so TLS and certificate caches exist before RSS is read."""
    assert curl(proxy, "https://api.anthropic.com/warm-up").returncode == 0


# Head size


@ONE_AT_A_TIME
@pytest.mark.parametrize(
    ("where", "start", "status"),
    [
        ("listener", b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nX-Endless: ", b"431"),
        ("listener", b"CONNECT api.anthropic.com:443", b"414"),  # an endless request line
        ("tunnel", b"GET / HTTP/1.1\r\nHost: api.anthropic.com\r\nX-Endless: ", b"431"),
    ],
    ids=["listener-header", "listener-request-line", "tunnel-header"],
)
def test_endless_head_is_cut_off_and_its_memory_freed(
    proxy: ProxyProcess, upstream: Upstream, where: str, start: bytes, status: bytes
) -> None:
    warm_up(proxy)
    before = rss(proxy.proc.pid)
    sock = open_tunnel(proxy, "api.anthropic.com") if where == "tunnel" else listener(proxy)
    took_all = offer(sock, start, b"a" * 65536)
    answer = read_answer(sock)
    sock.close()
    assert not took_all, "the proxy took a 40 MiB head"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert rss(proxy.proc.pid) - before < 8 * MIB
    assert upstream.seen.requests == [("GET", "/warm-up", "api.anthropic.com")]


TLS_RECORD = b"\x16\x03\x01\x40\x00"  # a handshake record of 16 KiB


@ONE_AT_A_TIME
def test_endless_client_hello_is_cut_off(proxy: ProxyProcess, upstream: Upstream) -> None:
    """A ClientHello that announces 16 MiB, sent in full records: never complete, never parsed."""
    warm_up(proxy)
    before = rss(proxy.proc.pid)
    sock = send_connect(proxy, b"api.anthropic.com:443")
    assert read_head(sock).startswith(b"HTTP/1.1 200")
    hello = TLS_RECORD + b"\x01\xff\xff\xff" + bytes(16380)  # ClientHello, 16 MiB long
    took_all = offer(sock, hello, TLS_RECORD + bytes(16384), 12 * MIB)
    answer = read_answer(sock)
    sock.close()
    assert not took_all, "the proxy took 12 MiB of a ClientHello"
    assert answer == b""
    assert rss(proxy.proc.pid) - before < 8 * MIB
    assert upstream.seen.requests == [("GET", "/warm-up", "api.anthropic.com")]


def test_head_size_refusal_says_why(proxy: ProxyProcess, upstream: Upstream) -> None:
    sock = listener(proxy)
    sock.sendall(b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nX-Big: " + b"a" * 70_000)
    answer = read_answer(sock)  # all of it was read: the answer arrives before the close
    sock.close()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert b"x-claude-proxy: refused" in head
    assert b"proxy-status: claude-proxy; error=http_request_error" in head
    assert upstream.seen.connections == 0
    assert 'BLOCK - - - 431 "request head larger than 64 KiB"' in proxy.log_text()


# Header count

MANY_HEADERS = b"".join(b"X-Header-%d: v\r\n" % i for i in range(300))


def test_too_many_headers_in_a_tunnel(proxy: ProxyProcess, upstream: Upstream) -> None:
    tls = open_tunnel(proxy, "api.anthropic.com")
    tls.sendall(b"GET /many HTTP/1.1\r\nHost: api.anthropic.com\r\n" + MANY_HEADERS + b"\r\n")
    answer = read_answer(tls)
    tls.close()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"x-claude-proxy: refused" in answer.lower()
    assert upstream.seen.connections == 0
    result = curl(proxy, "https://api.anthropic.com/normal")
    assert result.returncode == 0, result.stderr
    assert upstream.seen.requests == [("GET", "/normal", "api.anthropic.com")]


def test_too_many_headers_on_the_listener(proxy: ProxyProcess, upstream: Upstream) -> None:
    sock = send_connect(proxy, b"api.anthropic.com:443", MANY_HEADERS)
    answer = read_answer(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert upstream.seen.connections == 0
    assert curl(proxy, "https://api.anthropic.com/normal").returncode == 0


@pytest.mark.parametrize(("count", "status"), [(300, 431), (20, 200)])
def test_http2_header_count(
    proxy: ProxyProcess, upstream: Upstream, count: int, status: int
) -> None:
    tls = h2_tunnel(proxy)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    extra = [(f"x-header-{i}", "v") for i in range(count)]
    pseudo = [(":method", "GET"), (":scheme", "https"), (":authority", "api.anthropic.com")]
    conn.send_headers(1, [*pseudo, (":path", "/h2"), *extra], end_stream=True)
    tls.sendall(conn.data_to_send())
    answered = next(e for e in h2_events(tls, conn) if isinstance(e, h2.events.ResponseReceived))
    tls.close()
    assert int(dict(answered.headers)[b":status"]) == status
    assert upstream.seen.connections == (status == 200)  # 431: no upstream connection at all


def frame_head(kind: int, length: int) -> bytes:
    """An HTTP/2 frame header on stream 1, no flags (so a HEADERS frame's block goes on)."""
    return length.to_bytes(3, "big") + bytes([kind, 0]) + (1).to_bytes(4, "big")


HEADERS, CONTINUATION = 0x1, 0x9


@ONE_AT_A_TIME
@pytest.mark.parametrize(
    ("start", "filler", "offered"),
    [
        # A frame that announces 16 MiB: h2 checks the length only once all of it has arrived.
        (frame_head(HEADERS, 2**24 - 1), b"\x00" * 65536, 12 * MIB),
        # A header block that never ends (h2 itself stops at 64 CONTINUATION frames).
        (
            frame_head(HEADERS, 1) + b"\x82",
            frame_head(CONTINUATION, 16000) + b"\0" * 16000,
            OFFERED,
        ),
    ],
    ids=["huge-frame", "endless-continuation"],
)
def test_http2_oversized_head_is_cut_off(
    proxy: ProxyProcess, upstream: Upstream, start: bytes, filler: bytes, offered: int
) -> None:
    warm_up(proxy)
    before = rss(proxy.proc.pid)
    tls = h2_tunnel(proxy)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    took_all = offer(tls, start, filler, offered)
    answer = read_answer(tls)  # the frame is never complete: only a refusal closes the connection
    tls.close()
    assert not took_all
    assert rss(proxy.proc.pid) - before < 8 * MIB
    assert answer == b"" or b"\x07" in answer  # a GOAWAY frame (type 7), or just a close
    assert upstream.seen.requests == [("GET", "/warm-up", "api.anthropic.com")]


# Deadlines, with a proxy that waits one second

HEAD_SECONDS = 1


@pytest.fixture(scope="module")
def impatient(module_proxy: ProxyFactory) -> ProxyProcess:
    return module_proxy(
        "--set",
        f"sandbox_head_timeout={HEAD_SECONDS}",
        "--set",
        f"sandbox_idle_timeout={HEAD_SECONDS}",
    )


def trickle(sock: socket.socket, head: bytes) -> bytes:
    """Send `head` a byte at a time, ten a second, until the proxy answers or closes."""
    for byte in head:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break  # closed while we were sending
        if select.select([sock], [], [], 0.1)[0]:
            break
    else:
        pytest.fail(f"the proxy let a head trickle in for {len(head) / 10:.0f} s")
    return read_answer(sock)


SLOW_HEAD = b"GET / HTTP/1.1\r\nHost: api.anthropic.com\r\nX-Slow: " + b"a" * 100


@pytest.mark.parametrize("where", ["listener", "tunnel"])
def test_trickled_head_gets_408(impatient: ProxyProcess, upstream: Upstream, where: str) -> None:
    sock = open_tunnel(impatient, "api.anthropic.com") if where == "tunnel" else listener(impatient)
    answer = trickle(sock, SLOW_HEAD)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"x-claude-proxy: refused" in answer.lower()
    assert upstream.seen.requests == []
    assert "408" in impatient.log_text()


@pytest.mark.parametrize("stage", ["connected", "after-connect", "after-tls"])
def test_silent_client_is_closed(impatient: ProxyProcess, upstream: Upstream, stage: str) -> None:
    if stage == "connected":
        sock: socket.socket = listener(impatient)
    elif stage == "after-connect":
        sock = send_connect(impatient, b"api.anthropic.com:443")
        assert read_head(sock).startswith(b"HTTP/1.1 200")
    else:
        sock = open_tunnel(impatient, "api.anthropic.com")
    answer = read_answer(sock)
    sock.close()
    assert b"HTTP/1.1 200" not in answer
    assert upstream.seen.connections == 0


def test_idle_keep_alive_tunnel_is_closed_after_its_requests(
    impatient: ProxyProcess, upstream: Upstream
) -> None:
    tls = open_tunnel(impatient, "api.anthropic.com")
    for path in (b"/one", b"/two"):
        tls.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n")
        head = read_head_in_time(tls)
        assert head.startswith(b"HTTP/1.1 200"), head
        body = head.split(b"\r\n\r\n", 1)[1]
        while len(body) < len(b"hello from upstream\n"):
            body += tls.recv(65536)
    assert read_answer(tls) == b""  # then, idle, it is closed
    tls.close()
    assert [r[1] for r in upstream.seen.requests] == ["/one", "/two"]


def test_idle_http2_connection_gets_goaway(impatient: ProxyProcess, upstream: Upstream) -> None:
    tls = h2_tunnel(impatient)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    pseudo = [(":method", "GET"), (":scheme", "https"), (":authority", "api.anthropic.com")]
    conn.send_headers(1, [*pseudo, (":path", "/h2")], end_stream=True)
    tls.sendall(conn.data_to_send())
    seen = list(h2_events(tls, conn))
    tls.close()
    assert any(isinstance(e, h2.events.StreamEnded) for e in seen)  # the request was served
    assert isinstance(seen[-1], h2.events.ConnectionTerminated)  # then, idle, a GOAWAY
    assert upstream.seen.requests == [("GET", "/h2", "api.anthropic.com")]


def test_response_in_flight_is_not_idle(impatient: ProxyProcess, upstream: Upstream) -> None:
    """A stream that is silent for longer than every timeout still ends normally."""
    tls = open_tunnel(impatient, "api.anthropic.com")
    tls.sendall(b"GET /sse?n=2&gate=quiet HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n")
    received = read_head_in_time(tls)
    while b"data: 0" not in received:
        received += tls.recv(65536)
    time.sleep(3 * HEAD_SECONDS)  # silence past every deadline, with the response still open
    upstream.gate("quiet").set()
    rest = read_answer(tls)
    tls.close()
    assert b"data: 1" in rest
    assert upstream.seen.gate_waits == [True]


# Descriptors and bursts


def connect_answer(proxy: ProxyProcess, authority: bytes) -> tuple[socket.socket, bytes]:
    sock = send_connect(proxy, authority)
    return sock, read_head_in_time(sock)


@pytest.mark.usefixtures("limited_descriptors")
def test_clients_past_the_cap_are_refused_at_once(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    proxy = start_proxy(home, upstream, upstream_ca_file)
    held: list[socket.socket] = []
    try:
        for _ in range(DESCRIPTOR_LIMIT):
            sock, head = connect_answer(proxy, b"api.anthropic.com:443")
            if not head.startswith(b"HTTP/1.1 200"):
                sock.close()
                break
            held.append(sock)  # an idle tunnel: one descriptor in the proxy
        assert head.startswith(b"HTTP/1.1 503"), head
        assert b"X-Claude-Proxy: refused" in head
        assert b"Proxy-Status: claude-proxy; error=connection_limit_reached" in head
        lines = len(log_file(proxy).splitlines())
        for _ in range(100):
            sock, head = connect_answer(proxy, b"api.anthropic.com:443")
            sock.close()
            assert head.startswith(b"HTTP/1.1 503"), head
        log = log_file(proxy)
        assert len(log.splitlines()) - lines <= 1  # a summary every 10 s at most
        assert "Traceback" not in log
    finally:
        for sock in held:
            sock.close()
    for _ in range(100):  # the proxy sees the closes within a few event-loop turns
        sock, head = connect_answer(proxy, b"api.anthropic.com:443")
        sock.close()
        if head.startswith(b"HTTP/1.1 200"):
            break
        time.sleep(0.05)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert curl(proxy, "https://api.anthropic.com/after").returncode == 0
    assert upstream.seen.requests == [("GET", "/after", "api.anthropic.com")]
    assert proxy.stop() == 0


@ONE_AT_A_TIME
def test_out_of_descriptors_logs_one_line_and_recovers(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    scripts = ("route_to_upstream.py", "hog_descriptors.py")
    proxy = start_proxy(home, upstream, upstream_ca_file, scripts=scripts)
    sock = send_connect(proxy, b"evil.example:443")  # waits in the listen queue
    deadline = time.monotonic() + ANSWER_SECONDS
    while "cannot accept connections" not in log_file(proxy):
        assert time.monotonic() < deadline, "no accept failure logged"
        time.sleep(0.05)
    time.sleep(2.5)  # accepts are retried every second: let a few more fail
    proxy.proc.send_signal(signal.SIGUSR1)  # the script gives its descriptors back
    assert read_head_in_time(sock).startswith(b"HTTP/1.1 403")
    sock.close()
    log = log_file(proxy)
    assert "Traceback" not in proxy.log_text()
    assert log.count("cannot accept connections") == 1
    failures = int(log.split("accepting connections again after ", 1)[1].split()[0])
    assert failures >= 2
    assert proxy.stop() == 0


def socks_tunnel(proxy: ProxyProcess) -> tuple[socket.socket, bytes]:
    """A SOCKS5 greeting, and a tunnel to an allowed host if the greeting is accepted."""
    sock = socket.create_connection(("127.0.0.1", proxy.socks_port), timeout=ANSWER_SECONDS)
    sock.sendall(b"\x05\x01\x00")
    greeting = sock.recv(2)
    if greeting != b"\x05\x00":
        return sock, greeting
    name = b"api.anthropic.com"
    sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + (443).to_bytes(2, "big"))
    return sock, sock.recv(10)


@pytest.mark.usefixtures("limited_descriptors")
def test_socks_clients_count_against_the_cap_and_http_still_answers(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    """One client filling the cap through SOCKS5 cannot take the HTTP listener's answer away."""
    proxy = start_proxy(home, upstream, upstream_ca_file)
    held: list[socket.socket] = []
    try:
        for _ in range(DESCRIPTOR_LIMIT):
            sock, answer = socks_tunnel(proxy)
            if not answer.startswith(b"\x05\x00"):
                sock.close()
                break
            held.append(sock)  # an idle SOCKS tunnel: one descriptor in the proxy
        assert answer == b"\x05\xff", answer  # no acceptable method: the cap is reached
        assert len(held) < DESCRIPTOR_LIMIT // 2
        sock, head = connect_answer(proxy, b"api.anthropic.com:443")
        sock.close()
        assert head.startswith(b"HTTP/1.1 503"), head
        assert b"Proxy-Status: claude-proxy; error=connection_limit_reached" in head
    finally:
        for sock in held:
            sock.close()
    assert "Traceback" not in proxy.log_text()
    assert upstream.seen.connections == 0
    assert proxy.stop() == 0


BURST = 300


def test_a_burst_of_connections_is_served_without_connect_retries(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    socks = []
    for _ in range(BURST):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", proxy.port))
        socks.append(sock)
    try:
        for sock in socks:
            sock.settimeout(ANSWER_SECONDS * 3)  # a SYN retried twice takes 3 s
            sock.sendall(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
        for sock in socks:
            assert read_head(sock).startswith(b"HTTP/1.1 403")
        # A connection that found the listen queue full retransmitted its SYN (a wait of 1 s+).
        retransmits = [
            struct.unpack_from("I", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 100)[0]
            for s in socks
        ]
    finally:
        for sock in socks:
            sock.close()
    assert sum(retransmits) == 0, f"{sum(1 for r in retransmits if r)} connections had to retry"
    assert upstream.seen.connections == 0


# Request bodies held while a stream waits (for its upstream connection, or a hook)

HELD_SLACK = 40 * MIB  # RSS beyond what the limits allow to be held: buffers, allocator, TLS


def wait_for_line(proxy: ProxyProcess, text: str) -> None:
    """Barrier: the proxy has logged `text`."""
    deadline = time.monotonic() + ANSWER_SECONDS
    while not any(text in line for line in proxy.stderr):
        assert time.monotonic() < deadline, f"no {text!r} in:\n" + "\n".join(proxy.stderr)
        time.sleep(0.02)


def held_reason(limit: str) -> str:
    return f"request body arrived faster than it could be passed on: more than {limit} held"


def test_held_counts_come_back_to_zero() -> None:
    from claude_proxy.proxy.held_bodies import Held

    held = Held(per_client=10, total=15)
    assert held.add("a", 6) is None and held.add("a", 4) is None
    assert held.add("a", 1) == "more than 0 MiB held"  # per client: nothing counted
    assert held.add("b", 6) == "more than 0 MiB held for all clients"
    held.release("a", 4)
    assert held.add("b", 6) is None
    held.disconnected("a")
    held.release("a", 6)  # a stream of a client gone: already released with it
    held.release("b", 6)
    assert (held.bytes, held.clients) == (0, {})


def test_a_client_holding_the_pause_size_is_not_read_until_half_of_it_moved_on() -> None:
    from claude_proxy.proxy.held_bodies import Held

    calls: list[tuple[str, bool]] = []
    held = Held(per_client=100, total=1000, pause=10)
    held.flow_control = lambda client, paused: calls.append((client, paused))
    assert held.add("a", 6) is None and calls == []
    assert held.add("a", 4) is None and calls == [("a", True)]
    assert held.add("a", 1) is None and calls == [("a", True)] * 2  # asked again: held_bodies.py
    held.release("a", 5)  # 6 held: more than half
    assert calls == [("a", True)] * 2
    held.release("a", 1)  # 5: half
    assert calls == [("a", True), ("a", True), ("a", False)]
    assert held.add("b", 10) is None and held.paused == {"b"}
    held.disconnected("b")
    assert held.paused == set() and calls[-1] == ("b", True)  # a closed socket needs no resume


@ONE_AT_A_TIME
def test_an_upload_larger_than_the_held_limit_passes_a_slow_connect(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    """The upstream's TLS handshake takes 2 s; the client sends 64 MiB at loopback speed. Past
    a few MiB the proxy stops reading it until the connection is up; then all of it passes."""
    slow = SlowConnect(upstream.port, delay=2)
    proxy = start_proxy(home, slow, upstream_ca_file)  # type: ignore[arg-type]
    size = 64 * MIB
    assert size > PER_CLIENT  # once refused: everything the proxy read was held
    try:
        tls = open_tunnel(proxy, "api.anthropic.com")
        head = b"POST /v1/files HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: %d\r\n\r\n"
        tls.settimeout(ANSWER_SECONDS)
        with PeakRss(proxy.proc.pid) as memory:
            tls.sendall(head % size + b"u" * size)
            answer = read_head_in_time(tls)
        tls.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert memory.growth < PAUSE + HELD_SLACK, f"grew {memory.growth // MIB} MiB"
    finally:
        proxy.stop()
        slow.close()
    upstream.wait_idle()
    assert [len(body) for body in upstream.seen.bodies] == [size]


@ONE_AT_A_TIME
def test_a_client_waiting_on_a_hung_handshake_is_not_read_on(
    home: Path, upstream_ca_file: Path
) -> None:
    """It sends far more than the held limit: the proxy reads a few MiB of it, then nothing
    until the TLS limit passes; then the request ends."""
    silent = SilentUpstream()
    proxy = start_proxy(home, silent, upstream_ca_file, "--set", "sandbox_tls_timeout=2")  # type: ignore[arg-type]
    size = 2 * PER_CLIENT
    try:
        tls = open_tunnel(proxy, "api.anthropic.com")
        head = b"POST /v1/files HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: %d\r\n\r\n"
        tls.sendall(head % size)
        tls.settimeout(ANSWER_SECONDS)
        sent = 0
        with PeakRss(proxy.proc.pid) as memory:
            try:
                while sent < size:
                    tls.sendall(b"x" * MIB)
                    sent += MIB
            except TimeoutError:
                pytest.fail("the proxy neither read on nor closed the connection")
            except OSError:
                pass  # closed once the TLS limit passed
            wait_for_line(proxy, "timed out after 2 s")
        assert memory.growth < PAUSE + HELD_SLACK // 2, f"grew {memory.growth // MIB} MiB"
        assert not any("held" in line for line in proxy.stderr)  # no limit was needed
        assert not [line for line in log_file(proxy).splitlines() if "Traceback" in line]
    finally:
        proxy.stop()
        silent.close()


def upload_head(i: int, size: int) -> list[tuple[str, str]]:
    """The HTTP/2 head of upload number `i`, of `size` bytes."""
    return [
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", "api.anthropic.com"),
        (":path", f"/v1/files/{i}"),
        ("content-length", str(size)),
    ]


@ONE_AT_A_TIME
def test_http2_streams_holding_bodies_are_reset(home: Path, upstream_ca_file: Path) -> None:
    """Each stream holds 16 MiB; past the per-connection limit, the streams from then on reset."""
    silent = SilentUpstream()
    proxy = start_proxy(home, silent, upstream_ca_file)  # type: ignore[arg-type]
    try:
        tls, conn, events = h2_session(proxy)
        size, piece, count = 16 * MIB, b"z" * 16384, 4
        expected = {1 + 2 * i for i in range(PER_CLIENT // size, count)}  # client stream ids
        assert expected
        reset: set[int] = set()
        with PeakRss(proxy.proc.pid) as memory:
            for i in range(count):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, upload_head(i, size))
                sent = 0
                while sent < size and sid not in reset:
                    window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    if window <= 0:  # wait for the proxy's WINDOW_UPDATE (or the reset)
                        event = next(events)
                        if isinstance(event, h2.events.StreamReset):
                            reset.add(event.stream_id)
                        continue
                    n = min(window, len(piece), size - sent)
                    conn.send_data(sid, piece[:n], end_stream=sent + n == size)
                    sent += n
                    tls.sendall(conn.data_to_send())
            while reset != expected:
                event = next(events)  # fails the test if the proxy neither resets nor closes
                if isinstance(event, h2.events.StreamReset):
                    reset.add(event.stream_id)
        tls.close()
        assert memory.growth < PER_CLIENT + HELD_SLACK, f"grew {memory.growth // MIB} MiB"
        assert proxy.proc.poll() is None
    finally:
        proxy.stop()
        silent.close()


def test_six_http2_uploads_to_an_http1_upstream_all_pass(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    """mitmproxy opens five upstream connections per destination for one client connection: the
    sixth stream waits for one of them, holding what it was sent. The five others must still get
    the rest of their bodies through the same connection (it is not paused), and then it goes."""
    proxy = start_proxy(home, upstream, upstream_ca_file)
    size, piece = 8 * MIB, b"u" * 16384
    try:
        tls, conn, events = h2_session(proxy)
        statuses: dict[int, int] = {}

        def take(event: h2.events.Event) -> None:
            """Read what comes, as a client does: each echoed body is taken (acknowledged)."""
            if isinstance(event, h2.events.ResponseReceived):
                statuses[event.stream_id] = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)

        def send(sid: int, count: int, end: bool) -> None:
            sent = 0
            while sent < count:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if window <= 0:  # wait for the proxy's WINDOW_UPDATE
                    take(next(events))
                    continue
                n = min(window, len(piece), count - sent)
                conn.send_data(sid, piece[:n], end_stream=end and sent + n == count)
                sent += n
                tls.sendall(conn.data_to_send())

        streams = []
        for i in range(6):
            sid = conn.get_next_available_stream_id()
            streams.append(sid)
            conn.send_headers(sid, upload_head(i, size))
            send(sid, len(piece), end=False)
            if i == 4:  # barrier: five upstream connections are open, each with its request
                deadline = time.monotonic() + ANSWER_SECONDS
                while upstream.seen.connections < 5:
                    assert time.monotonic() < deadline, "five upstream connections never opened"
                    time.sleep(0.02)
        send(streams[5], 5 * MIB, end=False)  # held while it waits for a connection
        for sid in streams:
            send(sid, size - len(piece) - (5 * MIB if sid == streams[5] else 0), end=True)
        while len(statuses) < len(streams):
            take(next(events))  # fails the test if the proxy neither answers nor closes
        tls.close()
        assert statuses == dict.fromkeys(streams, 200)
    finally:
        proxy.stop()
    upstream.wait_idle()
    assert sorted(len(body) for body in upstream.seen.bodies) == [size] * 6


def test_uploads_through_a_prompt_upstream_still_pass(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """A 30 MiB upload: the body waits only for the connection, then moves as it arrives."""
    size = 30 * MIB
    for length in (size, 2 * 1024):
        tls = open_tunnel(proxy, "api.anthropic.com")
        head = b"POST /v1/files HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: %d\r\n\r\n"
        tls.sendall(head % length + b"u" * length)
        tls.settimeout(30)
        answer = read_head_in_time(tls)
        tls.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
    upstream.wait_idle()
    assert [len(b) for b in upstream.seen.bodies] == [size, 2 * 1024]


def get_head(path: str, pad: int = 0) -> list[tuple[str, str]]:
    head = [(":method", "GET"), (":scheme", "https"), (":authority", "api.anthropic.com")]
    return [*head, (":path", path), *([("x-pad", "p" * pad)] if pad else [])]


def responses(events: Iterator[h2.events.Event], count: int) -> dict[int, tuple[int, bytes]]:
    """The next `count` answers (status and body) on an HTTP/2 connection, by stream id."""
    heads: dict[int, int] = {}
    bodies: dict[int, bytes] = {}
    done: dict[int, tuple[int, bytes]] = {}
    while len(done) < count:
        event = next(events)  # fails the test if the proxy neither answers nor closes in time
        if isinstance(event, h2.events.ResponseReceived):
            heads[event.stream_id] = int(dict(event.headers)[b":status"])
        elif isinstance(event, h2.events.DataReceived):
            bodies[event.stream_id] = bodies.get(event.stream_id, b"") + event.data
        elif isinstance(event, h2.events.StreamReset):
            done[event.stream_id] = (0, b"reset")
        if isinstance(event, h2.events.StreamEnded) and event.stream_id in heads:
            done[event.stream_id] = (heads[event.stream_id], bodies.get(event.stream_id, b""))
    return done


def test_a_stream_waiting_for_a_free_upstream_connection_gets_504_in_time(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    """An HTTP/2 client's streams to an HTTP/1 upstream each take a connection of their own, five
    at once: the others wait for a free one, within the connect limit, then get 504."""
    proxy = start_proxy(home, upstream, upstream_ca_file, "--set", "sandbox_connect_timeout=1")
    try:
        tls, conn, events = h2_session(proxy)
        busy = [conn.get_next_available_stream_id()]
        conn.send_headers(busy[0], get_head("/hang?gate=slots&bound=30"), end_stream=True)
        tls.sendall(conn.data_to_send())
        deadline = time.monotonic() + ANSWER_SECONDS
        while not upstream.record.requests:  # barrier: the first connection is open and used
            assert time.monotonic() < deadline, "the first request never reached the upstream"
            time.sleep(0.02)
        for _ in range(4):  # four more busy connections: all five slots are taken
            busy.append(sid := conn.get_next_available_stream_id())
            conn.send_headers(sid, get_head("/hang?gate=slots&bound=30"), end_stream=True)
        waiting = []
        for i in range(2):
            waiting.append(sid := conn.get_next_available_stream_id())
            conn.send_headers(sid, get_head(f"/waits/{i}"), end_stream=True)
        tls.sendall(conn.data_to_send())
        answered = responses(events, len(waiting))
        assert set(answered) == set(waiting)
        for status, body in answered.values():
            assert status == 504
            assert b"waiting for a free connection to api.anthropic.com:443" in body
        upstream.gate("slots").set()
        assert {status for status, _ in responses(events, len(busy)).values()} == {200}
        # The connection opened for a stream that gave up carries nothing: it is closed when it
        # opens, not kept holding one of the five slots (five of them would block the client).
        upstream.wait_idle()
        tls.close()
    finally:
        upstream.gate("slots").set()
        proxy.stop()
    assert not [r for r in upstream.seen.requests if r[1].startswith("/waits/")]


@ONE_AT_A_TIME
def test_an_http2_stream_flood_is_held_within_the_memory_budget(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    """Streams waiting on their upstream count against a budget (here 8 MiB): the ones past it
    get a 503 of the proxy's own at once, and the proxy grows by about the budget, not by the
    flood (each stream would hold its 60 KB head, 83 KiB in all, for the connect limit)."""
    budget, pad, connections, per_connection = 8, 60_000, 4, 100
    proxy = start_proxy(
        home, upstream, upstream_ca_file, "--set", f"sandbox_waiting_memory_mib={budget}"
    )
    sessions: list[H2Session] = []
    try:
        warm_up(proxy)
        with PeakRss(proxy.proc.pid) as memory:
            for _ in range(connections):
                tls, conn, events = h2_session(proxy)
                # hpack's Huffman coder in pure Python would take minutes over 24 MB of heads.
                conn.encoder.encode = functools.partial(conn.encoder.encode, huffman=False)
                for _ in range(per_connection):
                    sid = conn.get_next_available_stream_id()
                    conn.send_headers(sid, get_head("/hang?gate=flood&bound=30", pad), True)
                    tls.sendall(conn.data_to_send())
                sessions.append((tls, conn, events))
            refused = [
                answer
                for tls, conn, events in sessions
                for answer in responses_now(tls, conn, events).values()
            ]
        streams = connections * per_connection
        admitted = streams - len(refused)
        assert all(status == 503 for status, _ in refused)
        assert all(b"too many requests waiting at once" in body for _, body in refused)
        assert admitted <= budget * MIB // pad  # what the budget holds of 60 KB heads, at most
        assert admitted >= budget * MIB // (pad + 24 * 1024)  # ... and it is used, not refused
        assert memory.growth < 3 * budget * MIB, f"grew {memory.growth // MIB} MiB"
    finally:
        upstream.gate("flood").set()
        for tls, *_ in sessions:
            tls.close()
        proxy.stop()


def responses_now(
    tls: ssl.SSLSocket, conn: h2.connection.H2Connection, events: Iterator[h2.events.Event]
) -> dict[int, tuple[int, bytes]]:
    """The answers the proxy has made so far on a connection. Barrier: a PING sent once an earlier
    one is acknowledged reaches the proxy after everything sent before, in a read of its own, so
    every answer to what came before is written ahead of its ack (the first ack alone could share
    a write with, and come ahead of, answers to frames that arrived with its PING)."""
    heads: dict[int, int] = {}
    bodies: dict[int, bytes] = {}
    done: dict[int, tuple[int, bytes]] = {}
    conn.ping(b"barrier1")
    tls.sendall(conn.data_to_send())
    for event in events:
        if isinstance(event, h2.events.PingAckReceived) and event.ping_data == b"barrier1":
            conn.ping(b"barrier2")
            tls.sendall(conn.data_to_send())
        elif isinstance(event, h2.events.PingAckReceived):
            return done
        if isinstance(event, h2.events.ResponseReceived):
            heads[event.stream_id] = int(dict(event.headers)[b":status"])
        elif isinstance(event, h2.events.DataReceived):
            bodies[event.stream_id] = bodies.get(event.stream_id, b"") + event.data
        elif isinstance(event, h2.events.StreamEnded) and event.stream_id in heads:
            done[event.stream_id] = (heads[event.stream_id], bodies.get(event.stream_id, b""))
    pytest.fail("the proxy closed the connection")


def test_an_http2_client_may_open_a_hundred_streams_at_once(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """The proxy says so in its SETTINGS; a client that opens one more is refused."""
    tls, conn, events = h2_session(proxy)
    limit = next(e for e in events if isinstance(e, h2.events.RemoteSettingsChanged))
    code = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
    assert limit.changed_settings[code].new_value == 100
    conn.remote_settings[code] = 1000  # a client that does not listen
    conn.remote_settings.acknowledge()
    for _ in range(101):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, get_head("/hang?gate=streams"), end_stream=True)
    tls.sendall(conn.data_to_send())
    try:
        ended = next(
            e
            for e in events
            if isinstance(e, h2.events.ConnectionTerminated)
            or (isinstance(e, h2.events.StreamReset) and e.stream_id == sid)
        )
    finally:
        upstream.gate("streams").set()
        tls.close()
    assert ended.error_code in (
        h2.errors.ErrorCodes.PROTOCOL_ERROR,
        h2.errors.ErrorCodes.REFUSED_STREAM,
    )


@ONE_AT_A_TIME
@pytest.mark.parametrize("kind", ["invalid-scheme", "killed"])
def test_http2_streams_that_end_in_odd_ways_give_their_budget_back(
    home: Path, upstream: Upstream, upstream_ca_file: Path, kind: str
) -> None:
    """A stream mitmproxy ends without dropping it (an invalid request; a flow the Enforcer kills)
    must not keep what it counted: a hundred of them, on a 1 MiB budget, leave the next request
    served, not refused for "too many requests waiting"."""
    proxy = start_proxy(home, upstream, upstream_ca_file, "--set", "sandbox_waiting_memory_mib=1")
    tls, conn, events = h2_session(proxy)
    try:
        for _ in range(100):
            sid = conn.get_next_available_stream_id()
            if kind == "invalid-scheme":  # mitmproxy's own check fails it: "Invalid request scheme"
                head = get_head("/odd")
                head[1] = (":scheme", "ftp")
                conn.send_headers(sid, head, end_stream=True)
            else:  # refused with a body of unknown length: the Enforcer kills the flow
                head = get_head("/odd")
                head[0], head[2] = (":method", "POST"), (":authority", "other.example")
                conn.send_headers(sid, head)
                conn.send_data(sid, b"", end_stream=True)
            tls.sendall(conn.data_to_send())
            if sid % 20 == 19:
                responses_now(tls, conn, events)
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, get_head("/after"), end_stream=True)
        tls.sendall(conn.data_to_send())
        answered: dict[int, tuple[int, bytes]] = {}
        while sid not in answered:  # answers to the earlier streams may still come first
            answered.update(responses(events, 1))
        assert answered[sid][0] == 200
    finally:
        tls.close()
        proxy.stop()


def test_a_stream_cancelled_while_it_waits_for_a_connection_is_never_sent(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    proxy = start_proxy(home, upstream, upstream_ca_file)
    try:
        tls, conn, events = h2_session(proxy)
        busy = []
        for _ in range(5):  # every slot taken
            busy.append(sid := conn.get_next_available_stream_id())
            conn.send_headers(sid, get_head("/hang?gate=cancel&bound=30"), end_stream=True)
        tls.sendall(conn.data_to_send())
        deadline = time.monotonic() + ANSWER_SECONDS
        while len(upstream.record.requests) < 5:  # barrier: the five hold their connections
            assert time.monotonic() < deadline, "the five requests never reached the upstream"
            time.sleep(0.02)
        cancelled = conn.get_next_available_stream_id()
        conn.send_headers(cancelled, get_head("/cancelled"), end_stream=True)
        waiting = conn.get_next_available_stream_id()
        conn.send_headers(waiting, get_head("/waiting"), end_stream=True)
        conn.reset_stream(cancelled)  # the client gives up on it while it waits ...
        conn.reset_stream(busy[0])  # ... and frees a slot
        tls.sendall(conn.data_to_send())
        answered: dict[int, tuple[int, bytes]] = {}
        while waiting not in answered:
            answered.update(responses(events, 1))
        assert answered[waiting][0] == 200
        tls.close()
    finally:
        upstream.gate("cancel").set()
        proxy.stop()
    assert "/cancelled" not in [path for _, path, _ in upstream.seen.requests]


@ONE_AT_A_TIME
def test_an_http2_client_that_stops_reading_makes_the_proxy_stop_reading_its_upstream(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    """A 96 MiB download to an HTTP/2 client that takes its first 64 KiB and then nothing: the
    proxy reads only a few MiB of it from the upstream and holds no more than that; once the
    client reads again, all of it arrives."""
    size = 96 * MIB
    relay = CountingRelay(upstream.port)
    proxy = start_proxy(home, relay, upstream_ca_file)  # type: ignore[arg-type]
    try:
        tls, conn, events = h2_session(proxy)
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, get_head(f"/bytes?size={size}"), end_stream=True)
        tls.sendall(conn.data_to_send())
        next(e for e in events if isinstance(e, h2.events.ResponseReceived))
        with PeakRss(proxy.proc.pid) as memory:  # the client reads no more from here on
            relayed = relay.wait_stalled()
        assert relayed < 32 * MIB, f"the proxy read {relayed // MIB} MiB of the response"
        assert memory.growth < 32 * MIB, f"grew {memory.growth // MIB} MiB"
        received = 0
        for event in events:  # read on, acknowledging each piece: the window opens again
            if isinstance(event, h2.events.DataReceived):
                received += len(event.data)
                conn.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, h2.events.StreamEnded):
                break
        assert received == size
        tls.close()
    finally:
        proxy.stop()
        relay.close()


def test_a_client_reset_before_its_refusal_at_accept_is_refused_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past the cap, a client that reset its connection while it waited in the listen queue has
    no peer address left: it is still refused there (logged without one), never handed on."""
    from claude_proxy.proxy.accept_gate import open_files_limit
    from claude_proxy.proxy.admission import Limits
    from claude_proxy.proxy.held_bodies import Held
    from claude_proxy.record.decisions import Recorder

    limits = Limits(Held(), Recorder())
    limits.fd_limit, limits.cap, limits.clients = open_files_limit(), 1, 1  # the cap is reached
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset, not a FIN
        listener.settimeout(ANSWER_SECONDS)
        conn, _ = listener.accept()
        with pytest.raises(OSError):
            conn.getpeername()  # gone: the kernel keeps no peer for it
        caplog.set_level(logging.INFO)
        assert limits.refuse_at_accept(conn, listener) is True
    assert conn.fileno() == -1  # its descriptor given back at once
    assert 'BLOCK - - - 503 "too many clients at once' in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
