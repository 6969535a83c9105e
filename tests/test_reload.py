"""A running proxy follows its config.toml: saved in place, replaced by rename, or on SIGHUP.

The barrier is what the proxy publishes (its state file names the SHA-256 of the config in
force, or the error of the last reload); proofs are what reaches the upstream.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    ProxyProcess,
    curl,
    open_tunnel,
    read_head,
    read_response,
    read_until_closed,
    start_proxy,
)
from tests.support.cli import run_cli
from tests.support.reload import (
    STATE_WAIT,
    allowing,
    config_file,
    state,
    wait_applied,
    wait_state,
    write_by_rename,
    write_in_place,
)
from tests.upstream import CleartextUpstream, GatedConnect, Upstream


def status_of(proxy: ProxyProcess, host: str, path: str = "/") -> tuple[str, str]:
    """(CONNECT status, response status) for GET https://host/path through the proxy."""
    result = curl(proxy, "-o", "/dev/null", "-w", "%{http_connect} %{http_code}",
                  f"https://{host}{path}")  # fmt: skip
    connect, code = result.stdout.split()
    return connect, code


@pytest.fixture
def running(home: Path, upstream: Upstream, upstream_ca_file: Path) -> Iterator[ProxyProcess]:
    path = config_file(home)
    path.parent.mkdir(parents=True)
    path.write_text(allowing("api.anthropic.com"))
    proxy = start_proxy(home, upstream, upstream_ca_file)
    try:
        wait_applied(proxy, path.read_text())
        yield proxy
    finally:
        assert proxy.stop() == 0
    assert state(proxy) is None  # a stopped proxy leaves no state behind


def test_a_file_saved_in_place_or_replaced_changes_the_policy(
    running: ProxyProcess, upstream: Upstream
) -> None:
    path = config_file(running.home)
    assert status_of(running, "claude.ai") == ("403", "000")
    assert upstream.seen.connections == 0

    text = allowing("api.anthropic.com", "claude.ai")
    write_in_place(path, text)
    wait_applied(running, text)
    assert status_of(running, "claude.ai") == ("200", "200")
    assert [r[2] for r in upstream.seen.requests] == ["claude.ai"]

    text = allowing("claude.ai", comment="api.anthropic.com is gone")
    write_by_rename(path, text)
    wait_applied(running, text)
    assert status_of(running, "api.anthropic.com") == ("403", "000")
    assert status_of(running, "claude.ai") == ("200", "200")
    assert [r[2] for r in upstream.seen.requests] == ["claude.ai", "claude.ai"]
    assert sum("policy reloaded from" in line for line in running.stderr) == 2


def test_sighup_reloads_a_change_the_watcher_cannot_see(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    """Same size, same inode, same (old) mtime: only SIGHUP can tell the proxy."""
    path = config_file(home)
    path.parent.mkdir(parents=True)
    before = allowing("claude.ai", comment="padding!")
    after = allowing("api.anthropic.com")
    assert len(before) == len(after)
    path.write_text(before)
    an_hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(an_hour_ago, an_hour_ago))
    proxy = start_proxy(home, upstream, upstream_ca_file)
    try:
        wait_applied(proxy, before)
        inode = path.stat().st_ino
        write_in_place(path, after)
        os.utime(path, ns=(an_hour_ago, an_hour_ago))
        assert (path.stat().st_ino, path.stat().st_size) == (inode, len(before))
        proxy.proc.send_signal(signal.SIGHUP)
        wait_applied(proxy, after)
        assert status_of(proxy, "api.anthropic.com") == ("200", "200")
        assert status_of(proxy, "claude.ai") == ("403", "000")
        assert [r[2] for r in upstream.seen.requests] == ["api.anthropic.com"]
    finally:
        assert proxy.stop() == 0


def test_an_open_tunnel_is_closed_once_its_host_is_removed(
    running: ProxyProcess, upstream: Upstream
) -> None:
    tunnel = open_tunnel(running, "api.anthropic.com")
    request = b"GET /first HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n"
    tunnel.sendall(request)
    assert read_head(tunnel).startswith(b"HTTP/1.1 200")
    tunnel.recv(65536)  # the body
    text = allowing("claude.ai")
    write_by_rename(config_file(running.home), text)
    wait_applied(running, text)
    assert read_until_closed(tunnel) == b""  # closed at once, not at its next request
    tunnel.close()
    assert [r[1] for r in upstream.seen.requests] == ["/first"]
    assert "closed: the policy now refuses api.anthropic.com:443" in running.log_text()


def test_an_upload_still_streaming_is_cut_when_its_host_is_removed(
    running: ProxyProcess, upstream: Upstream
) -> None:
    tunnel = open_tunnel(running, "api.anthropic.com")
    tunnel.sendall(
        b"POST /upload HTTP/1.1\r\nHost: api.anthropic.com\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n5\r\nEARLY\r\n"
    )
    deadline = time.monotonic() + STATE_WAIT
    while b"EARLY" not in bytes(upstream.seen.raw):  # barrier: the first chunk has arrived
        assert time.monotonic() < deadline, "the first chunk never reached the upstream"
        time.sleep(0.02)
    text = allowing("claude.ai")
    write_by_rename(config_file(running.home), text)
    wait_applied(running, text)
    with contextlib.suppress(OSError):
        tunnel.sendall(b"4\r\nLATE\r\n0\r\n\r\n")
    read_until_closed(tunnel)
    tunnel.close()
    upstream.wait_idle()
    assert b"LATE" not in bytes(upstream.seen.raw)


def masked_frame(payload: bytes) -> bytes:
    """One WebSocket text frame as a client sends it (masked; payload under 126 bytes)."""
    mask = b"\x01\x02\x03\x04"
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + body


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, unmasked payload) of each WebSocket frame in `data` (payloads under 126 bytes)."""
    found = []
    while len(data) >= 2:
        masked, size = data[1] & 0x80, data[1] & 0x7F
        mask, start = (data[2:6], 6) if masked else (b"\0\0\0\0", 2)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(data[start : start + size]))
        found.append((data[0] & 0x0F, payload))
        data = data[start + size :]
    return found


@pytest.fixture(params=[b""], ids=["unanswered"])
def cleartext(
    request: pytest.FixtureRequest, home: Path, upstream: Upstream, upstream_ca_file: Path
) -> Iterator[tuple[ProxyProcess, CleartextUpstream]]:
    """A proxy whose config.toml allows cleartext HTTP to ws.example, routed to a far end (which
    answers a request at once with the parameter, if any)."""
    far = CleartextUpstream(request.param)
    path = config_file(home)
    path.parent.mkdir(parents=True)
    text = allowing("api.anthropic.com") + '[[allow]]\nhost = "ws.example"\nscheme = "http"\n'
    path.write_text(text)
    route = {"CLAUDE_PROXY_TEST_ROUTE": f"ws.example={far.port}"}
    proxy = start_proxy(home, upstream, upstream_ca_file, env=route)
    try:
        wait_applied(proxy, text)
        yield proxy, far
    finally:
        assert proxy.stop() == 0
        far.close()
    assert "still open after" not in proxy.log_text()  # nothing counted in flight for ever


def remove_ws_example_midway(
    proxy: ProxyProcess, far: CleartextUpstream, sock: socket.socket, arrived: int, late: bytes
) -> None:
    """Once `arrived` bytes have reached the far end, ws.example leaves config.toml: the client's
    connection is closed at once (not at its next message), and `late`, sent after, goes nowhere."""
    far.wait_received(arrived)  # barrier: under way
    text = allowing("api.anthropic.com")
    write_by_rename(config_file(proxy.home), text)
    wait_applied(proxy, text)
    read_until_closed(sock)
    with contextlib.suppress(OSError):
        sock.sendall(late)
    assert far.ended.wait(10), "the proxy kept its upstream connection open"


def test_a_cleartext_websocket_is_closed_once_its_host_is_removed(
    cleartext: tuple[ProxyProcess, CleartextUpstream],
) -> None:
    """A `ws://` WebSocket has no tunnel: the connection that carries it is closed all the same."""
    proxy, far = cleartext
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(
            b"GET http://ws.example/socket HTTP/1.1\r\nHost: ws.example\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        assert read_head(sock).startswith(b"HTTP/1.1 101")
        sock.sendall(masked_frame(b"first"))
        remove_ws_example_midway(proxy, far, sock, len(masked_frame(b"first")), masked_frame(b"x"))
    # Nothing the client sent after the change: "first", then the proxy's own close.
    assert [(op, data) for op, data in frames(bytes(far.received)) if op != 0x8] == [
        (0x1, b"first")
    ]
    assert "closed: the policy now refuses ws.example:80" in proxy.log_text()


@pytest.mark.parametrize(
    "cleartext",
    [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
    ids=["unanswered", "answered-before-its-end"],
    indirect=True,
)
def test_a_cleartext_upload_still_streaming_is_cut_when_its_host_is_removed(
    cleartext: tuple[ProxyProcess, CleartextUpstream],
) -> None:
    """Cut whether or not the upstream has answered: one that answers before the whole body
    has come leaves the client sending all the same."""
    proxy, far = cleartext
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(
            b"POST http://ws.example/upload HTTP/1.1\r\nHost: ws.example\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nEARLY\r\n"
        )
        remove_ws_example_midway(
            proxy, far, sock, len(b"5\r\nEARLY\r\n"), b"4\r\nLATE\r\n0\r\n\r\n"
        )
    assert b"LATE" not in far.received
    assert proxy.stop() == 0  # barrier: every line it wrote has been read
    closed = [line for line in proxy.stderr if "/upload" in line and "closed:" in line]
    assert len(closed) == 1 and "the policy now refuses ws.example:80" in closed[0], closed


def test_a_request_waiting_for_its_upstream_connection_is_decided_again(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    """The host stays allowed, so the tunnel stays open; a rule added while the request waited
    for its upstream connection refuses it when the connection comes, before a byte is sent."""
    path = config_file(home)
    path.parent.mkdir(parents=True)
    path.write_text(allowing("api.anthropic.com"))
    gated = GatedConnect(upstream.port)
    proxy = start_proxy(home, gated, upstream_ca_file)  # type: ignore[arg-type]
    try:
        wait_applied(proxy, path.read_text())
        tunnel = open_tunnel(proxy, "api.anthropic.com")
        tunnel.sendall(b"GET /secret HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n")
        gated.wait_accepted()  # barrier: the request waits for its upstream connection
        deny = '[[deny]]\nhost = "api.anthropic.com"\npaths = ["/secret"]\n'
        text = allowing("api.anthropic.com") + deny
        write_by_rename(path, text)
        wait_applied(proxy, text)
        gated.open()
        head = read_head(tunnel)
        assert head.startswith(b"HTTP/1.1 403"), head
        tunnel.close()
        assert status_of(proxy, "api.anthropic.com", "/other") == ("200", "200")
    finally:
        proxy.stop()
        gated.close()
    assert [r[1] for r in upstream.seen.requests] == ["/other"]


def test_a_messages_body_held_whole_is_decided_again_once_it_has_arrived(
    running: ProxyProcess, upstream: Upstream
) -> None:
    """A Messages body is read whole before it moves (the server-fetch check); on a kept-alive
    connection its upstream connection is already there. A rule added while the body arrived
    refuses it when the body is complete, and nothing of it is sent."""
    tunnel = open_tunnel(running, "api.anthropic.com")
    tunnel.sendall(b"GET /warm HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n")
    assert read_response(tunnel)[0].startswith(b"HTTP/1.1 200")  # the upstream connection is open
    body = json.dumps({"model": "m", "max_tokens": 1, "messages": [], "pad": "x" * 5000}).encode()
    tunnel.sendall(
        b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nExpect: 100-continue\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    assert read_head(tunnel).startswith(b"HTTP/1.1 100")  # barrier: decided under the old policy
    deny = '[[deny]]\nhost = "api.anthropic.com"\npaths = ["/v1/messages"]\n'
    text = allowing("api.anthropic.com") + deny
    write_by_rename(config_file(running.home), text)
    wait_applied(running, text)
    tunnel.sendall(body)
    assert read_head(tunnel).startswith(b"HTTP/1.1 403")
    tunnel.close()
    assert [r[1] for r in upstream.seen.requests] == ["/warm"]


def test_a_broken_edit_changes_nothing(running: ProxyProcess, upstream: Upstream) -> None:
    path = config_file(running.home)
    good = path.read_text()
    write_by_rename(path, good + '[[allow]]\nhost = "claude.ai"\nport = 443\n')
    wait_state(running, lambda s: s["error"] is not None)
    published = state(running)
    assert published is not None
    assert published["digest"] == hashlib.sha256(good.encode()).hexdigest()
    assert status_of(running, "api.anthropic.com") == ("200", "200")
    assert status_of(running, "claude.ai") == ("403", "000")
    assert [r[2] for r in upstream.seen.requests] == ["api.anthropic.com"]
    lines = [line for line in running.stderr if "keeping the policy" in line]
    assert len(lines) == 1, lines
    assert f"{path}:7: [[allow]] has an unknown key 'port'; did you mean 'ports'?" in lines[0]

    status = run_cli(running.home, "status", "--port", str(running.port))
    config_line = next(line for line in status.stdout.splitlines() if "config:" in line)
    assert config_line.startswith("FAIL")
    assert f"{path}:7: [[allow]] has an unknown key 'port'" in config_line

    write_in_place(path, good + '[[allow]]\nhost = "claude.ai"\n')
    wait_applied(running, path.read_text())
    assert status_of(running, "claude.ai") == ("200", "200")
    status = run_cli(running.home, "status", "--port", str(running.port))
    assert "ok   config:" in status.stdout


def test_a_hundred_rapid_edits_end_on_the_last_valid_one(
    running: ProxyProcess, upstream: Upstream
) -> None:
    path = config_file(running.home)
    for n in range(99):
        if n % 3 == 2:
            text = allowing("claude.ai", comment=f"edit {n}") + "[[allow]]\nhost = 'broken\n"
        else:
            text = allowing("claude.ai", comment=f"edit {n}")
        (write_in_place if n % 2 else write_by_rename)(path, text)
    last = allowing("statsig.anthropic.com", comment="edit 99, the last")
    write_in_place(path, last)
    wait_applied(running, last)
    assert status_of(running, "statsig.anthropic.com") == ("200", "200")
    assert status_of(running, "claude.ai") == ("403", "000")
    assert [r[2] for r in upstream.seen.requests] == ["statsig.anthropic.com"]


@pytest.mark.parametrize("how", ["moved back", "copied in, same bytes", "copied in, new rules"])
def test_a_file_that_goes_and_comes_back_is_read_again(
    running: ProxyProcess, upstream: Upstream, how: str
) -> None:
    path = config_file(running.home)
    good = path.read_text()
    aside = path.with_name("config.toml.aside")
    path.rename(aside)
    gone = wait_state(running, lambda s: s["error"] is not None)
    assert "is gone" in str(gone["error"])
    text = good
    if how == "moved back":
        aside.rename(path)
    elif how == "copied in, same bytes":
        write_by_rename(path, good)
    else:
        text = allowing("api.anthropic.com", "claude.ai")
        write_by_rename(path, text)
    wait_applied(running, text)  # the failure clears
    deadline = time.monotonic() + STATE_WAIT  # the line comes before the state; its read may not
    while not (back := [line for line in running.stderr if f"{path} is back" in line]):
        assert time.monotonic() < deadline, running.stderr
        time.sleep(0.02)
    assert len(back) == 1, running.stderr
    expected = ("200", "200") if how == "copied in, new rules" else ("403", "000")
    assert status_of(running, "claude.ai") == expected
    status = run_cli(running.home, "status", "--port", str(running.port))
    assert "ok   config:" in status.stdout
