"""mitmproxy's failure messages, each as the line, RFC 9209 error type and status users get.

The messages are mitmproxy's own (12.3: proxy/server.py, proxy/tunnel.py, proxy/layers/tls.py,
proxy/layers/http/_http1.py and _http2.py) and asyncio's; errnos come from this platform's
`errno`, so the table holds on macOS too. test_upstream_failures.py makes the real ones happen.
"""

from __future__ import annotations

import errno
import os

import pytest
from mitmproxy.proxy.layers.http import ErrorCode, RequestProtocolError, ResponseProtocolError
from mitmproxy.test import tflow

from claude_proxy.policy.addresses import NOT_RESOLVED
from claude_proxy.proxy import upstream_failures

HOST, PORT = "api.anthropic.com", 443
WHERE = f"{HOST}:{PORT}"


def connect_error(code: int, address: str = "('203.0.113.10', 443)") -> str:
    return f"[Errno {code}] Connect call failed {address}"


@pytest.mark.parametrize(
    ("message", "error", "what", "status"),
    [
        (
            f"{NOT_RESOLVED}{HOST} (Name or service not known)",
            "dns_error",
            f"the name {HOST} could not be resolved (Name or service not known)",
            502,
        ),
        (
            connect_error(errno.ECONNREFUSED),
            "connection_refused",
            f"connecting to {WHERE} failed: {os.strerror(errno.ECONNREFUSED)}",
            502,
        ),
        (
            connect_error(errno.ETIMEDOUT),
            "connection_timeout",
            f"connecting to {WHERE} failed: {os.strerror(errno.ETIMEDOUT)}",
            504,
        ),
        (
            connect_error(errno.EHOSTUNREACH),
            "destination_unavailable",
            f"connecting to {WHERE} failed: {os.strerror(errno.EHOSTUNREACH)}",
            502,
        ),
        (
            connect_error(errno.ENETUNREACH),
            "destination_unavailable",
            f"connecting to {WHERE} failed: {os.strerror(errno.ENETUNREACH)}",
            502,
        ),
        (
            connect_error(errno.ECONNRESET),
            "connection_terminated",
            f"connecting to {WHERE} failed: {os.strerror(errno.ECONNRESET)}",
            502,
        ),
        (  # asyncio tried two addresses, each failed its own way
            "Multiple exceptions: "
            f"{connect_error(errno.ENETUNREACH, '(2001:db8::1, 443, 0, 0)')}, "
            f"{connect_error(errno.ECONNREFUSED)}",
            "destination_unavailable",
            f"connecting to {WHERE} failed: {os.strerror(errno.ENETUNREACH)}; "
            f"{os.strerror(errno.ECONNREFUSED)}",
            502,
        ),
        (
            "Certificate verify failed: certificate has expired",
            "tls_certificate_error",
            f"the TLS certificate of {WHERE} was not accepted: certificate has expired",
            502,
        ),
        (
            "Certificate verify failed: unable to get local issuer certificate",
            "tls_certificate_error",
            f"the TLS certificate of {WHERE} was not accepted: unable to get local issuer "
            "certificate",
            502,
        ),
        (
            "The remote server does not speak TLS.",
            "tls_protocol_error",
            f"the TLS handshake with {WHERE} failed: the upstream does not speak TLS",
            502,
        ),
        (
            "The remote server and mitmproxy cannot agree on a TLS version to use. You may need "
            "to adjust mitmproxy's tls_version_server_min option.",
            "tls_protocol_error",
            f"the TLS handshake with {WHERE} failed: no TLS version in common (1.2 or later)",
            502,
        ),
        (
            "OpenSSL Error([('SSL routines', '', 'sslv3 alert handshake failure')])",
            "tls_alert_received",
            f"the TLS handshake with {WHERE} failed: sslv3 alert handshake failure",
            502,
        ),
        (
            "tlsv1 alert unknown ca",
            "tls_alert_received",
            f"the TLS handshake with {WHERE} failed: tlsv1 alert unknown ca",
            502,
        ),
        (
            "OpenSSL Error([('SSL routines', '', 'unexpected eof while reading')])",
            "tls_protocol_error",
            f"the TLS handshake with {WHERE} failed: unexpected eof while reading",
            502,
        ),
        (
            "connection closed",
            "connection_terminated",
            f"{WHERE} closed the connection during the TLS handshake",
            502,
        ),
        (
            "server closed connection",
            "connection_terminated",
            f"{WHERE} closed the connection before sending a response",
            502,
        ),
        (
            "stream reset by client (REFUSED_STREAM)",  # the HTTP/2 upstream, in mitmproxy's words
            "connection_terminated",
            f"{WHERE} reset the stream before sending a response",
            502,
        ),
        (
            "Cannot parse HTTP response: Bad HTTP response line: b'HTTP/1.1 two hundred'",
            "http_protocol_error",
            f"{WHERE} answered with a malformed response head",
            502,
        ),
        (
            "Cannot open connection, no hostname given.",
            "destination_unavailable",
            f"the exchange with {WHERE} failed: Cannot open connection, no hostname given.",
            502,
        ),
    ],
)
def test_upstream_failures(message: str, error: str, what: str, status: int) -> None:
    failure = upstream_failures.upstream_failure(message, HOST, PORT)
    assert failure == upstream_failures.Failure(what, error, status)


@pytest.mark.parametrize(
    ("message", "error", "reason"),
    [
        (
            "claude-proxy: x.example resolves to 10.0.0.1 (private); only a rule naming that "
            "IP literal allows it",
            "destination_ip_prohibited",
            "x.example resolves to 10.0.0.1 (private); only a rule naming that IP literal "
            "allows it",
        ),
        (  # the backstop, as mitmproxy reports a server_connect hook's refusal
            "Connection killed: claude-proxy: not the CONNECT destination",
            "http_request_denied",
            "not the CONNECT destination",
        ),
    ],
)
def test_refusals_on_the_way_upstream_stay_refusals(message: str, error: str, reason: str) -> None:
    failure = upstream_failures.upstream_failure(message, HOST, PORT)
    assert failure == upstream_failures.Failure(reason, error, 502, refused=True)
    answer = upstream_failures.answer("GET", HOST, PORT, failure)
    assert answer.headers["X-Claude-Proxy"] == "refused"
    assert answer.text.startswith(f"claude-proxy refused {WHERE}: {reason}.\n")


@pytest.mark.parametrize(
    ("event", "responded", "what"),
    [
        (
            RequestProtocolError(1, "Client disconnected.", ErrorCode.CLIENT_DISCONNECTED),
            False,
            "the client left before the response began",
        ),
        (
            RequestProtocolError(
                1,
                "HTTP/1 protocol error: peer closed connection without sending complete message "
                "body (received 10 bytes, expected 100000)",
                ErrorCode.GENERIC_CLIENT_ERROR,
            ),
            False,
            "the client left before the response began",
        ),
        (
            RequestProtocolError(1, "Client disconnected.", ErrorCode.CLIENT_DISCONNECTED),
            True,
            "the client left before the response ended",
        ),
        (
            RequestProtocolError(1, "stream reset by client (CANCEL)", ErrorCode.CANCEL),
            True,
            "the client reset the stream before the response ended (CANCEL)",
        ),
        (  # mitmproxy cancels the upstream connect of a client that left
            ResponseProtocolError(1, "client disconnected", ErrorCode.CONNECT_FAILED),
            False,
            "the client left before the response began",
        ),
        (
            ResponseProtocolError(
                1,
                "HTTP/1 protocol error: peer closed connection without sending complete message "
                "body (received 10 bytes, expected 100000)",
                ErrorCode.GENERIC_SERVER_ERROR,
            ),
            True,
            f"{WHERE} closed the connection before the response ended",
        ),
    ],
)
def test_which_side_ended_an_exchange(
    event: RequestProtocolError | ResponseProtocolError, responded: bool, what: str
) -> None:
    flow = tflow.tflow(resp=responded)
    flow.request.host, flow.request.port = HOST, PORT
    failure = upstream_failures.of_event(event, flow)
    assert failure.what == what
    assert bool(failure.error) is (what.startswith(WHERE))  # only the upstream's side is answered


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_the_answer(method: str) -> None:
    failure = upstream_failures.upstream_failure(connect_error(errno.ECONNREFUSED), HOST, PORT)
    answer = upstream_failures.answer(method, HOST, PORT, failure)
    assert answer.status_code == 502
    assert answer.headers["X-Claude-Proxy"] == "upstream-error"
    assert answer.headers["Proxy-Status"] == (
        f'claude-proxy; error=connection_refused; details="{failure.what}"'
    )
    assert answer.headers["Content-Type"] == "text/plain; charset=utf-8"
    if method == "HEAD":
        assert answer.raw_content == b""
    else:
        assert answer.text.startswith(f"claude-proxy: {failure.what}.\n")
        assert "The policy allowed this request" in answer.text
