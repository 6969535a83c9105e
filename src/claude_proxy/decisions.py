"""One log line per decision. Never headers, bodies, query strings or anything else secret."""

from __future__ import annotations

import logging
import time

from mitmproxy import http

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
    log_line(
        request.method,
        host,
        port,
        path,
        status,
        decision,
        started=request.timestamp_start,
        failure=flow.metadata.get(FAILURE),
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
) -> None:
    """One decision: `method` is the HTTP method, or how a tunnel was asked for (SOCKS5)."""
    why = f"rule={decision.rule}" if decision.allowed else f'"{printable(decision.reason)}"'
    if failure:
        why += f' "{printable(failure)}"'
    logger.info(
        "%s %s %s:%d %s %s %s %.0fms",
        "ALLOW" if decision.allowed else "BLOCK",
        printable(method),
        printable(host),
        port,
        printable(path),
        "-" if status is None else status,
        why,
        (time.time() - started) * 1000,
    )
