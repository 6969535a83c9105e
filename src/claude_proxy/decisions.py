"""One log line per decision. Never headers, bodies, query strings or anything else secret."""

from __future__ import annotations

import logging
import time

from mitmproxy import http

from claude_proxy.defaults import PROBE_AGENT
from claude_proxy.policy import Decision

logger = logging.getLogger("claude_proxy.decisions")

MAX_FIELD = 200
FAILURE = "claude_proxy.failure"  # flow.metadata: why an allowed request got no upstream answer


def printable(text: str) -> str:
    """`text` safe for one log line: control characters escaped, length capped."""
    if text.isprintable() and len(text) <= MAX_FIELD:
        return text
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= MAX_FIELD else escaped[: MAX_FIELD - 1] + "…"


def log_decision(
    flow: http.HTTPFlow, decision: Decision, *, host: str, port: int, status: int | None
) -> None:
    request = flow.request
    path = "-" if request.method == "CONNECT" else request.path.split("?", 1)[0] or "/"
    probe = request.method == "CONNECT" and request.headers.get("user-agent") == PROBE_AGENT
    log_line(
        request.method,
        host,
        port,
        path,
        status,
        decision,
        started=request.timestamp_start,
        failure=flow.metadata.get(FAILURE),
        probe=probe,
    )


def log_line(
    method: str,
    host: str,
    port: int,
    path: str,
    status: int | str | None,
    decision: Decision,
    *,
    started: float,
    failure: str | None = None,
    probe: bool = False,
) -> None:
    """One decision: `method` is the HTTP method, or how a tunnel was asked for (SOCKS5).

    A tunnel `claude-proxy status` opens (`probe`) is no one's traffic: when allowed, it is
    logged at DEBUG and marked. Its requests, if any were sent, would each be logged as usual;
    a refused probe is a decision like any other.
    """
    why = f"rule={decision.rule}" if decision.allowed else f'"{printable(decision.reason)}"'
    if failure:
        why += f' "{printable(failure)}"'
    quiet = probe and decision.allowed
    logger.log(
        logging.DEBUG if quiet else logging.INFO,
        "%s%s %s %s:%d %s %s %s %.0fms",
        "probe: " if quiet else "",
        "ALLOW" if decision.allowed else "BLOCK",
        printable(method),
        printable(host),
        port,
        printable(path),
        "-" if status is None else status,
        why,
        (time.time() - started) * 1000,
    )
