"""Real clients through the real proxy: curl, httpx, the anthropic SDK; streaming; fail-closed."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import ProxyProcess, curl, send_connect, start_proxy
from tests.upstream import Upstream


def httpx_client(proxy: ProxyProcess) -> httpx.Client:
    return httpx.Client(proxy=proxy.url, verify=proxy.client_context(), timeout=30)


def test_curl_head_answers(proxy: ProxyProcess, upstream: Upstream) -> None:
    result = curl(proxy, "--head", "https://api.anthropic.com")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HTTP/")
    assert " 200" in result.stdout.splitlines()[0]
    assert upstream.seen.requests == [("HEAD", "/", "api.anthropic.com")]


def test_httpx_keep_alive(proxy: ProxyProcess, upstream: Upstream) -> None:
    with httpx_client(proxy) as client:
        for i in range(3):
            response = client.get(f"https://api.anthropic.com/r{i}")
            assert response.status_code == 200
    assert [r[1] for r in upstream.seen.requests] == ["/r0", "/r1", "/r2"]
    assert upstream.seen.connections == 1  # one kept-alive upstream connection


def test_httpx_sees_refusal(proxy: ProxyProcess, upstream: Upstream) -> None:
    with httpx_client(proxy) as client, pytest.raises(httpx.ProxyError, match="403"):
        client.get("https://example.com/")
    assert upstream.seen.connections == 0


def test_anthropic_sdk_streams_a_message(proxy: ProxyProcess, upstream: Upstream) -> None:
    import anthropic  # 1.2 s to import: only the tests that use it pay for it

    client = anthropic.Anthropic(
        api_key="sk-ant-test-secret-key-0123456789",
        base_url="https://api.anthropic.com",
        http_client=anthropic.DefaultHttpxClient(proxy=proxy.url, verify=proxy.client_context()),
        max_retries=0,
    )
    texts = []
    with client.messages.stream(
        model="claude-test", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        texts.extend(stream.text_stream)
    assert "".join(texts) == "Hello from the upstream"
    assert upstream.seen.requests == [("POST", "/v1/messages", "api.anthropic.com")]
    sent = upstream.seen.headers[0]
    assert "sk-ant-test-secret-key-0123456789" in sent.get("authorization", sent.get("x-api-key"))
    assert "sk-ant-test-secret-key" not in proxy.log_text()


def test_sse_events_arrive_as_sent(proxy: ProxyProcess, upstream: Upstream) -> None:
    """The upstream sends the last event only after the client has seen the first one.

    A proxy that buffered the stream would deliver nothing until the end, and the upstream's gate
    would time out: the first event would then arrive with the others, not before the last.
    """
    gate = upstream.gate("sse")
    with (
        httpx_client(proxy) as client,
        client.stream("GET", "https://api.anthropic.com/sse?n=3&gate=sse") as response,
    ):
        assert response.headers["content-type"] == "text/event-stream"
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert first.startswith("data: 0 ")
        gate.set()
        rest = [line for line in lines if line.startswith("data:")]
    assert [line.split()[1] for line in rest] == ["1", "2"]
    assert upstream.seen.gate_waits == [True]  # the first event came before the last was sent


def test_large_download_streams(proxy: ProxyProcess, upstream: Upstream) -> None:
    """Half of a 64 MB body reaches the client before the upstream sends the other half."""
    size = 64 * 1024 * 1024
    gate = upstream.gate("bytes")
    received = 0
    with (
        httpx_client(proxy) as client,
        client.stream("GET", f"https://api.anthropic.com/bytes?size={size}&gate=bytes") as response,
    ):
        for chunk in response.iter_raw():
            received += len(chunk)
            if received >= size // 2:
                gate.set()
    assert received == size
    assert upstream.seen.gate_waits == [True]  # half arrived before the rest was sent


def test_curl_upload_reaches_upstream(proxy: ProxyProcess, upstream: Upstream) -> None:
    result = curl(proxy, "--data-binary", "payload", "https://api.anthropic.com/echo")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "payload"


def test_log_has_decisions_and_no_secrets(proxy: ProxyProcess, upstream: Upstream) -> None:
    curl(
        proxy,
        "-H",
        "Authorization: Bearer secret-bearer-token",
        "-H",
        "Cookie: session=secret-cookie",
        "-H",
        "x-api-key: secret-api-key",
        "https://api.anthropic.com/v1/models?key=secret-query",
    )
    curl(proxy, "-H", "Authorization: Bearer secret-bearer-token", "https://example.com/")
    log = proxy.log_text()
    for secret in ("secret-bearer-token", "secret-cookie", "secret-api-key", "secret-query"):
        assert secret not in log
    assert "ALLOW GET api.anthropic.com:443 /v1/models 200 rule=*.anthropic.com" in log
    assert 'BLOCK CONNECT example.com:443 - 403 "example.com is not on the allowlist"' in log


@pytest.mark.parametrize(
    ("script", "connect_status"),
    [("broken_policy.py", b"403"), ("broken_request_check.py", b"200")],
)
def test_a_bug_in_the_policy_refuses(
    home, upstream: Upstream, upstream_ca_file, script: str, connect_status: bytes
) -> None:
    broken = start_proxy(home, upstream, upstream_ca_file, scripts=("route_to_upstream.py", script))
    try:
        sock = send_connect(broken, b"api.anthropic.com:443")
        assert sock.recv(100).split()[1] == connect_status
        sock.close()
        result = curl(broken, "https://api.anthropic.com/")
        assert result.returncode != 0 or "refused" in result.stdout
        assert upstream.seen.requests == []
        assert "internal error" in broken.log_text()
    finally:
        assert broken.stop() == 0


def test_upstream_certificate_is_verified(home, upstream: Upstream, upstream_ca_file) -> None:
    """An upstream whose certificate the normal trust roots do not vouch for gets no request."""
    strict = start_proxy(home, upstream, upstream_ca_file, trust_upstream=False)
    try:
        result = curl(strict, "-w", "%{http_code}", "-o", "/dev/null",
                      "https://api.anthropic.com/secret-path")  # fmt: skip
        assert result.stdout == "502"
        assert upstream.seen.connections == 1  # the TLS handshake was tried, and failed
        assert upstream.seen.requests == []
    finally:
        assert strict.stop() == 0
