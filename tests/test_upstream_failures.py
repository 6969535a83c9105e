"""An allowed request whose upstream cannot be reached gets claude-proxy's own answer.

Each upstream here fails in one real way on loopback: a closed port, a name that does not resolve
(the test's resolver says so; no lookup leaves this machine), a certificate for another name, a
reset in the TLS handshake, bytes that are not TLS, a reset after the request. Over HTTP/1.1,
HTTP/2 and SOCKS5 the client gets a 502 with `X-Claude-Proxy`, an RFC 9209 `Proxy-Status` naming
the error type and a plain-text paragraph that says what failed and that the policy allowed it;
the decision line and the audit row record the status and the reason.
"""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.conftest import ProxyProcess, open_tunnel, read_head, read_response, start_proxy
from tests.support.audit import wait_for, wait_for_log
from tests.upstream import Upstream

CLIENT_SECONDS = 20
RULE = "*.fail.example"


class FailingUpstream:
    """A loopback TCP server that treats every connection with `serve` (in its own thread)."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self.serve = serve
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            with self.lock:
                self.accepted += 1
            conn.settimeout(CLIENT_SECONDS)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.serve(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.listener.close()


def reset(conn: socket.socket) -> None:
    """Close with a TCP reset (RST) instead of an orderly FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def reset_in_handshake(conn: socket.socket) -> None:
    conn.recv(65536)  # the proxy's ClientHello
    reset(conn)


def not_tls(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
    while conn.recv(65536):  # until the proxy gives up
        pass


def tls_server(context: ssl.SSLContext, then: Callable[[ssl.SSLSocket], None]) -> Callable:
    def serve(conn: socket.socket) -> None:
        try:
            tls = context.wrap_socket(conn, server_side=True)
        except ssl.SSLError:
            return  # the proxy refused the certificate: expected for some
        then(tls)

    return serve


def read_request_then_reset(tls: ssl.SSLSocket) -> None:
    read_head(tls)
    reset(tls)


def answer_with(head: bytes) -> Callable[[ssl.SSLSocket], None]:
    def answer(tls: ssl.SSLSocket) -> None:
        read_head(tls)
        tls.sendall(head)
        while tls.recv(65536):  # until the proxy closes
            pass

    return answer


@dataclass(frozen=True)
class Case:
    error: str  # RFC 9209 error type
    what: str  # what failed, as the body, the Proxy-Status details and the audit row say it
    reached: bool  # whether the failing upstream saw a TCP connection


CASES = {
    "refused": Case(
        "connection_refused",
        "connecting to refused.fail.example:443 failed: Connection refused",
        False,
    ),
    "nxdomain": Case(
        "dns_error",
        "the name nxdomain.fail.example could not be resolved (Name or service not known)",
        False,
    ),
    "wrongname": Case(
        "tls_certificate_error",
        "the TLS certificate of wrongname.fail.example:443 was not accepted: hostname mismatch",
        True,
    ),
    "reset": Case(
        "connection_terminated",
        "reset.fail.example:443 closed the connection during the TLS handshake",
        True,
    ),
    "nottls": Case(
        "tls_protocol_error",
        "the TLS handshake with nottls.fail.example:443 failed: the upstream does not speak TLS",
        True,
    ),
    "hangup": Case(
        "connection_terminated",
        "hangup.fail.example:443 closed the connection before sending a response",
        True,
    ),
    "garbledhead": Case(
        "http_protocol_error",
        "garbledhead.fail.example:443 answered with a malformed response head",
        True,
    ),
    "badheader": Case(
        "http_protocol_error",
        "badheader.fail.example:443 answered with a malformed response head "
        "(invalid header name: b'X Bad')",
        True,
    ),
}
PROTOCOLS = ["http1.1", "http2", "socks5"]


@dataclass
class Failing:
    proxy: ProxyProcess
    servers: dict[str, FailingUpstream]


@pytest.fixture(scope="module")
def failing(
    tls_ca: trustme.CA,
    upstream_server: Upstream,
    upstream_ca_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Failing]:
    other_name = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("other.example").configure_cert(other_name)
    right_name = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("*.fail.example").configure_cert(right_name)
    servers = {
        "wrongname": FailingUpstream(tls_server(other_name, lambda tls: None)),
        "reset": FailingUpstream(reset_in_handshake),
        "nottls": FailingUpstream(not_tls),
        "hangup": FailingUpstream(tls_server(right_name, read_request_then_reset)),
        "garbledhead": FailingUpstream(
            tls_server(right_name, answer_with(b"HTTP/1.1 two hundred\r\n\r\n"))
        ),
        "badheader": FailingUpstream(
            tls_server(
                right_name,
                answer_with(b"HTTP/1.1 200 OK\r\nX Bad: 1\r\nContent-Length: 0\r\n\r\n"),
            )
        ),
    }
    closed = socket.socket()  # bound, never listening: every connection to it is refused
    closed.bind(("127.0.0.1", 0))
    routes = {f"{name}.fail.example": s.port for name, s in servers.items()}
    routes["refused.fail.example"] = closed.getsockname()[1]
    env = {
        "CLAUDE_PROXY_TEST_ROUTE": ";".join(f"{name}={port}" for name, port in routes.items()),
        "CLAUDE_PROXY_TEST_RESOLVE": "nxdomain.fail.example=;private.fail.example=10.0.0.1",
    }
    home = tmp_path_factory.mktemp("home")
    scripts = ("route_to_upstream.py", "redirect_request.py")
    proxy = start_proxy(
        home, upstream_server, upstream_ca_file, "--allow", RULE, env=env, scripts=scripts
    )
    yield Failing(proxy, servers)
    proxy.stop()
    closed.close()
    for server in servers.values():
        server.close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: str


def fetch(proxy: ProxyProcess, protocol: str, url: str, tmp_path: Path) -> Answer:
    """One request with curl; a transfer curl calls failed (a reset stream) fails the test."""
    if protocol == "socks5":
        how = ["--proxy", f"socks5h://127.0.0.1:{proxy.socks_port}", "--http1.1"]
    else:
        how = ["--proxy", proxy.url, f"--{protocol}"]
    heads, body = tmp_path / "heads", tmp_path / "body"
    result = subprocess.run(
        ["curl", "-sS", "--max-time", str(CLIENT_SECONDS), "--cacert", str(proxy.ca_cert), *how,
         "-D", str(heads), "-o", str(body), url],
        capture_output=True, text=True, timeout=CLIENT_SECONDS + 10,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    last = last_head(heads).split("\n")
    headers = {}
    for line in last[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(last[0].split()[1]), headers, body.read_text())


def last_head(heads: Path) -> str:
    """The last response head curl wrote with -D (after a CONNECT's), lines split by "\\n"."""
    return heads.read_text().strip().split("\n\n")[-1]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("kind", sorted(CASES))
def test_an_unreachable_upstream_gets_the_proxy_answer(
    failing: Failing, tmp_path: Path, kind: str, protocol: str
) -> None:
    case = CASES[kind]
    server = failing.servers.get(kind)
    before = server.accepted if server else 0
    path = f"/{kind}-{protocol}"
    answer = fetch(failing.proxy, protocol, f"https://{kind}.fail.example{path}", tmp_path)

    assert answer.status == 502, answer
    assert answer.headers["x-claude-proxy"] == "upstream-error"
    assert answer.headers["proxy-status"] == (
        f'claude-proxy; error={case.error}; details="{case.what}"'
    )
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    assert answer.body.startswith(f"claude-proxy: {case.what}.\n"), answer.body
    assert "The policy allowed this request" in answer.body
    assert "\n\n" not in answer.body.strip()  # one paragraph
    if server is not None:
        assert (server.accepted > before) is case.reached

    listener = "socks5" if protocol == "socks5" else "http"
    [row] = wait_for(failing.proxy, "path = ?", (path,))
    assert row == row | {
        "listener": listener,
        "method": "GET",
        "host": f"{kind}.fail.example",
        "decision": "allow",
        "rule": RULE,
        "status": 502,
        "reason": case.what,
    }
    wait_for_log(
        failing.proxy, f'ALLOW GET {kind}.fail.example:443 {path} 502 rule={RULE} "{case.what}"'
    )


def test_a_head_request_over_http2(failing: Failing, tmp_path: Path) -> None:
    """A HEAD answer carries no body: curl's `--head` used to end in a PROTOCOL_ERROR reset."""
    heads = tmp_path / "heads"
    result = subprocess.run(
        ["curl", "-sS", "--head", "--http2", "--max-time", str(CLIENT_SECONDS),
         "--proxy", failing.proxy.url, "--cacert", str(failing.proxy.ca_cert),
         "-D", str(heads), "-o", "/dev/null", "https://refused.fail.example/head"],
        capture_output=True, text=True, timeout=CLIENT_SECONDS + 10,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    last = last_head(heads)
    assert last.startswith("HTTP/2 502"), last
    assert "proxy-status: claude-proxy; error=connection_refused;" in last


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("url", "error", "reason"),
    [
        (
            "https://private.fail.example/private",
            "destination_ip_prohibited",
            "private.fail.example resolves to 10.0.0.1 (private); only a rule naming "
            "that IP literal allows it",
        ),
        (
            "https://api.anthropic.com/redirected",
            "http_request_denied",
            "not the CONNECT destination",
        ),
    ],
    ids=["forbidden address", "backstop"],
)
def test_a_refusal_on_the_way_upstream_is_a_refusal(
    failing: Failing,
    upstream: Upstream,
    tmp_path: Path,
    protocol: str,
    url: str,
    error: str,
    reason: str,
) -> None:
    """Refused after the request was allowed (by the address check or the backstop): answered,
    logged and recorded as a refusal with its status, never as an ALLOW."""
    path = f"{url.rsplit('/', 1)[1]}-{protocol}"
    answer = fetch(failing.proxy, protocol, f"{url}-{protocol}", tmp_path)

    assert answer.status == 502, answer
    assert answer.headers["x-claude-proxy"] == "refused"
    assert answer.headers["proxy-status"] == f'claude-proxy; error={error}; details="{reason}"'
    assert answer.body.startswith("claude-proxy refused "), answer.body
    assert f": {reason}.\n" in answer.body
    assert "This is the sandbox's policy, not a network fault" in answer.body
    [row] = wait_for(failing.proxy, "path = ?", (f"/{path}",))
    assert row == row | {"decision": "block", "status": 502, "reason": reason}
    host = url.split("/")[2]
    wait_for_log(failing.proxy, f'BLOCK GET {host}:443 /{path} 502 "{reason}"')
    assert upstream.seen.connections == 0


def test_a_client_that_leaves_mid_request_body(failing: Failing, upstream: Upstream) -> None:
    with open_tunnel(failing.proxy, "api.anthropic.com") as tls:
        tls.sendall(
            b"POST /leaves-mid-body HTTP/1.1\r\nHost: api.anthropic.com\r\n"
            b"Content-Length: 100000\r\n\r\n" + b"x" * 10
        )
    [row] = wait_for(failing.proxy, "path = '/leaves-mid-body'")
    assert row == row | {
        "decision": "allow",
        "status": None,
        "reason": "the client left before the response began",
    }


def test_a_client_that_leaves_mid_response(failing: Failing, upstream: Upstream) -> None:
    """The status that was answered is recorded, with why the response did not end
    (this made a SOCKS5 audit test flaky: its client closes after reading the head)."""
    try:
        with open_tunnel(failing.proxy, "api.anthropic.com") as tls:
            tls.sendall(
                b"GET /bytes?size=300000&gate=leaves HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n"
            )
            assert read_head(tls).startswith(b"HTTP/1.1 200")
        [row] = wait_for(failing.proxy, "path = '/bytes'")
    finally:
        upstream.gate("leaves").set()
    assert row == row | {
        "decision": "allow",
        "status": 200,
        "reason": "the client left before the response ended",
    }


def test_a_retry_on_the_same_connection_tries_the_upstream_again(failing: Failing) -> None:
    """The answer keeps the connection open; a retry on it is a new attempt (a name may resolve
    again, a reset may pass), not the first failure repeated at once."""
    server = failing.servers["reset"]
    before = server.accepted
    with open_tunnel(failing.proxy, "reset.fail.example") as tls:
        for attempt in (1, 2):
            tls.sendall(b"GET /retry HTTP/1.1\r\nHost: reset.fail.example\r\n\r\n")
            head, body = read_response(tls)
            assert head.startswith(b"HTTP/1.1 502"), (attempt, head)
            assert body.startswith(b"claude-proxy: reset.fail.example:443 closed the connection")
    assert server.accepted - before == 2


@pytest.mark.parametrize("protocol", ["http1.1", "http2"])
def test_an_upload_to_an_unreachable_upstream(
    failing: Failing, tmp_path: Path, protocol: str
) -> None:
    """A request body the upstream will never get: the answer comes, the upload ends."""
    upload = tmp_path / "upload"
    upload.write_bytes(b"x" * (2 << 20))
    heads, body = tmp_path / "heads", tmp_path / "body"
    result = subprocess.run(
        ["curl", "-sS", "--max-time", str(CLIENT_SECONDS), "--cacert", str(failing.proxy.ca_cert),
         "--proxy", failing.proxy.url, f"--{protocol}", "--data-binary", f"@{upload}",
         "-D", str(heads), "-o", str(body), f"https://refused.fail.example/upload-{protocol}"],
        capture_output=True, text=True, timeout=CLIENT_SECONDS + 10,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert last_head(heads).split()[1] == "502"
    assert body.read_text().startswith(f"claude-proxy: {CASES['refused'].what}.\n")
    [row] = wait_for(failing.proxy, "path = ?", (f"/upload-{protocol}",))
    assert row == row | {"method": "POST", "status": 502, "reason": CASES["refused"].what}
