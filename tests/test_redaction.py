"""Nothing secret in a log line or an audit row: no query, fragment or path parameter; and with
-v, no request line, userinfo, query or header value from mitmproxy's own messages."""

from __future__ import annotations

import json
import os
import socket
import subprocess

from tests.conftest import (
    EXECUTABLE,
    ProxyFactory,
    ProxyProcess,
    open_tunnel,
    read_head,
    read_response,
)
from tests.upstream import Upstream

SECRETS = ("ABCSESSION", "sekrit", "SECRETQ", "FRAGSECRET", "HEADERSECRET")


def audit_paths(proxy: ProxyProcess) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env["HOME"] = str(proxy.home)
    shown = subprocess.run(
        [str(EXECUTABLE), "log", "--json", "-n", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return [json.loads(line)["path"] for line in shown.stdout.splitlines()]


def test_path_parameters_and_fragments_are_left_out(
    module_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = module_proxy()
    with open_tunnel(proxy, "api.anthropic.com") as tunnel:
        tunnel.sendall(
            b"GET /v1/a;jsessionid=ABCSESSION/b;v=1?q=SECRETQ#FRAGSECRET HTTP/1.1\r\n"
            b"Host: api.anthropic.com\r\nConnection: close\r\n\r\n"
        )
        head, _ = read_response(tunnel)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert proxy.stop() == 0  # the audit writer has written every row
    log = proxy.log_text()
    assert "ALLOW GET api.anthropic.com:443 /v1/a/b " in log
    assert [s for s in SECRETS if s in log] == []
    assert "/v1/a/b" in audit_paths(proxy)
    assert [s for s in SECRETS if any(s in p for p in audit_paths(proxy) if p)] == []


def test_verbose_logs_no_request_line_from_mitmproxy(module_proxy: ProxyFactory) -> None:
    proxy = module_proxy("-v")
    for raw in (
        b"GET http://user:sekrit@example.com/p?q=SECRETQ HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"GARBAGE /x?q=SECRETQ HTTP/9\r\n\r\n",
        b"GET /p?q=SECRETQ HTTP/1.1\r\nHost: example.com\r\nX-A: HEADER\x01SECRET\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(raw)
            answer = read_head(sock)
        assert answer.startswith(b"HTTP/1.1 400") or answer.startswith(b"HTTP/1.1 403"), answer
    assert proxy.stop() == 0
    log = proxy.log_text()
    assert [s for s in SECRETS if s in log] == [], log
    assert "\x01" not in log
