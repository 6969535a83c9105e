"""Why an allowed request got no answer from its upstream, or why its exchange broke off.

mitmproxy keeps only a message for every failure (DNS, connect, TLS, a closed connection) and
answers one before a response head with its own HTML 502, or over HTTP/2 a stream reset. Here
each message becomes what the user reads: one line that says what failed, the RFC 9209 error
type for `Proxy-Status`, and the proxy's own plain-text 502 (504 for a timeout) that says the
policy allowed the request. Refusals made on the way upstream (a forbidden address, the backstop)
stay refusals. The decision line and the audit row record the same line as the reason.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import Any

from mitmproxy import http
from mitmproxy.net.http.validate import validate_headers
from mitmproxy.proxy.layers.http import RequestProtocolError, ResponseProtocolError

from claude_proxy.policy.addresses import NOT_RESOLVED
from claude_proxy.proxy.answers import proxy_answer
from claude_proxy.record.decisions import printable

REFUSED = "claude-proxy: "  # starts a refusal made on the way upstream (addon, addresses, held)
KILLED = "Connection killed: "  # mitmproxy's prefix when a server_connect hook refused
CLIENT_LEFT = "client disconnected"  # mitmproxy cancels an upstream connect with it
UPSTREAM_ERROR = "upstream-error"  # X-Claude-Proxy on an answer for an upstream that failed

# errno of a failed connect → RFC 9209 error type (others: destination_unavailable)
CONNECT_ERRORS = {
    errno.ECONNREFUSED: "connection_refused",
    errno.ETIMEDOUT: "connection_timeout",
    errno.ECONNRESET: "connection_terminated",
    errno.ECONNABORTED: "connection_terminated",
    errno.EPIPE: "connection_terminated",
}
TIMEOUTS = {"connection_timeout", "dns_timeout"}  # answered 504, as the proxy's own limits are
ERRNO = re.compile(r"\[Errno (-?\d+)\]")
OPENSSL_REASON = re.compile(r"'([^']*)'\)\]\)$")  # the last reason in `OpenSSL Error([(…)])`
HINTS = {
    "dns_error": "Check this machine's network and DNS settings.",
    "tls_certificate_error": (
        "The proxy checks upstream certificates against the system's trust roots; a network "
        "that intercepts TLS needs its CA given to the proxy "
        "(claude-proxy run --set ssl_verify_upstream_trusted_ca=CA.pem)."
    ),
    "tls_protocol_error": "Something on the network may be answering in the upstream's place.",
    "tls_alert_received": "Something on the network may be answering in the upstream's place.",
}


@dataclass(frozen=True)
class Failure:
    what: str  # one line: what failed (the answer's first line, Proxy-Status, the log's reason)
    error: str  # RFC 9209 proxy error type; empty on the client's side (nothing to answer)
    status: int = 502
    refused: bool = False  # refused by the proxy on the way upstream: a decision, not a fault


def refusal(message: str) -> str | None:
    """The reason of a refusal made on the way upstream, or None when `message` is not one."""
    message = message.removeprefix(KILLED)
    return message.removeprefix(REFUSED) if message.startswith(REFUSED) else None


def upstream_failure(message: str, host: str, port: int, responded: bool = False) -> Failure:
    """What mitmproxy's `message` for a failure on the upstream's side means; `responded`: the
    response head had come."""
    where = printable(f"{host}:{port}")
    if (reason := refusal(message)) is not None:
        # Only the address check's refusal names a resolved address.
        error = "destination_ip_prohibited" if " resolves to " in reason else "http_request_denied"
        return Failure(printable(reason), error, refused=True)
    if message.startswith(NOT_RESOLVED):
        name, _, why = message.removeprefix(NOT_RESOLVED).partition(" (")
        why = printable(why.removesuffix(")"))
        return Failure(f"the name {printable(name)} could not be resolved ({why})", "dns_error")
    if message.startswith("Certificate verify failed: "):
        why = message.removeprefix("Certificate verify failed: ")
        return Failure(
            f"the TLS certificate of {where} was not accepted: {printable(why)}",
            "tls_certificate_error",
        )
    if message == "The remote server does not speak TLS.":
        return Failure(
            f"the TLS handshake with {where} failed: the upstream does not speak TLS",
            "tls_protocol_error",
        )
    if message.startswith("The remote server and mitmproxy cannot agree on a TLS version"):
        return Failure(
            f"the TLS handshake with {where} failed: no TLS version in common (1.2 or later)",
            "tls_protocol_error",
        )
    if message.startswith("OpenSSL ") or " alert " in message:
        found = OPENSSL_REASON.search(message)
        why = printable(found[1] if found else message)
        if "alert" in why:
            return Failure(f"the TLS handshake with {where} failed: {why}", "tls_alert_received")
        return Failure(f"the TLS handshake with {where} failed: {why}", "tls_protocol_error")
    if message == "connection closed":  # mitmproxy's word for a close during a TLS handshake
        return Failure(
            f"{where} closed the connection during the TLS handshake", "connection_terminated"
        )
    when = "before the response ended" if responded else "before sending a response"
    if message == "server closed connection" or "peer closed connection" in message:
        return Failure(f"{where} closed the connection {when}", "connection_terminated")
    if message.startswith(("stream reset by client", "HTTP/2 connection closed")):
        # mitmproxy's HTTP/2 client says "client" for its peer, the upstream
        how = "reset the stream" if message.startswith("stream") else "ended the HTTP/2 connection"
        return Failure(f"{where} {how} {when}", "connection_terminated")
    if message.startswith(("Cannot parse HTTP response", "unexpected server response")):
        return malformed_response(host, port)
    if codes := [int(n) for n in ERRNO.findall(message)]:
        return _connect_failure(where, codes)
    return Failure(
        f"the exchange with {where} failed: {printable(message)}", "destination_unavailable"
    )


def malformed_response(host: str, port: int, problem: str | None = None) -> Failure:
    why = f" ({printable(problem)})" if problem else ""
    where = printable(f"{host}:{port}")
    return Failure(f"{where} answered with a malformed response head{why}", "http_protocol_error")


def invalid_head(flow: http.HTTPFlow, options: Any) -> str | None:
    """What is wrong with the upstream's response head, where mitmproxy's check (the option
    validate_inbound_headers, always on here) would refuse it; None when it is well-formed."""
    if flow.response is None or not getattr(options, "validate_inbound_headers", True):
        return None
    try:
        validate_headers(flow.response)
    except ValueError as e:
        return str(e)
    return None


def _connect_failure(where: str, codes: list[int]) -> Failure:
    """A connect that failed with these errnos (one per address tried)."""
    errors = {CONNECT_ERRORS.get(code, "destination_unavailable") for code in codes}
    error = errors.pop() if len(errors) == 1 else "destination_unavailable"
    reasons = "; ".join(dict.fromkeys(os.strerror(code) for code in codes))
    return Failure(
        f"connecting to {where} failed: {reasons}",
        error,
        status=504 if error in TIMEOUTS else 502,
    )


def of_event(event: RequestProtocolError | ResponseProtocolError, flow: http.HTTPFlow) -> Failure:
    """What a stream's protocol error means. On the client's side there is no one to answer:
    its `error` is empty."""
    responded = flow.response is not None
    if isinstance(event, ResponseProtocolError) and event.message != CLIENT_LEFT:
        return upstream_failure(event.message, flow.request.host, flow.request.port, responded)
    return Failure(client_failure(event.message, responded), "")


def client_failure(message: str, responded: bool) -> str:
    """Why an exchange ended on the client's side: it left, or reset its stream."""
    when = "before the response ended" if responded else "before the response began"
    if message.startswith("stream reset by client"):  # HTTP/2: "… (CANCEL)"
        return f"the client reset the stream {when} {printable(message.rpartition(' ')[2])}"
    if message in ("Client disconnected.", CLIENT_LEFT) or "closed connection" in message:
        return f"the client left {when}"
    return f"the client's side failed {when}: {printable(message)}"


def answer(method: str, host: str, port: int, failure: Failure) -> http.Response:
    """The proxy's own answer for an allowed request that got no response head."""
    if failure.refused:
        body = (
            f"claude-proxy refused {printable(f'{host}:{port}')}: {failure.what}.\n"
            "This is the sandbox's policy, not a network fault: do not retry another way.\n"
        )
        kind = "refused"
    else:
        hint = HINTS.get(failure.error, "Check this machine's network, or try again later.")
        body = (
            f"claude-proxy: {failure.what}.\n"
            "The policy allowed this request, but the upstream could not be reached or did not "
            f"answer properly: a network or upstream fault, not the sandbox's policy. {hint}\n"
        )
        kind = UPSTREAM_ERROR
    return proxy_answer(
        failure.status, method, body, kind=kind, error=failure.error, details=failure.what
    )
