"""An upstream that never answers: each step has its own limit and ends in a 504 naming it.

Every limit is 1 s here (set with --set, as a user would); clients wait 10 s at most, so on a proxy
without these limits each test fails on its bounded read instead of hanging.

The timed layer's decisions (which step, when, a TLS limit shorter than the connect limit, a retry
after a failed connection, a request decided again after its wait) are proved sans I/O, without
waiting, in tests/test_sansio_timed.py; here each step is proved once through the real proxy. A
retry on the same client connection is proved end to end in tests/test_upstream_failures.py.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mitmproxy.exceptions import OptionsError
from mitmproxy.test import taddons

from claude_proxy.proxy.held_bodies import Held
from claude_proxy.proxy.upstream_timeouts import STEPS, Step, Timeouts
from tests.conftest import SCRIPTS, ProxyProcess, open_tunnel, read_head
from tests.support.shared import ONE_AT_A_TIME
from tests.support.waiting import wait_until
from tests.upstream import Upstream, rss

LIMITS = ["sandbox_connect_timeout=1", "sandbox_tls_timeout=1", "sandbox_response_timeout=1"]
CLIENT_SECONDS = 10


def start_timed_proxy(
    home: Path, upstream_port: int, upstream_ca_file: Path, settings: list[str] = LIMITS
) -> ProxyProcess:
    """The real proxy, every upstream connection routed to `upstream_port`."""
    args = ["--port", "0", "--set", f"ssl_verify_upstream_trusted_ca={upstream_ca_file}"]
    args += ["--set", f"scripts={SCRIPTS / 'route_to_upstream.py'}"]
    for setting in settings:
        args += ["--set", setting]
    env = {"CLAUDE_PROXY_TEST_UPSTREAM_PORT": str(upstream_port)}
    return ProxyProcess(home, args, env).wait_listening()


@pytest.fixture
def timed_proxy(home: Path, upstream: Upstream, upstream_ca_file: Path) -> Iterator[ProxyProcess]:
    proxy = start_timed_proxy(home, upstream.port, upstream_ca_file)
    yield proxy
    assert proxy.stop() == 0


def client(proxy: ProxyProcess) -> httpx.Client:
    return httpx.Client(proxy=proxy.url, verify=proxy.client_context(), timeout=CLIENT_SECONDS)


def assert_timed_out(
    proxy: ProxyProcess, response: httpx.Response, path: str, error: str, what: str
) -> None:
    """A 504 that names the step in its body, its headers and the decision log."""
    assert response.status_code == 504, response.text
    assert response.headers["x-claude-proxy"] == "timeout"
    assert response.headers["proxy-status"] == f'claude-proxy; error={error}; details="{what}"'
    assert response.text.startswith(f"claude-proxy: {what}.\n")
    assert "not the sandbox's policy" in response.text
    line = f'ALLOW GET api.anthropic.com:443 {path} 504 rule=*.anthropic.com "{what}"'
    assert line in proxy.log_text()


class SilentServer:
    """Accepts TCP connections and never sends a byte (no TLS handshake ever comes)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            while True:
                self.held.append(self.listener.accept()[0])
                self.accepted.set()
        except OSError:
            pass  # closed

    def close(self) -> None:
        self.listener.close()
        for sock in self.held:
            sock.close()


def test_connect_that_never_completes(home: Path, upstream_ca_file: Path) -> None:
    # A listener whose accept queue is full (backlog 0, one connection never accepted): the
    # kernel drops every further SYN, so a connect to it neither completes nor fails.
    with socket.create_server(("127.0.0.1", 0), backlog=0) as full, socket.socket() as filler:
        filler.setblocking(False)
        filler.connect_ex(full.getsockname())
        select.select([], [filler], [], CLIENT_SECONDS)  # established (or the queue is full anyway)
        proxy = start_timed_proxy(home, full.getsockname()[1], upstream_ca_file)
        try:
            with client(proxy) as c:
                response = c.get("https://api.anthropic.com/v1/models")
            what = "connecting to api.anthropic.com:443 timed out after 1 s"
            assert_timed_out(proxy, response, "/v1/models", "connection_timeout", what)
        finally:
            assert proxy.stop() == 0


def test_upstream_that_never_speaks_tls(home: Path, upstream_ca_file: Path) -> None:
    """(A TLS limit shorter than the connect limit counts too: tests/test_sansio_timed.py.)"""
    silent = SilentServer()
    proxy = start_timed_proxy(home, silent.port, upstream_ca_file)
    try:
        with client(proxy) as c:
            response = c.get("https://api.anthropic.com/v1/models")
        assert silent.accepted.wait(CLIENT_SECONDS)  # the TCP connection was made: TLS timed out
        what = "the TLS handshake with api.anthropic.com:443 timed out after 1 s"
        assert_timed_out(proxy, response, "/v1/models", "tls_protocol_error", what)
    finally:
        assert proxy.stop() == 0
        silent.close()


def exchange(tls: ssl.SSLSocket, path: str) -> tuple[bytes, bytes]:
    """One request on an open tunnel: its response head and body (by content-length)."""
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n".encode())
    head, _, body = read_head(tls).partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += tls.recv(length - len(body))
    return head, body


def test_upstream_that_never_answers(timed_proxy: ProxyProcess, upstream: Upstream) -> None:
    with client(timed_proxy) as c:
        response = c.get("https://api.anthropic.com/hang?gate=late")
    upstream.gate("late").set()
    wait_until(lambda: upstream.seen.gate_waits == [True])  # it was still holding the answer back
    assert upstream.seen.requests == [("GET", "/hang?gate=late", "api.anthropic.com")]
    what = "waiting for the response head from api.anthropic.com:443 timed out after 1 s"
    assert_timed_out(timed_proxy, response, "/hang", "http_response_timeout", what)


def test_a_paused_stream_is_not_cut(timed_proxy: ProxyProcess, upstream: Upstream) -> None:
    """An SSE stream that has started may pause for longer than the response limit."""
    events: list[str] = []
    url = "https://api.anthropic.com/sse?n=3&gate=pause"
    with (
        client(timed_proxy) as sse_client,
        client(timed_proxy) as other,
        sse_client.stream("GET", url) as sse,
    ):
        lines = sse.iter_lines()
        while len(events) < 2:
            if (line := next(lines)).startswith("data:"):
                events.append(line)
        # The stream is silent now. A request sent after that silence began gets its 504 only
        # once the response limit has passed: by then the stream has paused for longer.
        late = other.get("https://api.anthropic.com/hang?gate=late")
        assert late.status_code == 504, late.text
        upstream.gate("pause").set()
        events += [line for line in lines if line.startswith("data:")]
    upstream.gate("late").set()
    assert [e.split()[1] for e in events] == ["0", "1", "2"]
    wait_until(lambda: len(upstream.seen.gate_waits) == 2)
    assert upstream.seen.gate_waits == [True, True]


def test_response_limit_beyond_the_idle_timeout(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    """mitmproxy's tcp_timeout closes idle connections; one waiting on the upstream gets its 504."""
    settings = ["tcp_timeout=1", "sandbox_response_timeout=3"]
    proxy = start_timed_proxy(home, upstream.port, upstream_ca_file, settings)
    try:
        with client(proxy) as c:
            response = c.get("https://api.anthropic.com/hang?gate=late")
        upstream.gate("late").set()
        what = "waiting for the response head from api.anthropic.com:443 timed out after 3 s"
        assert_timed_out(proxy, response, "/hang", "http_response_timeout", what)
    finally:
        assert proxy.stop() == 0


@ONE_AT_A_TIME
def test_a_long_keep_alive_connection_costs_no_memory_per_request(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    """Each request's wait on the upstream is timed; what times it must not outlive the request.

    With the default limits a timer that lived on for its 300 s kept its request and response
    in memory: about 7 KB per request on one connection, 35 MB for the requests below.
    """
    proxy = start_timed_proxy(home, upstream.port, upstream_ca_file, settings=[])
    try:
        with open_tunnel(proxy, "api.anthropic.com") as tls:
            for i in range(500):  # warm: certificates, connections, caches
                assert exchange(tls, f"/warm/{i}")[0].startswith(b"HTTP/1.1 200")
            before = rss(proxy.proc.pid)
            for i in range(5000):
                assert exchange(tls, f"/ka/{i}")[0].startswith(b"HTTP/1.1 200")
            growth = rss(proxy.proc.pid) - before
        assert growth < 5 * 2**20, f"grew {growth // 1024} KiB over 5000 requests"
    finally:
        assert proxy.stop() == 0


@pytest.mark.parametrize("step", STEPS, ids=lambda step: step.option)
def test_a_limit_must_be_positive(step: Step) -> None:
    timeouts = Timeouts(Held())
    with taddons.context(timeouts) as tctx:
        tctx.configure(timeouts, **{step.option: 1})
        with pytest.raises(OptionsError, match=f"{step.option} must be at least 1"):
            tctx.configure(timeouts, **{step.option: 0})
