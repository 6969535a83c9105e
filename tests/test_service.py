"""The service's life: first run, bad input, port in use, damaged CA, drain on SIGTERM."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    ProxyProcess,
    curl,
    start_proxy,
)
from tests.support.cli import run_cli
from tests.support.files import mode
from tests.upstream import Upstream


def test_first_run_makes_a_private_ca_and_reuses_it(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    confdir = home / ".config" / "claude-proxy"
    first = start_proxy(home, upstream, upstream_ca_file)
    assert first.stop() == 0
    assert mode(confdir) == 0o700
    assert mode(confdir / "mitmproxy-ca.pem") == 0o600
    assert mode(confdir / "mitmproxy-ca.p12") == 0o600
    fingerprint = run_cli(home, "ca", "--sha1").stdout
    cert = (confdir / "mitmproxy-ca.pem").read_bytes()
    second = start_proxy(home, upstream, upstream_ca_file)
    assert curl(second, "https://api.anthropic.com/").returncode == 0
    assert second.stop() == 0
    assert (confdir / "mitmproxy-ca.pem").read_bytes() == cert
    assert run_cli(home, "ca", "--sha1").stdout == fingerprint


def test_log_file_is_written_and_private(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    proxy = start_proxy(home, upstream, upstream_ca_file)
    curl(proxy, "https://example.com/")
    assert proxy.stop() == 0
    log = home / ".local" / "state" / "claude-proxy" / "log" / "claude-proxy.log"
    assert mode(log) == 0o600
    assert 'BLOCK CONNECT example.com:443 - 403 "example.com is not on the allowlist"' in (
        log.read_text()
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--allow", "*.com"], 2, "invalid --allow rule '*.com' is too broad"),
        (["--allow", "https://x.example"], 2, "not a URL"),
        (["--allow", "x.example:99999"], 2, "bad port"),
        (["--port", "http"], 2, "is not a port"),
        (["--host", "0.0.0.0"], 2, "would let other machines use the proxy"),
        (["--set", "connection_strategy=eager"], 2, "connection_strategy must be lazy"),
        (["--set", "ignore_hosts=.*"], 2, "ignore_hosts is not supported"),
        (["--set", "mode=transparent"], 2, "mode 'transparent' is not supported"),
        (["--set", "listen_host=0.0.0.0"], 2, "--set listen_host is not supported: use --host"),
        (["--set", "mode=regular@0.0.0.0:0"], 2, "would let other machines use the proxy"),
        (
            ["--set", "no_such_option=1", "--port", "0", "--socks-port", "0"],
            2,
            "unknown mitmproxy option(s)",
        ),
        # options that would weaken a check
        (["--set", "validate_inbound_headers=false"], 2, "validate_inbound_headers must stay on"),
        (["--set", "rawtcp=true"], 2, "rawtcp must stay off"),
        (["--set", "ssl_insecure=true"], 2, "ssl_insecure must stay off"),
        (["--set", "upstream_cert=true"], 2, "upstream_cert must stay off"),
        (["--set", "store_streamed_bodies=true"], 2, "store_streamed_bodies must stay off"),
        (["--set", "proxy_debug=true"], 2, "proxy_debug must stay off"),
        (["--set", "tls_version_client_min=TLS1"], 2, "tls_version_client_min must be TLS1_2"),
        (["--set", "tls_version_server_min=SSL3"], 2, "tls_version_server_min must be TLS1_2"),
        (["--set", "confdir=/tmp/elsewhere"], 2, "--set confdir is not supported"),
        (["--set", "sandbox_allow=evil.example"], 2, "use --allow RULE"),
        (["--set", "sandbox_remote_clients=true"], 2, "use --expose-to-network"),
        (
            ["--set", "sandbox_remote_clients=true", "--set", "mode=regular@0.0.0.0:0"],
            2,
            "use --expose-to-network",
        ),
        (["--allow", "0.0.0.0"], 2, "means every address of this machine"),
        (["--allow", "[::]:443"], 2, "means every address of this machine"),
    ],
)
def test_bad_input_is_one_clear_line(home: Path, args: list[str], code: int, message: str) -> None:
    assert run_cli(home, "ca").returncode == 0
    result = run_cli(home, *args)
    assert result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert message in lines[-1]
    assert len(lines) == 1 or "usage:" in lines[0]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_one_host_with_both_ports_picked_by_the_system(
    home: Path, upstream: Upstream, upstream_ca_file: Path, host: str
) -> None:
    """`--port 0 --socks-port 0` on one address: two free ports, both serving."""
    proxy = start_proxy(home, upstream, upstream_ca_file, "--host", host, "--socks-port", "0")
    try:
        said = "\n".join(proxy.stderr)
        found = re.search(r"listening on (\S+):(\d+); SOCKS5 on \S+:(\d+)", said)
        assert found, said
        http_port, socks_port = int(found[2]), int(found[3])
        assert http_port != socks_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for port in (http_port, socks_port):
            with socket.socket(family) as sock:
                sock.settimeout(10)
                sock.connect((host, port))
    finally:
        proxy.stop()


def test_port_in_use(home: Path) -> None:
    assert run_cli(home, "ca").returncode == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(home, "--port", str(port), "--socks-port", "0")
    assert result.returncode == 3
    assert result.stderr.strip().splitlines() == [
        f"claude-proxy: cannot listen on 127.0.0.1:{port}: the port is in use (is claude-proxy "
        "already running? `claude-proxy status` tells); stop it or choose another --port"
    ]


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("garbage", "cannot parse it"),
        ("missing key", "exists but mitmproxy-ca.pem does not"),
        ("other cert", "is not the certificate in mitmproxy-ca.pem"),
    ],
)
def test_damaged_ca_is_an_error_and_left_alone(home: Path, damage: str, why: str) -> None:
    assert run_cli(home, "ca").returncode == 0
    confdir = home / ".config" / "claude-proxy"
    key = confdir / "mitmproxy-ca.pem"
    if damage == "garbage":
        key.write_bytes(b"not a pem")
    elif damage == "missing key":
        key.unlink()
    else:
        (confdir / "mitmproxy-ca-cert.pem").write_bytes(key.read_bytes())  # key+cert: fine
        other = home / "other"
        assert run_cli(other, "ca").returncode == 0
        (confdir / "mitmproxy-ca-cert.pem").write_bytes(
            (other / ".config" / "claude-proxy" / "mitmproxy-ca-cert.pem").read_bytes()
        )
    before = {p.name: p.read_bytes() for p in confdir.iterdir()}
    for args in ([], ["ca"]):
        result = run_cli(home, *args, *(["--port", "0", "--socks-port", "0"] if not args else []))
        assert result.returncode == 4
        assert why in result.stderr
        assert "never replaced automatically" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in confdir.iterdir()} == before


def test_sigterm_drains_a_stream_in_flight_then_exits_0(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    proxy = start_proxy(home, upstream, upstream_ca_file)
    gate = upstream.gate("drain")
    events: list[str] = []
    first_seen = threading.Event()

    def client() -> None:
        url = "https://api.anthropic.com/sse?n=3&gate=drain"
        with (
            httpx.Client(proxy=proxy.url, verify=proxy.client_context(), timeout=30) as c,
            c.stream("GET", url) as response,
        ):
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(line)
                    first_seen.set()

    thread = threading.Thread(target=client)
    thread.start()
    assert first_seen.wait(10)
    proxy.proc.send_signal(signal.SIGTERM)
    # The listener closes at once (within a few event-loop turns); the stream in flight carries on.
    deadline = time.monotonic() + 5
    while True:
        try:
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "the proxy still accepts connections after SIGTERM"
        time.sleep(0.02)
    assert proxy.proc.poll() is None
    gate.set()
    thread.join(10)
    assert [e.split()[1] for e in events] == ["0", "1", "2"]
    assert proxy.proc.wait(15) == 0
    assert upstream.seen.gate_waits == [True]


@pytest.mark.parametrize(
    ("streams", "query"),
    [(1, "n=2&gate=never"), (10, "n=2000&gap=0.01")],
    ids=["one-waiting", "ten-streaming"],
)
def test_a_drain_that_ends_with_streams_open_closes_them_cleanly(
    home: Path, upstream: Upstream, upstream_ca_file: Path, streams: int, query: str
) -> None:
    """SSE streams that outlast the drain are closed, with one line saying how many; nothing is
    left for the event loop to destroy ("Task was destroyed but it is pending!")."""
    scripts = ("route_to_upstream.py", "quick_drain.py")
    proxy = start_proxy(home, upstream, upstream_ca_file, scripts=scripts)
    upstream.gate("never")  # never opened: that stream stays open past the drain
    url = f"https://api.anthropic.com/sse?{query}"
    base = ["curl", "-sS", "-N", "--proxy", proxy.url, "--cacert", str(proxy.ca_cert), url]
    clients = [
        subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(streams)
    ]
    try:
        deadline = time.monotonic() + 15
        while len(upstream.seen.requests) < streams:  # barrier: every stream reached upstream
            assert time.monotonic() < deadline, upstream.seen.requests
            time.sleep(0.02)
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(15) == 0
        for client in clients:
            client.wait(10)  # its stream was closed: curl ends (a hang fails here)
    finally:
        for client in clients:
            client.kill()
            client.wait()
    text = proxy.log_text()
    assert "Task was destroyed" not in text and "Traceback" not in text
    lines = [line for line in proxy.stderr if "still open" in line]
    assert len(lines) == 1, "\n".join(proxy.stderr)
    assert f"closing {streams} stream(s) still open" in lines[0]


def test_sigint_stops_with_0(home: Path, upstream: Upstream, upstream_ca_file: Path) -> None:
    proxy = start_proxy(home, upstream, upstream_ca_file)
    assert proxy.stop(signal.SIGINT) == 0


def test_shared_proxy_still_serves(proxy: ProxyProcess, upstream: Upstream) -> None:
    assert curl(proxy, "https://claude.ai/login").returncode == 0
    assert upstream.seen.requests == [("GET", "/login", "claude.ai")]
