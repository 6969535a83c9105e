"""The server-fetch guard: a Messages request may make Anthropic's servers reach only hosts the
policy allows (`server_fetch` says which hosts a body names).

Such a body must be read whole before anything moves upstream, so these requests are not
streamed: their size must be known (Content-Length) and at most the Messages API's own limit, and
the bytes held this way count against a budget per client connection and in all. A body that
cannot be judged (not JSON, compressed, of unknown length) is refused: when in doubt, refuse.
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import connection, http

from claude_proxy.policy import rules, server_fetch
from claude_proxy.policy.rules import Decision
from claude_proxy.proxy import held_bodies
from claude_proxy.proxy.enforcer import DECISION, Enforcer, body_follows
from claude_proxy.record.decisions import SENT_UP, BodyCount, printable
from claude_proxy.state import accounts

logger = logging.getLogger(__name__)

HELD = "claude_proxy.fetchguard.held"  # flow.metadata: bytes reserved for this body
THREAD_ABOVE = 1024 * 1024  # parse a larger body off the event loop
# bodies held whole for one client connection (one full-size request)
PER_CLIENT = 40 * held_bodies.MIB
TOTAL = 160 * held_bodies.MIB  # for all clients together


class FetchGuard:
    def __init__(self, enforcer: Enforcer) -> None:
        self.enforcer = enforcer
        self.budget = held_bodies.Held(per_client=PER_CLIENT, total=TOTAL, pause=PER_CLIENT + 1)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        allowed = flow.metadata.get(DECISION)
        if allowed is None or flow.response is not None or flow.error is not None:
            return  # refused already, or nothing the Enforcer let through
        _, host, port = allowed
        request = flow.request
        if not accounts.is_anthropic_host(host) or not body_follows(flow):
            return  # any method: an override header may make a PATCH a POST upstream
        path = request.data.path.decode("ascii", "replace")
        if not server_fetch.checked(path):
            return
        if self.enforcer.policy.server_fetch_unchecked(host, port) is not None:
            return  # the user's rule says so: it streams as any request does
        try:
            why = self.hold(flow)
        except Exception:
            logger.exception("refusing a Messages request: holding its body failed")
            why = "internal error while holding the request body"
        if why is not None:
            status = 413 if "larger than" in why else 403
            self.refuse(flow, host, port, why, status)

    def hold(self, flow: http.HTTPFlow) -> str | None:
        """Read the body whole before it moves on; or why it cannot be."""
        request = flow.request
        if request.headers.get("content-encoding", "identity").lower() != "identity":
            return "a compressed Messages request body cannot be checked; send it uncompressed"
        length = request.headers.get("content-length", "")
        if not length.isdigit() or "transfer-encoding" in request.headers:
            return "a Messages request body of unknown length cannot be checked (no Content-Length)"
        size = int(length)
        if size > server_fetch.MAX_BODY:
            return (
                "a Messages request body larger than "
                f"{server_fetch.MAX_BODY // held_bodies.MIB} MiB"
            )
        if too_much := self.budget.add(flow.client_conn.id, size, pausable=False):
            return f"too many Messages request bodies are being checked at once ({too_much})"
        flow.metadata[HELD] = size
        request.stream = False  # mitmproxy reads the whole body, then calls `request`
        return None

    async def request(self, flow: http.HTTPFlow) -> None:
        if HELD not in flow.metadata or flow.response is not None:
            return
        _, host, port = flow.metadata[DECISION]
        body = flow.request.raw_content or b""
        flow.metadata[SENT_UP] = count = BodyCount()
        count.size = len(body)
        try:
            if len(body) > THREAD_ABOVE:
                why = await asyncio.to_thread(self.judge, flow.request.path, body)
            else:
                why = self.judge(flow.request.path, body)
        except Exception:
            logger.exception("refusing a Messages request: the check failed")
            why = "internal error in the server-fetch check"
        if why is not None:
            self.refuse(flow, host, port, why, 403)
            return
        # The body took its time to arrive (up to 32 MiB): the request goes on only if the policy
        # in force now allows it too (on a kept-alive connection, nothing decides it later).
        if self.enforcer.recheck_waiting(flow, "while its body arrived"):
            self.release(flow)

    def judge(self, path: str, body: bytes) -> str | None:
        """Why the body may not go on; None when every host it names is allowed."""
        try:
            targets = server_fetch.targets(path, body)
        except server_fetch.Unreadable as e:
            return f"{e}: a Messages request is checked for hosts Anthropic's servers would reach"
        for target in targets:
            if not target.host:
                return (
                    f"{target.where} would let Anthropic's servers fetch any host; list the "
                    "hosts in allowed_domains"
                )
            decision = self.enforcer.decide(target.host, target.port, rules.HTTPS)
            if not decision.allowed:
                return (
                    f"{target.where} asks Anthropic's servers to reach "
                    f"{target.host}:{target.port}, which the policy does not allow "
                    f"({decision.reason})"
                )
        return None

    def refuse(self, flow: http.HTTPFlow, host: str, port: int, why: str, status: int) -> None:
        self.release(flow)
        self.enforcer.refuse_request(flow, host, port, Decision(False, why), status)
        logger.debug("server-fetch guard: %s", printable(why))

    def release(self, flow: http.HTTPFlow) -> None:
        size = flow.metadata.pop(HELD, None)
        if size is not None:
            self.budget.release(flow.client_conn.id, size)

    def response(self, flow: http.HTTPFlow) -> None:
        self.release(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.release(flow)

    def client_disconnected(self, client: connection.Client) -> None:
        self.budget.disconnected(client.id)
