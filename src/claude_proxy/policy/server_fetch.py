"""Where a Messages API request asks Anthropic's servers to connect, read from its JSON body.

A request to Anthropic can make Anthropic's servers reach a host of the caller's choosing: the
MCP connector connects to every `mcp_servers[].url`, and the `web_fetch` server tool fetches URLs
the model picks, limited only by its `allowed_domains`. Under the user's own key the organization
pin passes such a request, and the data then leaves from Anthropic's side. The list of what
fetches, in one place, from Anthropic's documentation:

- MCP connector: https://docs.anthropic.com/en/docs/agents-and-tools/mcp-connector
  (`mcp_servers`: `{"type": "url", "url": ..., "name": ...}`)
- web fetch tool: https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/web-fetch-tool
  (`tools[]` of type `web_fetch_*`, with `allowed_domains` / `blocked_domains`)

`web_search` is left alone: Claude Code's own WebSearch uses it, and it reaches a search index,
not a host the caller names. Pure: bytes in, targets out; no mitmproxy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

# Every path under this one (as a server may read it: decoded, dot segments resolved, slashes
# merged, any case) takes Messages bodies; under BATCHES, batches of them.
MESSAGES = "/v1/messages"
BATCHES = "/v1/messages/batches"
WEB_FETCH_PREFIX = "web_fetch"  # tools[].type: web_fetch_20250910 and later versions
MAX_BODY = 32 * 1024 * 1024  # the Messages API's own request limit; batches above it are refused


class Unreadable(ValueError):
    """A body that cannot be judged: refused, with this message as the reason."""


@dataclass(frozen=True)
class Fetched:
    """A host a Messages body would make Anthropic's servers reach, and where the body names it."""

    where: str  # the JSON path, for the refusal: mcp_servers[0].url
    host: str  # "" when the request names no host at all (web_fetch without allowed_domains)
    port: int


def canonical(target: str) -> str:
    """The path as the most lenient server would route it: without query, fragment and
    parameters, percent-decoded, backslashes as slashes, dot segments resolved, empty segments
    dropped, lower case. Spellings that a strict comparison would miss all land here."""
    bare = re.split(r"[?#]", target, maxsplit=1)[0]
    bare = unquote(unquote(bare)).replace("\\", "/")
    segments: list[str] = []
    for segment in bare.split("/"):
        segment = segment.split(";", 1)[0].strip().lower()
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(segments)


def checked(target: str) -> bool:
    """Whether a body sent to `target` (path and query) is a Messages request to judge: fail
    closed, every path under /v1/messages in any spelling (`/v1/./messages`, `/V1/%6Dessages`)."""
    return canonical(target).startswith(MESSAGES)


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; one that repeats a key is refused: parsers disagree on which one counts."""
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise Unreadable(f"a JSON object in the request body repeats the key {key!r}")
            seen.add(key)
    return found


def targets(path: str, body: bytes) -> list[Fetched]:
    """Every host the body asks Anthropic's servers to reach; raises Unreadable."""
    sources: list[dict[str, Any]] = []  # every {"type": "url", "url": …} object, wherever it is

    def read_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        found = _no_repeats(pairs)
        if found.get("type") == "url" and "url" in found:
            sources.append(found)
        return found

    try:
        document = json.loads(body, object_pairs_hook=read_object)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise Unreadable(f"the request body is not JSON ({e.__class__.__name__})") from None
    if not isinstance(document, dict):
        raise Unreadable("the request body is not a JSON object")
    found = _in_document(path, document)
    named = {id(server) for server in _servers(document)}
    for source in sources:  # an image or document block by URL, anywhere: Anthropic fetches it
        if id(source) not in named:
            url = source["url"]
            if not isinstance(url, str):
                raise Unreadable('a "url" source holds no URL')
            found.append(_from_url('a {"type": "url"} source', url))
    return found


def _servers(document: dict[str, Any]) -> Iterator[Any]:
    """The MCP server entries, at the top and in each batch entry, as objects (to skip them)."""
    for request in [document, *_batch_params(document)]:
        servers = request.get("mcp_servers")
        if isinstance(servers, list):
            yield from servers


def _batch_params(document: dict[str, Any]) -> list[dict[str, Any]]:
    requests = document.get("requests")
    if not isinstance(requests, list):
        return []
    return [
        item["params"]
        for item in requests
        if isinstance(item, dict) and isinstance(item.get("params"), dict)
    ]


def _in_document(path: str, document: dict[str, Any]) -> list[Fetched]:
    if canonical(path).startswith(BATCHES):
        requests = document.get("requests")
        if not isinstance(requests, list):
            return list(_in_request(document, ""))  # no batch to run: Anthropic refuses it
        found = list(_in_request(document, ""))  # not where a batch has them: fail closed
        for i, item in enumerate(requests):
            params = item.get("params") if isinstance(item, dict) else None
            if isinstance(params, dict):
                found += list(_in_request(params, f"requests[{i}].params."))
        return found
    return list(_in_request(document, ""))


def _in_request(request: dict[str, Any], prefix: str) -> Iterator[Fetched]:
    servers = request.get("mcp_servers")
    if servers is not None:
        if not isinstance(servers, list):
            raise Unreadable(f"{prefix}mcp_servers is not an array")
        for i, server in enumerate(servers):
            where = f"{prefix}mcp_servers[{i}].url"
            url = server.get("url") if isinstance(server, dict) else None
            if not isinstance(url, str):
                raise Unreadable(f"{where} is not a URL")
            yield _from_url(where, url)
    tools = request.get("tools")
    if isinstance(tools, list):
        for i, tool in enumerate(tools):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if isinstance(kind, str) and kind.startswith(WEB_FETCH_PREFIX):
                yield from _web_fetch(tool, f"{prefix}tools[{i}]")


def _web_fetch(tool: dict[str, Any], where: str) -> Iterator[Fetched]:
    """web_fetch reaches whatever URL the model writes: only its allowed_domains bound it."""
    domains = tool.get("allowed_domains")
    if not isinstance(domains, list) or not domains:
        yield Fetched(f"{where} (web_fetch without allowed_domains)", "", 443)
        return
    for i, domain in enumerate(domains):
        if not isinstance(domain, str) or not domain:
            raise Unreadable(f"{where}.allowed_domains[{i}] is not a domain")
        host = domain.split("/", 1)[0]  # a domain entry may carry a path prefix
        yield Fetched(f"{where}.allowed_domains[{i}]", host, 443)


# What a URL's authority may hold here: a host name or an address, and a port. No userinfo, no
# backslash, no percent-escape, no space or control character: URL parsers (Python's here, a
# WHATWG one at Anthropic) disagree on where such a host ends.
_AUTHORITY = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def _from_url(where: str, url: str) -> Fetched:
    scheme, sep, rest = url.partition("://")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0] if sep else ""
    if scheme.lower() not in ("https", "http") or not _AUTHORITY.fullmatch(authority):
        raise Unreadable(f"{where} is not an http(s) URL with a plain host (no user, no escapes)")
    if any(c.isspace() or not c.isprintable() or c == "\\" for c in url):
        raise Unreadable(f"{where} holds a space, a backslash or a control character")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise Unreadable(f"{where} is not a URL ({e})") from None
    if not parts.hostname:
        raise Unreadable(f"{where} is not an http(s) URL with a host")
    return Fetched(where, parts.hostname, port or (443 if parts.scheme.lower() == "https" else 80))
