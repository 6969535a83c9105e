"""SOCKS5 with the same enforcement as CONNECT: the target is decided before the reply.

mitmproxy's SOCKS5 layer answers "succeeded" before any hook sees the target. This layer decides
first and answers a refused target with reply 0x02 ("connection not allowed by ruleset"); what
follows an allowed one is checked like a CONNECT tunnel (TLS only, SNI, every request).
Username/password (mitmproxy answers 0xFF: no acceptable method, since no proxyauth is set), BIND
and UDP ASSOCIATE (0x07: command not supported) are refused by mitmproxy's own layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mitmproxy import connection
from mitmproxy.proxy import commands, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.mode_servers import Socks5Instance

from claude_proxy.defaults import SOCKS_PROBE_METHOD
from claude_proxy.policy.rules import Decision
from claude_proxy.record.decisions import Recorder, proves_probe

METHOD = "SOCKS5"  # how these tunnels appear in the decision log
REPLY_NOT_ALLOWED = b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"
REPLY_NO_METHOD = b"\x05\xff"  # RFC 1928: no acceptable methods; the client then closes


OpenTunnel = Callable[[connection.Client, str, int], Decision]  # Enforcer.open_tunnel
OverCap = Callable[[str], bool]  # whether the client cap refused this client id on connect


class CheckedSocks5Proxy(modes.Socks5Proxy):
    refused = False
    probe = False  # `claude-proxy status` proved itself in its private method: a probe

    def __init__(
        self, context: Context, open_tunnel: OpenTunnel, over_cap: OverCap, recorder: Recorder
    ) -> None:
        super().__init__(context)
        self.open_tunnel = open_tunnel
        self.over_cap = over_cap
        self.recorder = recorder

    def state_greet(self) -> layer.CommandGenerator[None]:
        if len(self.buf) >= 2:
            if self.over_cap(self.context.client.id):
                # The client cap counts SOCKS clients too; Limits logged the refusal on accept.
                # In SOCKS5 the only answer before a method is agreed is "no acceptable method".
                yield commands.SendData(self.context.client, REPLY_NO_METHOD)
                yield commands.CloseConnection(self.context.client)
                self._handle_event = self.done  # type: ignore[method-assign]
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
        self.probe = proves_probe(shown)
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
        started = time.time()
        client = self.context.client
        address = self.context.server.address
        if address is None:  # pragma: no cover - the SOCKS layer always sets it first
            reason = "no destination"
            decision = None
        else:
            host, port = address
            decision = self.open_tunnel(client, host, port)
            self.recorder.line(
                METHOD,
                host,
                port,
                "-",
                "-",
                decision,
                started=started,
                client=client,
                probe=self.probe,
            )
            reason = decision.reason
        if decision is not None and decision.allowed:
            return (yield from super().finish_start())
        self.refused = True
        yield commands.SendData(client, REPLY_NOT_ALLOWED)
        yield commands.CloseConnection(client)
        self._handle_event = self.done  # type: ignore[method-assign]
        return reason


def install(open_tunnel: OpenTunnel, over_cap: OverCap, recorder: Recorder) -> None:
    """mitmproxy's SOCKS5 listener builds its first layer itself: make it this one."""

    def make_top_layer(self: Socks5Instance, context: Context) -> layer.Layer:
        return CheckedSocks5Proxy(context, open_tunnel, over_cap, recorder)

    Socks5Instance.make_top_layer = make_top_layer  # type: ignore[method-assign]
