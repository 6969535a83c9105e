"""The audit log of the real proxy: every kind of decision becomes a row with the right fields,
no secret reaches the file, a stuck or locked disk slows no request, and `claude-proxy log` turns
the rows into a table, JSON lines, a summary and rules that allow what was refused."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from claude_proxy.cli import log_cmd
from claude_proxy.state import accounts
from tests.conftest import (
    EXECUTABLE,
    ProxyProcess,
    curl,
    open_tunnel,
    read_head,
    send_connect,
    start_proxy,
)
from tests.support.audit import audit_db, decisions, wait_for, wait_for_log
from tests.support.socks import NOT_ALLOWED, socks_connect, socks_tunnel
from tests.support.waiting import wait_until
from tests.upstream import Account, Upstream

DEADLINE = 10  # seconds any awaited event may take; running out fails the test
SECRETS = ("sk-ant-api03-SECRETHEADER", "SECRETCOOKIE", "SECRETQUERY", "SECRETBEARER")
LOCKER = (
    "import sqlite3, sys\n"
    "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "conn.execute('BEGIN EXCLUSIVE')\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
)


def writer_row(proxy: ProxyProcess) -> dict:
    conn = log_cmd.connect(audit_db(proxy))
    if conn is None:
        return {}
    with closing(conn):
        row = conn.execute("SELECT * FROM writer").fetchone()
    return dict(row) if row else {}


def refused_connect(proxy: ProxyProcess, authority: bytes) -> bytes:
    """A refused CONNECT, answered in time (a timeout fails): its whole answer."""
    with send_connect(proxy, authority) as sock:
        sock.settimeout(DEADLINE)
        answer = read_head(sock)
        head, body = answer.split(b"\r\n\r\n", 1)
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, "closed before the end of the refusal"
            body += chunk
    assert answer.startswith(b"HTTP/1.1 403"), answer
    return head + b"\r\n\r\n" + body


def in_tunnel(proxy: ProxyProcess, request: bytes) -> bytes:
    """Send `request` inside a tunnel to api.anthropic.com; the answer's head."""
    with open_tunnel(proxy, "api.anthropic.com") as tls:
        tls.settimeout(DEADLINE)
        tls.sendall(request)
        return read_head(tls)


def log(proxy: ProxyProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_") and k != "COLUMNS"}
    env["HOME"] = str(proxy.home)
    return subprocess.run(
        [str(EXECUTABLE), "log", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )


@pytest.fixture(scope="module")
def audited(
    upstream_server: Upstream, upstream_ca_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    process = start_proxy(
        tmp_path_factory.mktemp("home"),
        upstream_server,
        upstream_ca_file,
        "--allow",
        "*.internal.example",
        "--set",
        "sandbox_response_timeout=1",
        env={"CLAUDE_PROXY_TEST_RESOLVE": "loop.internal.example=127.0.0.1"},
    )
    yield process
    process.stop()


# Every kind of decision, with its fields


def post_with_secrets(proxy: ProxyProcess, upstream: Upstream, path: str) -> None:
    """POST `hello` to `path` with a secret in a header, a cookie, a bearer and the query."""
    result = curl(
        proxy,
        "-H",
        f"x-api-key: {SECRETS[0]}",
        "-H",
        f"Authorization: Bearer {SECRETS[3]}",
        "-b",
        f"session={SECRETS[1]}",
        "--data-binary",
        "hello",
        f"https://api.anthropic.com{path}?key={SECRETS[2]}",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello"
    # The secrets did pass through the proxy: the upstream got each of them.
    assert upstream.seen.requests == [("POST", f"{path}?key={SECRETS[2]}", "api.anthropic.com")]
    assert upstream.seen.headers[0]["x-api-key"] == SECRETS[0]
    assert upstream.seen.headers[0]["authorization"] == f"Bearer {SECRETS[3]}"
    assert SECRETS[1] in upstream.seen.headers[0]["cookie"]


def test_an_allowed_tunnel_and_its_request(audited: ProxyProcess, upstream: Upstream) -> None:
    post_with_secrets(audited, upstream, "/v1/audit-echo")
    [post] = wait_for(audited, "path = ?", ("/v1/audit-echo",))
    [tunnel] = decisions(audited, "method = 'CONNECT' AND client = ?", (post["client"],))
    assert post["client"].startswith("127.0.0.1:")
    common = {"listener": "http", "host": "api.anthropic.com", "port": 443, "decision": "allow"}
    assert tunnel == tunnel | common | {
        "path": None,
        "rule": "*.anthropic.com",
        "reason": None,
        "status": 200,
        "bytes_up": 0,
        "bytes_down": 0,
        "organization": None,
        "fingerprint": None,
    }
    assert post == post | common | {
        "method": "POST",
        "rule": "*.anthropic.com",
        "reason": None,
        "status": 200,
        "bytes_up": 5,
        "bytes_down": 5,
    }
    assert post["time"] >= tunnel["time"] and post["duration_ms"] >= 0


def test_secrets_in_headers_cookies_and_queries_never_reach_the_file(
    audited: ProxyProcess, upstream: Upstream
) -> None:
    post_with_secrets(audited, upstream, "/v1/audit-secrets")
    wait_for(audited, "path LIKE '/v1/audit-secrets%'")
    files = sorted(audit_db(audited).parent.glob("audit.db*"))
    assert audit_db(audited) in files
    content = b"".join(path.read_bytes() for path in files)
    assert b"/v1/audit-secrets" in content  # the rows are in these bytes
    for secret in SECRETS:
        assert secret.encode() not in content, secret


def test_the_organization_and_fingerprint_of_a_credential(
    audited: ProxyProcess, upstream: Upstream
) -> None:
    key, org = "sk-ant-api03-AUDIT-KEY", "0c0c0c0c-cccc-4ccc-8ccc-00000000000c"
    upstream.accounts[key] = Account(org)
    result = curl(audited, "-H", f"x-api-key: {key}", "https://api.anthropic.com/v1/org-audit")
    assert result.returncode == 0, result.stderr
    [row] = wait_for(audited, "path = '/v1/org-audit'")
    state = audited.home / ".local" / "state" / "claude-proxy"
    credential = accounts.Credential("x-api-key", key)
    assert row["organization"] == org
    assert row["fingerprint"] == accounts.fingerprint(accounts.load_key(state), credential)
    content = b"".join(path.read_bytes() for path in state.glob("audit.db*"))
    assert key.encode() not in content


def test_a_refused_connect(audited: ProxyProcess, upstream: Upstream) -> None:
    answer = refused_connect(audited, b"refused.example:443")
    [row] = wait_for(audited, "host = 'refused.example'")
    assert row | {"time": 0, "id": 0, "client": "", "duration_ms": 0} == {
        "id": 0,
        "time": 0,
        "client": "",
        "listener": "http",
        "method": "CONNECT",
        "host": "refused.example",
        "port": 443,
        "path": None,
        "decision": "block",
        "rule": None,
        "reason": "refused.example is not on the allowlist",
        "status": 403,
        "bytes_up": 0,
        "bytes_down": len(answer.split(b"\r\n\r\n", 1)[1]),  # the refusal's body
        "duration_ms": 0,
        "organization": None,
        "fingerprint": None,
    }
    assert upstream.seen.connections == 0


def test_a_refused_request_inside_a_tunnel(audited: ProxyProcess) -> None:
    head = in_tunnel(audited, b"GET /wrong-host HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403"), head
    [row] = wait_for(audited, "path = '/wrong-host'")
    assert row == row | {
        "method": "GET",
        "host": "api.anthropic.com",
        "port": 443,
        "decision": "block",
        "status": 403,
        "reason": "Host header evil.example does not name api.anthropic.com",
    }


def test_socks5_refused_and_allowed(audited: ProxyProcess, upstream: Upstream) -> None:
    sock, code = socks_connect(audited, "socks-refused.example")
    sock.close()
    assert code == NOT_ALLOWED
    [refused] = wait_for(audited, "host = 'socks-refused.example'")
    assert refused == refused | {
        "listener": "socks5",
        "method": "SOCKS5",
        "port": 443,
        "decision": "block",
        "status": None,
        "reason": "socks-refused.example is not on the allowlist",
    }
    with socks_tunnel(audited, "claude.ai") as tls:
        tls.sendall(b"GET /through-socks HTTP/1.1\r\nHost: claude.ai\r\n\r\n")
        assert read_head(tls).startswith(b"HTTP/1.1 200")
    [request] = wait_for(audited, "path = '/through-socks'")
    [tunnel] = decisions(audited, "method = 'SOCKS5' AND client = ?", (request["client"],))
    assert tunnel == tunnel | {"host": "claude.ai", "decision": "allow", "rule": "claude.ai"}
    assert request == request | {"listener": "socks5", "host": "claude.ai", "status": 200}


def test_a_malformed_request(audited: ProxyProcess) -> None:
    request = (
        b"GET /malformed HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert in_tunnel(audited, request).startswith(b"HTTP/1.1 400")
    [row] = wait_for(audited, "path = '/malformed'")
    assert row == row | {
        "decision": "block",
        "status": 400,
        "reason": "malformed request: a GET request may not carry a body",
    }


def test_a_limit(audited: ProxyProcess) -> None:
    fields = b"".join(b"X-Field-%d: %d\r\n" % (i, i) for i in range(300))
    head = in_tunnel(
        audited, b"GET /many HTTP/1.1\r\nHost: api.anthropic.com\r\n" + fields + b"\r\n"
    )
    assert head.startswith(b"HTTP/1.1 431"), head
    [row] = wait_for(audited, "status = 431")
    assert row == row | {
        "method": None,
        "host": "api.anthropic.com",
        "port": 443,
        "path": None,
        "decision": "block",
        "reason": "more than 256 header fields",
    }


def test_an_upstream_timeout(audited: ProxyProcess, upstream: Upstream) -> None:
    try:
        head = in_tunnel(
            audited, b"GET /hang?gate=audit HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n"
        )
    finally:
        upstream.gate("audit").set()
    assert head.startswith(b"HTTP/1.1 504"), head
    [row] = wait_for(audited, "path = '/hang'")
    assert row == row | {
        "decision": "allow",
        "rule": "*.anthropic.com",
        "status": 504,
        "reason": "waiting for the response head from api.anthropic.com:443 timed out after 1 s",
    }
    assert row["duration_ms"] >= 1000


def test_a_forbidden_address(audited: ProxyProcess, upstream: Upstream) -> None:
    result = curl(
        audited, "-o", "/dev/null", "-w", "%{http_code}", "https://loop.internal.example/x"
    )
    assert result.stdout == "502"
    [row] = wait_for(audited, "host = 'loop.internal.example' AND method = 'GET'")
    assert row["decision"] == "block" and row["path"] == "/x"
    assert row["reason"].startswith("loop.internal.example resolves to 127.0.0.1")
    assert upstream.seen.connections == 0


def test_a_closed_tunnel(audited: ProxyProcess, upstream: Upstream) -> None:
    with pytest.raises((OSError, ConnectionError)):
        open_tunnel(audited, "api.anthropic.com", sni="sni.evil.example")
    [row] = wait_for(audited, "reason LIKE 'SNI sni.evil.example%'")
    assert row == row | {
        "method": None,
        "host": "api.anthropic.com",
        "port": 443,
        "decision": "block",
        "status": None,
        "reason": "SNI sni.evil.example does not name api.anthropic.com",
    }
    assert upstream.seen.connections == 0


# `claude-proxy log` and `status` on the running proxy's database


def test_log_reads_while_the_proxy_writes(audited: ProxyProcess) -> None:
    refused_connect(audited, b"table.example:443")
    wait_for(audited, "host = 'table.example'")
    result = log(audited)
    assert result.returncode == 0, result.stderr
    assert "BLOCK 403 CONNECT table.example:443" in result.stdout.splitlines()[-1]
    lines = log(audited, "--json", "--blocked", "--host", "table.*").stdout.splitlines()
    assert [json.loads(line)["host"] for line in lines] == ["table.example"]
    summary = log(audited, "--summary").stdout
    assert any(
        "table.example:443" in line and line.split()[0] == "1" for line in summary.splitlines()
    )


def test_log_follow_shows_new_decisions_until_ctrl_c(audited: ProxyProcess) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env["HOME"] = str(audited.home)
    follow = subprocess.Popen(
        [str(EXECUTABLE), "log", "--follow", "--json", "-n", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follow.stdout is not None
        first = read_line(follow)  # the newest decision so far: it is following now
        assert json.loads(first)["id"] > 0
        refused_connect(audited, b"followed.example:443")
        deadline = time.monotonic() + DEADLINE
        while json.loads(read_line(follow))["host"] != "followed.example":
            assert time.monotonic() < deadline, "followed.example never showed"
        follow.send_signal(signal.SIGINT)
        assert follow.wait(DEADLINE) == 0
    finally:
        follow.kill()
        follow.wait()


def read_line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], DEADLINE)
    assert ready, "no line in time"
    line = process.stdout.readline()
    assert line, f"the process ended: {process.stderr.read() if process.stderr else ''}"
    return line


def test_status_names_the_audit_database(audited: ProxyProcess) -> None:
    refused_connect(audited, b"status.example:443")
    wait_for(audited, "host = 'status.example'")
    wait_until(lambda: writer_row(audited).get("written", 0) >= 1, "the writer's counters")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env["HOME"] = str(audited.home)
    before = len(decisions(audited))
    ports = ["--port", str(audited.port), "--socks-port", str(audited.socks_port)]
    result = subprocess.run(
        [str(EXECUTABLE), "status", *ports],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    [line] = [line for line in result.stdout.splitlines() if "audit log:" in line]
    assert line.startswith(f"ok   audit log: {audit_db(audited)}: ")
    assert f"; the running proxy (pid {audited.proc.pid}) dropped 0" in line
    # Its probes (one tunnel through each port) prove themselves: recorded as probes.
    assert any(line.startswith("ok   proxy on") for line in result.stdout.splitlines())
    refused_connect(audited, b"after-status.example:443")  # rows are written in order
    wait_for(audited, "host = 'after-status.example'")
    rows = [(r["host"], r["listener"], r["reason"]) for r in decisions(audited)[before:]]
    assert rows == [
        ("api.anthropic.com", "http", "claude-proxy status probe"),
        ("api.anthropic.com", "socks5", "claude-proxy status probe"),
        ("after-status.example", "http", "after-status.example is not on the allowlist"),
    ]
    assert "probe: " not in audited.log_text()  # a probe's line is at DEBUG, not shown


def test_a_client_cannot_pass_for_the_status_probe(audited: ProxyProcess) -> None:
    """The probe's proof comes from a key in the state folder, out of the agent's reach: the old
    marks (its User-Agent, its SOCKS method) or a wrong proof make a client like any other."""
    began = time.time()
    for extra in (b"User-Agent: claude-proxy-status\r\n", b"X-Claude-Proxy-Probe: 00ff\r\n"):
        sock = send_connect(audited, b"claude.ai:443", extra)
        assert read_head(sock).startswith(b"HTTP/1.1 200")
        sock.close()
    with socket.create_connection(("127.0.0.1", audited.socks_port), timeout=10) as sock:
        sock.sendall(b"\x05\x02\x00\x80")
        assert sock.recv(2) == b"\x05\x80"  # then the proof is due
        sock.sendall(b"\x04nope")
        assert sock.recv(2) == b"\x01\x01"
    found = wait_for(audited, "host = 'claude.ai' AND time >= ?", (began,), count=2)
    assert [(r["decision"], r["reason"]) for r in found] == [("allow", None), ("allow", None)]
    log = audited.log_text()
    assert "INFO ALLOW CONNECT claude.ai:443" in log and "probe: ALLOW CONNECT claude.ai" not in log


def test_suggested_rules_allow_what_was_refused(
    audited: ProxyProcess,
    upstream: Upstream,
    upstream_ca_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    refused_connect(audited, b"api.anthropic.com:8443")
    refused_connect(audited, b"127.0.0.1:443")
    wait_for(audited, "port = 8443 OR host = '127.0.0.1'", count=2)
    assert upstream.seen.connections == 0
    result = log(audited, "--suggest")
    assert result.returncode == 0, result.stderr
    rules = tomllib.loads(result.stdout)["allow"]
    assert {"host": "api.anthropic.com", "ports": [8443]} in rules
    assert [r for r in rules if "ip" in r] == []
    # This machine's loopback, refused as often, is named but never suggested.
    assert "# Not suggested: 127.0.0.1:443 (1 refused attempt in 1 burst, last " in result.stdout
    # Put into the new proxy's config.toml as printed, they allow what was refused.
    home = tmp_path_factory.mktemp("home")
    config = home / ".config" / "claude-proxy" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(result.stdout)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")} | {"HOME": str(home)}
    check = subprocess.run(
        [str(EXECUTABLE), "config", "check"], env=env, capture_output=True, text=True, timeout=10
    )
    assert check.returncode == 0, check.stdout + check.stderr
    allowed = start_proxy(home, upstream, upstream_ca_file)
    try:
        reached = curl(allowed, "https://api.anthropic.com:8443/suggested")
        assert reached.returncode == 0, reached.stderr
        local = curl(allowed, "-i", "https://127.0.0.1/suggested")
        assert "x-claude-proxy: refused" in local.stdout.lower()
    finally:
        allowed.stop()
    assert [path for _, path, _ in upstream.seen.requests] == ["/suggested"]


# The disk does not keep up


def test_a_stuck_disk_slows_no_request_and_drops_are_counted(
    home: Path, upstream: Upstream, upstream_ca_file: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "the disk answers"
    proxy = start_proxy(
        home,
        upstream,
        upstream_ca_file,
        scripts=("route_to_upstream.py", "audit_knobs.py"),
        env={"CLAUDE_PROXY_TEST_AUDIT_QUEUE": "5", "CLAUDE_PROXY_TEST_AUDIT_GATE": str(gate)},
    )
    try:
        total = 40
        for i in range(total):  # each answered in time while the writer cannot write at all
            refused_connect(proxy, b"stuck%d.example:443" % i)
        wait_for_log(proxy, "the database does not keep up")
        gate.touch()
        wait_until(
            lambda: sum(writer_row(proxy).get(k, 0) for k in ("written", "dropped")) == total,
            "every decision written or counted as dropped",
        )
        counters = writer_row(proxy)
        assert counters["dropped"] > 0
        assert len(decisions(proxy)) == counters["written"]
        wait_for_log(proxy, f"caught up; {counters['dropped']} decisions dropped")
        assert proxy.log_text().count("the database does not keep up") == 2  # stderr and file
    finally:
        assert proxy.stop() == 0


def test_a_locked_database_slows_no_request_and_is_said_once(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    proxy = start_proxy(
        home,
        upstream,
        upstream_ca_file,
        scripts=("route_to_upstream.py", "audit_knobs.py"),
        env={"CLAUDE_PROXY_TEST_AUDIT_QUEUE": "5", "CLAUDE_PROXY_TEST_AUDIT_RETRY": "0.05"},
    )
    locker = None
    try:
        refused_connect(proxy, b"before.example:443")
        wait_for(proxy, "host = 'before.example'")
        path = audit_db(proxy)
        locker = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert locker.stdout is not None and locker.stdout.readline() == "locked\n"
        total = 30
        for i in range(total):
            refused_connect(proxy, b"locked%d.example:443" % i)
        wait_for_log(proxy, "database is locked")
        # Each attempt opens the file again (and so changes its ctime): let two more happen.
        attempts: set[int] = set()
        wait_until(
            lambda: attempts.add(path.stat().st_ctime_ns) or len(attempts) >= 3,
            "two more attempts",
        )
        assert locker.stdin is not None
        locker.stdin.close()
        assert locker.wait(DEADLINE) == 0
        wait_until(
            lambda: sum(writer_row(proxy).get(k, 0) for k in ("written", "dropped")) == total + 1,
            "every decision written or counted as dropped",
        )
        counters = writer_row(proxy)
        assert counters["dropped"] > 0
        assert len(decisions(proxy)) == counters["written"]
        wait_for_log(proxy, "writing to")
        assert proxy.log_text().count("database is locked") == 2  # stderr and file: once
    finally:
        if locker is not None:
            locker.kill()
            locker.wait()
        assert proxy.stop() == 0


def test_a_database_overwritten_in_place_is_set_aside_and_a_new_one_started(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    """Garbage over the file, same inode: the writer notices (a failed write or its periodic
    quick_check), says so once, renames the file beside itself and writes to a new one."""
    proxy = start_proxy(
        home,
        upstream,
        upstream_ca_file,
        scripts=("route_to_upstream.py", "audit_knobs.py"),
        env={"CLAUDE_PROXY_TEST_AUDIT_CHECK": "0.2", "CLAUDE_PROXY_TEST_AUDIT_RETRY": "0.05"},
    )
    refused_connect(proxy, b"before.example:443")
    wait_for(proxy, "host = 'before.example'")
    path = audit_db(proxy)
    inode = path.stat().st_ino
    with closing(sqlite3.connect(path)) as conn:  # its pages in the file, as after a while
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    garbage = bytes(range(256)) * (path.stat().st_size // 256 + 1)
    with open(path, "r+b") as file:  # in place: the writer's open file is this one
        file.write(garbage)
    refused_connect(proxy, b"during.example:443")
    wait_for_log(proxy, "is damaged")
    for i in range(3):  # more traffic and more checks: said once
        refused_connect(proxy, b"after%d.example:443" % i)
    rows = wait_for(proxy, "host LIKE 'after%'", count=3)
    assert [r["host"] for r in rows] == [f"after{i}.example" for i in range(3)]
    asides = list(path.parent.glob("audit.db.damaged-*"))
    assert [p.name for p in asides if not p.name.endswith(("-wal", "-shm"))], asides
    kept = next(p for p in asides if not p.name.endswith(("-wal", "-shm")))
    assert kept.stat().st_ino == inode and kept.read_bytes()[: len(garbage)] == garbage
    assert path.stat().st_ino != inode
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    assert proxy.stop() == 0
    assert proxy.log_text().count("is damaged") == 2  # stderr and file: once
    assert "Traceback" not in proxy.log_text()


def test_the_audit_log_can_be_turned_off(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    proxy = start_proxy(home, upstream, upstream_ca_file, "--set", "sandbox_audit=false")
    refused_connect(proxy, b"off.example:443")
    assert proxy.stop() == 0
    assert "BLOCK CONNECT off.example:443" in proxy.log_text()
    assert not audit_db(proxy).exists()


def test_stopping_writes_what_was_decided(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    proxy = start_proxy(home, upstream, upstream_ca_file)
    for i in range(20):
        refused_connect(proxy, b"last%d.example:443" % i)
    assert proxy.stop() == 0
    with closing(sqlite3.connect(audit_db(proxy))) as conn:
        assert conn.execute("SELECT count(*) FROM decisions").fetchone()[0] == 20
