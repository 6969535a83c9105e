"""Every answer the proxy makes itself, built in one place (`proxy_answer`).

Each carries `X-Claude-Proxy` (refused, upstream-error, timeout), an RFC 9209 `Proxy-Status` that
names the error type, `Cache-Control: no-store`, and a plain body that says whose decision it was.
The refusals of the policy are in proxy/enforcer.py (`refusal`), the upstream failures in
proxy/upstream_failures.py (`answer`); both are built here.
"""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.net.http import http1

from claude_proxy.defaults import REFUSAL_HEADER
from claude_proxy.policy.rules import Decision
from claude_proxy.proxy.upstream_timeouts import Step
from claude_proxy.record.decisions import printable

PROXY_STATUS_ERRORS = {503: "connection_limit_reached"}  # else http_request_error (RFC 9209)


def proxy_answer(
    status: int,
    method: str,
    body: str,
    *,
    kind: str,
    error: str,
    details: str,
    headers: dict[str, str] | None = None,
) -> http.Response:
    """An answer the proxy makes itself: `X-Claude-Proxy: kind` and an RFC 9209 Proxy-Status."""
    fields = {
        REFUSAL_HEADER: kind,
        "Proxy-Status": f'claude-proxy; error={error}; details="{status_details(details)}"',
        "Content-Type": "text/plain; charset=utf-8",
        "Cache-Control": "no-store",
        **(headers or {}),
    }
    return http.Response.make(status, b"" if method == "HEAD" else body.encode(), fields)


def status_details(text: str) -> str:
    """`text` as the inside of an RFC 8941 string: printable ASCII, no quote or backslash."""
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)


def limit(status: int, reason: str) -> http.Response:
    """A limit of the proxy's (a head too large, too slow, too many clients): refused, closing."""
    body = (
        f"claude-proxy refused this request: {printable(reason)}.\n"
        "This is a limit of the sandbox's proxy, not a network fault.\n"
    )
    error = PROXY_STATUS_ERRORS.get(status, "http_request_error")
    return proxy_answer(
        status, "", body, kind="refused", error=error, details=reason,
        headers={"Connection": "close"},
    )  # fmt: skip


def limit_bytes(status: int, reason: str) -> bytes:
    """`limit`, as bytes to write on a socket."""
    assembled: bytes = http1.assemble_response(limit(status, reason))
    return assembled


def timeout(method: str, step: Step, reason: str) -> http.Response:
    """An upstream that did not answer within `step`'s limit: 504."""
    body = (
        f"claude-proxy: {reason}.\n"
        "The upstream did not answer in time: a network or upstream fault, not the sandbox's "
        "policy.\n"
        f"The limit is the proxy option {step.option} "
        f"(claude-proxy run --set {step.option}=SECONDS).\n"
    )
    return proxy_answer(504, method, body, kind="timeout", error=step.error, details=reason)


def refusal(
    method: str,
    host: str,
    port: int,
    decision: Decision,
    status: int = 403,
    *,
    source: str,
    advice: str | None = None,
) -> http.Response:
    """The policy refused a request (403), or a request it cannot check: whose rule, and how to
    ask which rule decides (or, from a later check, `advice` of its own)."""
    where = printable(f"{host}:{port}")
    reason = decision.reason
    decided = f"Decided by the rule at {printable(decision.origin)}.\n" if decision.origin else ""
    body = (
        f"claude-proxy refused {where}: {printable(reason)}.\n"
        "This is the sandbox's policy, not a network fault: do not retry another way.\n"
        f"{decided}"
        f"{advice or default_advice(source)}\n"
    )
    error = "http_request_denied" if status == 403 else "http_request_error"
    return proxy_answer(status, method, body, kind="refused", error=error, details=reason)


def default_advice(source: str) -> str:
    return (
        f"The policy is {printable(source)}; "
        "`claude-proxy check HOST[:PORT] [METHOD PATH]` shows which rule decides."
    )
