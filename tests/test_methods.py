"""Methods are case-sensitive, and a header that overrides the method or path cannot ride along
where a rule decides methods or paths. Proof: what the upstream received."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ProxyProcess, open_tunnel, read_response, start_proxy
from tests.upstream import Upstream

GET_ONLY = 'defaults = false\n[[allow]]\nhost = "api.anthropic.com"\nmethods = ["GET"]\n'


@pytest.fixture(scope="module")
def get_only(
    tmp_path_factory: pytest.TempPathFactory, upstream_server: Upstream, upstream_ca_file: Path
) -> Iterator[ProxyProcess]:
    home = tmp_path_factory.mktemp("home")
    (home / ".config" / "claude-proxy").mkdir(parents=True)
    (home / ".config" / "claude-proxy" / "config.toml").write_text(GET_ONLY)
    process = start_proxy(home, upstream_server, upstream_ca_file)
    yield process
    process.stop()


def send(proxy: ProxyProcess, head: bytes) -> bytes:
    with open_tunnel(proxy, "api.anthropic.com") as tunnel:
        tunnel.sendall(head + b"\r\n")
        head, body = read_response(tunnel)
    return head + b"\r\n\r\n" + body


@pytest.mark.parametrize("method", [b"get", b"gEt", b"Get"])
def test_a_method_in_another_case_is_another_method_and_refused(
    get_only: ProxyProcess, upstream: Upstream, method: bytes
) -> None:
    head = send(get_only, method + b" /x HTTP/1.1\r\nHost: api.anthropic.com\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert b"the method is not in upper case (methods are case-sensitive)" in head
    assert upstream.seen.requests == []


@pytest.mark.parametrize(
    "header", ["X-HTTP-Method-Override: DELETE", "X-HTTP-Method: PUT", "X-Original-URL: /admin"]
)
def test_an_override_header_is_refused_where_a_method_rule_applies(
    get_only: ProxyProcess, upstream: Upstream, header: str
) -> None:
    head = send(get_only, f"GET /x HTTP/1.1\r\nHost: api.anthropic.com\r\n{header}\r\n".encode())
    assert head.startswith(b"HTTP/1.1 403"), head
    assert b"would change the method or path a rule decided on" in head
    assert upstream.seen.requests == []


def test_the_allowed_method_still_passes(get_only: ProxyProcess, upstream: Upstream) -> None:
    head = send(get_only, b"GET /x HTTP/1.1\r\nHost: api.anthropic.com\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert upstream.seen.requests == [("GET", "/x", "api.anthropic.com")]


def test_an_override_header_passes_where_no_rule_decides_methods(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    head = send(proxy, b"GET /x HTTP/1.1\r\nHost: api.anthropic.com\r\nX-HTTP-Method: PUT\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert upstream.seen.requests == [("GET", "/x", "api.anthropic.com")]
