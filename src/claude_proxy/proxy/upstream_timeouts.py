"""Bounded waits on an upstream: the TCP connect, its TLS handshake, and the response head.

The limits are declared here; `mitm.timed_http.TimedHttpLayer`, which the Enforcer puts in
place, applies them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import ctx, exceptions, http

from claude_proxy.proxy import held_bodies


@dataclass(frozen=True)
class Step:
    option: str
    default: int  # seconds
    doing: str  # "{}" is the upstream's host:port
    error: str  # the RFC 9209 proxy error type
    help: str


CONNECT = Step(
    "sandbox_connect_timeout",
    30,
    "connecting to {}",
    "connection_timeout",
    "Seconds to resolve and connect to an upstream before answering 504. A healthy connect takes "
    "well under a second; 30 s leaves room for DNS retries and several lost SYNs.",
)
TLS = Step(
    "sandbox_tls_timeout",
    30,
    "the TLS handshake with {}",
    "tls_protocol_error",
    "Seconds for the TLS handshake with an upstream, once connected, before answering 504.",
)
RESPONSE = Step(
    "sandbox_response_timeout",
    3600,
    "waiting for the response head from {}",
    "http_response_timeout",
    "Seconds from the end of a request to the head of its response before answering 504. A "
    "non-streaming /v1/messages call sends its head only when the whole message is written: "
    "the anthropic SDK allows such a call up to an hour. Never applies once a response has begun.",
)
STEPS = (CONNECT, TLS, RESPONSE)
# mitmproxy opens at most five connections at once to one destination for one client connection
# (an HTTP/2 client's streams to an HTTP/1 upstream each need their own); a stream waits for a free
# one for at most the connect limit, counted from when it began to wait.
SLOT = Step(
    CONNECT.option,
    CONNECT.default,
    "waiting for a free connection to {} (at most 5 at once for one client connection)",
    "connection_timeout",
    CONNECT.help,
)

# What an HTTP/2 stream costs while it lives, counted with the bodies in the proxy's Held budget:
# its head and its own objects. Measured (1,000 streams waiting): 18.5 KiB each with an empty
# head, 83 KiB with a 60 KB one.
STREAM_OVERHEAD = 20 * 1024
HELD_OPTION = "sandbox_waiting_memory_mib"

REFUSED_ON_WAIT = "refused by the policy in force when its upstream connection came"
CANCELLED_ON_WAIT = "the client cancelled the request while it waited for its connection"
# Decides again a request that waited for its upstream connection, under the policy in force
# now: True when that refuses it (the flow then has its refusal as its response).
Recheck = Callable[[http.HTTPFlow], bool]


class Timeouts:
    """Declares the limits; TimedHttpLayer, which the Enforcer puts in place, applies them.
    `held` is the proxy's budget for what waiting requests hold, sized by HELD_OPTION."""

    def __init__(self, held: held_bodies.Held) -> None:
        self.held = held

    def load(self, loader: object) -> None:
        for step in STEPS:
            loader.add_option(step.option, int, step.default, step.help)  # type: ignore[attr-defined]
        loader.add_option(  # type: ignore[attr-defined]
            HELD_OPTION,
            int,
            held_bodies.TOTAL // held_bodies.MIB,
            "MiB that requests waiting on the upstream may hold in all: bodies queued while "
            "their connection opens, and every open HTTP/2 stream (its head and state). A request "
            "that would go over it is refused (HTTP/2: 503). One client connection holds at most "
            f"{held_bodies.PER_CLIENT // held_bodies.MIB} MiB of it.",
        )

    def configure(self, updated: set[str]) -> None:
        for step in STEPS:
            if step.option in updated and getattr(ctx.options, step.option) < 1:
                raise exceptions.OptionsError(f"{step.option} must be at least 1 (seconds)")
        if HELD_OPTION in updated:
            if (mib := getattr(ctx.options, HELD_OPTION)) < 1:
                raise exceptions.OptionsError(f"{HELD_OPTION} must be at least 1 (MiB)")
            held = self.held
            held.total = mib * held_bodies.MIB
            held.per_client = min(held_bodies.PER_CLIENT, held.total)
            held.pause = min(held_bodies.PAUSE, held.per_client // 2)
