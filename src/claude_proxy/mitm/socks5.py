"""mitmproxy's SOCKS5 layer, holding its reply until the target has been decided.

mitmproxy 12.3's `Socks5Proxy` answers a CONNECT with "succeeded" (05 00) as soon as it has parsed
the target, before any addon hook sees it (with `connection_strategy=lazy`, which the Enforcer
needs): a client then believes a refused destination is reachable, and the only refusal left is
closing the tunnel after the fact. It also takes every client that offers "no authentication",
with no way for an addon to answer the greeting of a client the cap refused, or to offer a method
of its own. `CheckedSocks5Proxy` asks its `Socks5Policy` first and answers a refused target with
reply 0x02 ("connection not allowed by ruleset") and a close; answers a client over the cap
"no acceptable method" (05 FF); and speaks a private method whose sub-negotiation carries
`claude-proxy status`'s proof. `install` makes it the SOCKS5 listener's top layer, which
mitmproxy builds in `Socks5Instance.make_top_layer` (no hook chooses it).

Not reported upstream; the issue one would file: "SOCKS5 mode replies 'succeeded' before any hook
sees the destination: add a hook (like http_connect) that can refuse it with a SOCKS5 reply code".
Without it: tests/test_sansio_socks.py (each test's `mitmproxy` case shows mitmproxy's own
answer) and, end to end, tests/test_socks.py::test_refused_target_gets_not_allowed.
"""

from __future__ import annotations

from typing import Protocol

from mitmproxy import connection
from mitmproxy.proxy import commands, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.mode_servers import Socks5Instance

from claude_proxy.defaults import SOCKS_PROBE_METHOD
from claude_proxy.policy.rules import Decision

REPLY_NOT_ALLOWED = b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"
REPLY_NO_METHOD = b"\x05\xff"  # RFC 1928: no acceptable methods; the client then closes


class Socks5Policy(Protocol):
    """What the SOCKS5 layer asks before it answers (proxy/socks.py is the proxy's)."""

    def over_cap(self, client_id: str) -> bool:
        """Whether the client cap refused this client when it connected."""
        ...

    def proves_probe(self, proof: bytes) -> bool:
        """Whether `proof` is `claude-proxy status`'s."""
        ...

    def open_tunnel(
        self, client: connection.Client, host: str, port: int, *, probe: bool
    ) -> Decision:
        """Decide (and record) a tunnel to host:port."""
        ...


class CheckedSocks5Proxy(modes.Socks5Proxy):
    refused = False
    probe = False  # `claude-proxy status` proved itself in its private method: a probe

    def __init__(self, context: Context, policy: Socks5Policy) -> None:
        super().__init__(context)
        self.policy = policy

    def state_greet(self) -> layer.CommandGenerator[None]:
        if len(self.buf) >= 2:
            if self.policy.over_cap(self.context.client.id):
                # The client cap counts SOCKS clients too; Limits logged the refusal on accept.
                # In SOCKS5 the only answer before a method is agreed is "no acceptable method".
                yield commands.SendData(self.context.client, REPLY_NO_METHOD)
                yield commands.CloseConnection(self.context.client)
                self._handle_event = self.done
                return
            methods = self.buf[2 : 2 + self.buf[1]]
            if self.buf[0] == 5 and len(methods) == self.buf[1] and SOCKS_PROBE_METHOD in methods:
                # `claude-proxy status`, or one that claims to be: it must show the proof.
                yield commands.SendData(self.context.client, bytes([5, SOCKS_PROBE_METHOD]))
                self.buf = self.buf[2 + len(methods) :]
                self.state = self.state_probe  # type: ignore[method-assign]
                yield from self.state()
                return
        yield from super().state_greet()

    def state_probe(self) -> layer.CommandGenerator[None]:
        """The private method's sub-negotiation: one length byte, then the proof; answered like
        RFC 1929's (01 00 accepted, 01 01 refused and closed)."""
        if not self.buf or len(self.buf) < 1 + self.buf[0]:
            return
        shown = bytes(self.buf[1 : 1 + self.buf[0]])
        self.buf = self.buf[1 + len(shown) :]
        self.probe = self.policy.proves_probe(shown)
        if not self.probe:
            yield commands.SendData(self.context.client, b"\x01\x01")
            yield from self.socks_err("the status probe's proof was wrong")
            return
        yield commands.SendData(self.context.client, b"\x01\x00")
        self.state = self.state_connect  # type: ignore[method-assign]
        yield from self.state()

    state = state_greet

    def state_connect(self) -> layer.CommandGenerator[None]:
        """mitmproxy's, less its 0x04 reply to a target this layer refused (it answered 0x02)."""
        steps = super().state_connect()
        answer: object = None
        while True:
            try:
                command = steps.send(answer)
            except StopIteration:
                return
            if (
                self.refused
                and isinstance(command, commands.SendData)
                and command.data != REPLY_NOT_ALLOWED
            ):
                answer = None
                continue
            answer = yield command

    def finish_start(self) -> layer.CommandGenerator[str | None]:
        client = self.context.client
        address = self.context.server.address
        if address is None:  # pragma: no cover - the SOCKS layer always sets it first
            reason = "no destination"
        else:
            host, port = address
            decision = self.policy.open_tunnel(client, host, port, probe=self.probe)
            if decision.allowed:
                return (yield from super().finish_start())
            reason = decision.reason
        self.refused = True
        yield commands.SendData(client, REPLY_NOT_ALLOWED)
        yield commands.CloseConnection(client)
        self._handle_event = self.done
        return reason


def install(policy: Socks5Policy) -> None:
    """mitmproxy's SOCKS5 listener builds its first layer itself: make it this one."""

    def make_top_layer(self: Socks5Instance, context: Context) -> layer.Layer:
        return CheckedSocks5Proxy(context, policy)

    Socks5Instance.make_top_layer = make_top_layer  # type: ignore[method-assign]
