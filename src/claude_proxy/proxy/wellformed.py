"""Is a request safe to forward as it is? Checks for what message conversion would get wrong.

mitmproxy forwards what it parsed: a control character in a header value, an absolute URL in an
HTTP/2 `:path` or a method with a space reaches an HTTP/1.1 upstream byte for byte, where it can
become a second request the proxy never checked. These pure functions name such requests.
"""

from __future__ import annotations

import re

from mitmproxy import http

# RFC 9110 §5.6.2: a token (method, header name).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Methods are case-sensitive (RFC 9110 §9.1) and every registered one is upper case: `get` is
# another method than GET, which a rule for GET must not let through nor an upstream take for GET.
_METHOD = re.compile(rb"[A-Z][A-Z_-]*")
# Headers with which some servers replace the method or the path: they would carry a request the
# method and path rules never saw.
OVERRIDE_HEADERS = (
    "x-http-method-override", "x-http-method", "x-method-override", "x-original-url",
    "x-rewrite-url", "x-original-method",
)  # fmt: skip
# RFC 9110 §5.5: field values are visible characters, spaces, tabs and obs-text; never CR, LF, NUL.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9112 §3.2: origin-form; visible ASCII only (a space would split the request line).
_ORIGIN_FORM = re.compile(rb"/(?!/)[\x21-\x7e]*|/")
# Upgrade tokens the proxy carries: a WebSocket. Anything else would end in an unchecked relay.
ALLOWED_UPGRADE = "websocket"
H2C_HEADERS = ("http2-settings",)
# Meant for the proxy, never for the origin (claude-proxy takes no proxy credentials).
PROXY_HEADERS = ("proxy-authorization", "proxy-connection")
BODY_FOLLOWS = "claude_proxy.body_follows"  # flow metadata: the head said a body follows it
# Methods whose content has no meaning (RFC 9110 §9.3): a server may ignore it and read it as the
# next request. The proxy refuses such a body rather than trust every upstream to skip it.
BODYLESS_METHODS = (b"GET", b"HEAD", b"TRACE")
# What a Connection header may not name: an intermediary that drops it would lose the framing.
ESSENTIAL_HEADERS = frozenset({"host", "content-length", "transfer-encoding"})


def malformed(request: http.Request, body_follows: bool | None = None) -> str | None:
    """Why `request` must not be forwarded, or None when it is well-formed.

    `body_follows`: whether the message goes on after its head (from the HTTP layer; an HTTP/2
    body needs no header). None: judge by the head alone.
    """
    method = request.data.method
    if not _TOKEN.fullmatch(method):
        return "the method is not a token"
    if not _METHOD.fullmatch(method):
        return "the method is not in upper case (methods are case-sensitive)"
    if method == b"PRI":
        return "PRI is the HTTP/2 preface, not a request"
    target = request.data.path  # of an HTTP/1 absolute-form URL, mitmproxy keeps the path here
    if target == b"*":
        if method != b"OPTIONS":
            return "the asterisk-form target is for OPTIONS only"
    elif not _ORIGIN_FORM.fullmatch(target):
        return "the request target is not origin-form (/path)"
    for name, value in request.headers.fields:
        if not _TOKEN.fullmatch(name):
            return "a header name is not a token"
        if _BAD_VALUE.search(value):
            return "a header value has a control character (CR, LF, NUL or DEL)"
    if body_follows is None:
        body_follows = announces_body(request)
    if method in BODYLESS_METHODS and body_follows:
        return f"a {method.decode()} request may not carry a body"
    for connection in request.headers.get_all("connection"):
        named = {token.strip().lower() for token in connection.split(",")}
        if named & ESSENTIAL_HEADERS:
            return "the Connection header names Host or the message framing"
    return None


def overrides(request: http.Request) -> str | None:
    """The first header that asks a server to take another method or path, if any."""
    return next((name for name in OVERRIDE_HEADERS if name in request.headers), None)


def announces_body(request: http.Request) -> bool:
    """Whether the head says a body follows (a content-length above 0, or a transfer coding)."""
    if "transfer-encoding" in request.headers:
        return True
    lengths = request.headers.get_all("content-length")
    return any(length.strip() not in ("", "0") for length in lengths)


def strip_hop_headers(request: http.Request) -> None:
    """Drop what is meant for the proxy, and every upgrade offer but a WebSocket one (the upstream
    may then only answer plainly)."""
    for name in (*H2C_HEADERS, *PROXY_HEADERS):
        request.headers.pop(name, None)
    upgrade = request.headers.get_all("upgrade")
    if upgrade and [u.strip().lower() for u in upgrade] != [ALLOWED_UPGRADE]:
        request.headers.pop("upgrade")


def switches_to_raw(flow: http.HTTPFlow) -> bool:
    """A 101 answer that would turn the connection into something other than a WebSocket."""
    response = flow.response
    if response is None or response.status_code != 101:
        return False
    offered = flow.request.headers.get("upgrade", "").strip().lower()
    agreed = response.headers.get("upgrade", "").strip().lower()
    return not (offered == agreed == ALLOWED_UPGRADE)
