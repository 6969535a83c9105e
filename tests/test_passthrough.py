"""Pass-through (`inspect = false`): the client's own TLS reaches the upstream, never ours.

The upstream here demands a client certificate that only the client holds, and the client trusts
only the upstream's CA: a request that gets through proves the proxy did not terminate the TLS.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests import tlsclient
from tests.conftest import ProxyProcess, read_head, send_connect, start_proxy
from tests.support.reload import config_file, wait_applied, write_by_rename
from tests.support.socks import SUCCEEDED, socks_connect
from tests.upstream import Upstream

CONFIG = """defaults = false
[[allow]]
host = "claude.ai"
inspect = false
[[allow]]
host = "api.anthropic.com"
"""


@pytest.fixture(scope="module")
def pinned_upstream(tls_ca: trustme.CA) -> Iterator[Upstream]:
    """An upstream that accepts only clients with a certificate from `tls_ca`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("claude.ai", "api.anthropic.com").configure_cert(context)
    context.verify_mode = ssl.CERT_REQUIRED
    tls_ca.configure_trust(context)
    server = Upstream(context)
    server.serve_in_background()
    yield server
    server.shutdown()


@pytest.fixture
def upstream(pinned_upstream: Upstream) -> Upstream:
    pinned_upstream.reset()
    return pinned_upstream


@pytest.fixture
def proxy(home: Path, upstream: Upstream, upstream_ca_file: Path) -> Iterator[ProxyProcess]:
    path = config_file(home)
    path.parent.mkdir(parents=True)
    path.write_text(CONFIG)
    process = start_proxy(home, upstream, upstream_ca_file)
    yield process
    assert process.stop() == 0


@pytest.fixture
def client_tls(tls_ca: trustme.CA) -> ssl.SSLContext:
    """A client with its own trust store (the upstream's CA only) and its own certificate."""
    context = ssl.create_default_context()
    context.load_verify_locations(cadata=tls_ca.cert_pem.bytes().decode())
    tls_ca.issue_cert("client.example").configure_cert(context)
    context.set_alpn_protocols(["http/1.1"])
    return context


def get(sock: ssl.SSLSocket, path: str = "/") -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: claude.ai\r\n\r\n".encode())
    head = read_head(sock)
    return head.split(b"\r\n", 1)[0]


def closed(sock: socket.socket) -> bool:
    """Whether the peer closes without answering; a timeout propagates."""
    try:
        return sock.recv(65536) == b""
    except (ssl.SSLEOFError, ConnectionResetError):
        return True


def pass_through_tunnel(proxy: ProxyProcess, context: ssl.SSLContext) -> ssl.SSLSocket:
    sock = send_connect(proxy, b"claude.ai:443")
    assert read_head(sock).startswith(b"HTTP/1.1 200")
    return context.wrap_socket(sock, server_hostname="claude.ai")


def test_the_client_speaks_tls_with_the_upstream_itself(
    proxy: ProxyProcess, upstream: Upstream, client_tls: ssl.SSLContext
) -> None:
    with pass_through_tunnel(proxy, client_tls) as tls:
        assert get(tls) == b"HTTP/1.1 200 OK"
        assert tls.getpeercert() is not None  # verified against the upstream's CA alone
    assert upstream.seen.snis == ["claude.ai"]
    assert [r[2] for r in upstream.seen.requests] == ["claude.ai"]
    assert "ALLOW PASS claude.ai:443 - - rule=config.toml:2" in proxy.log_text()


def test_an_inspected_host_is_not_passed_through(
    proxy: ProxyProcess, upstream: Upstream, client_tls: ssl.SSLContext
) -> None:
    """The same client, to a host the policy inspects: it meets the proxy's certificate."""
    sock = send_connect(proxy, b"api.anthropic.com:443")
    assert read_head(sock).startswith(b"HTTP/1.1 200")
    with pytest.raises(ssl.SSLCertVerificationError):
        client_tls.wrap_socket(sock, server_hostname="api.anthropic.com")
    sock.close()
    assert upstream.seen.connections == 0


def test_a_pass_through_over_socks5(
    proxy: ProxyProcess, upstream: Upstream, client_tls: ssl.SSLContext
) -> None:
    sock, code = socks_connect(proxy, "claude.ai")
    assert code == SUCCEEDED
    with client_tls.wrap_socket(sock, server_hostname="claude.ai") as tls:
        assert get(tls) == b"HTTP/1.1 200 OK"
    assert upstream.seen.snis == ["claude.ai"]


@pytest.mark.parametrize(
    "hello",
    [
        tlsclient.Hello("api.anthropic.com", [b"http/1.1"]),  # another name than the CONNECT's
        tlsclient.Hello(None, [b"http/1.1"]),  # no name at all
        tlsclient.Hello("claude.ai", [b"http/1.1"], extra=[(0xFE0D, b"\x00" * 64)]),  # ECH
    ],
    ids=["other-sni", "no-sni", "ech"],
)
def test_a_hello_that_does_not_name_the_host_is_refused(
    proxy: ProxyProcess, upstream: Upstream, hello: tlsclient.Hello
) -> None:
    sock = send_connect(proxy, b"claude.ai:443")
    assert read_head(sock).startswith(b"HTTP/1.1 200")
    assert tlsclient.handshake(sock, hello).kind == "closed"
    sock.close()
    assert upstream.seen.connections == 0
    assert 'BLOCK PASS claude.ai:443 - - "' in proxy.log_text()


def test_an_open_pass_through_closes_once_its_host_is_removed(
    proxy: ProxyProcess, upstream: Upstream, client_tls: ssl.SSLContext
) -> None:
    tls = pass_through_tunnel(proxy, client_tls)
    assert get(tls, "/first") == b"HTTP/1.1 200 OK"
    tls.recv(65536)  # the body
    text = CONFIG.replace('host = "claude.ai"\ninspect = false\n', 'host = "claude.com"\n')
    write_by_rename(config_file(proxy.home), text)
    wait_applied(proxy, text)
    tls.sendall(b"GET /second HTTP/1.1\r\nHost: claude.ai\r\n\r\n")
    assert closed(tls)
    tls.close()
    upstream.wait_idle()
    assert [r[1] for r in upstream.seen.requests] == ["/first"]
    assert (
        'BLOCK PASS claude.ai:443 - - "closed: the policy now refuses claude.ai:443 '
        '(claude.ai is not on the allowlist)"'
    ) in proxy.log_text()  # closed when the policy changed, not at its next bytes


def test_a_large_download_is_relayed_without_being_kept(
    proxy: ProxyProcess, upstream: Upstream, client_tls: ssl.SSLContext
) -> None:
    size = 200 * 1024 * 1024
    with pass_through_tunnel(proxy, client_tls) as tls:
        tls.sendall(f"GET /bytes?size={size} HTTP/1.1\r\nHost: claude.ai\r\n\r\n".encode())
        received = len(read_head(tls).split(b"\r\n\r\n", 1)[1])
        while received < size:
            chunk = tls.recv(1 << 20)
            assert chunk
            received += len(chunk)
    peak = next(
        int(line.split()[1])
        for line in Path(f"/proc/{proxy.proc.pid}/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )
    assert peak < 150 * 1024, f"peak RSS {peak} kB for a {size} byte download"


def test_nothing_but_tls_goes_through(proxy: ProxyProcess, upstream: Upstream) -> None:
    sock = send_connect(proxy, b"claude.ai:443")
    assert read_head(sock).startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET / HTTP/1.1\r\nHost: claude.ai\r\n\r\n")
    assert closed(sock)
    sock.close()
    assert upstream.seen.connections == 0
