"""mitmproxy's client TLS layer, holding back each ClientHello until it has been checked.

mitmproxy 12.3's `ClientTLSLayer` parses the first ClientHello for the SNI and ALPN offers it
passes to the hooks and upstream, then gives OpenSSL every byte that follows, unchecked: after a
HelloRetryRequest, OpenSSL negotiates from a second hello that may name another server or offer
other protocols (a client could then speak h2 to the proxy while the upstream is offered
HTTP/1.1, and framing is lost in the conversion). A client that offers only protocols the TCP
path cannot serve (h3 crashed the connection handler) is handshaken all the same: no hook can
answer it with `no_application_protocol`. And when a handshake fails, its log line blames the
client's trust in the proxy's CA, whatever the cause.

`GuardedClientTLSLayer` holds each hello back until the checks in proxy/tls_guard.py pass: the
first must offer a protocol the TCP path serves; after a HelloRetryRequest the second must repeat
its SNI and ALPN offers. What it holds is bounded (MAX_HELLO: the first hello is bounded before,
by the admission's `next_layer`). A refusal is a TLS alert, one decision line instead of
mitmproxy's, and a close. The Enforcer builds it (`next_layer`) where mitmproxy would build its
own.

Not reported upstream; the issue one would file: "ClientTLSLayer hands OpenSSL a second
ClientHello (after a HelloRetryRequest) unchecked, while the SNI and ALPN it passes on come from
the first". Without it: tests/test_sansio_tls.py (each test's `mitmproxy` case shows mitmproxy's
own layer) and, end to end, tests/test_tls.py (`test_second_hello_must_repeat_sni_and_alpn`,
`test_only_unsupported_alpn_is_refused`).
"""

from __future__ import annotations

from mitmproxy import tls
from mitmproxy.proxy import commands, context, layer, layers
from mitmproxy.proxy.layers.tls import TLSLayer

from claude_proxy.policy.rules import Decision
from claude_proxy.proxy.tls_guard import (
    ILLEGAL_PARAMETER,
    INTERNAL_ERROR,
    MAX_HELLO,
    NO_APPLICATION_PROTOCOL,
    Refusal,
    alert,
    alpn_refusal,
    client_hello,
    handshake_message,
    hello_change,
    is_hello_retry,
)
from claude_proxy.record.decisions import Recorder, printable


class GuardedClientTLSLayer(layers.ClientTLSLayer):
    """mitmproxy's client TLS layer, holding back each ClientHello until it has been checked.

    The first hello must offer a protocol the TCP path serves (or no ALPN at all). What follows
    it waits until OpenSSL has answered it: after a HelloRetryRequest, only a second hello with
    the same SNI and ALPN offers reaches OpenSSL.
    """

    def __init__(self, context: context.Context, recorder: Recorder) -> None:
        super().__init__(context)
        self.recorder = recorder  # writes the refusal
        self.held = bytearray()  # received, not yet given to OpenSSL
        self.first: tls.ClientHello | None = None
        self.checked = False  # nothing left to check: bytes go straight to OpenSSL
        self.answer: bytes | None = None  # OpenSSL's first flight
        self.refusal: str | None = None

    def receive_handshake_data(
        self, data: bytes
    ) -> layer.CommandGenerator[tuple[bool, str | None]]:
        if self.checked:
            return (yield from super().receive_handshake_data(data))
        self.held += data
        if self.first is None:
            try:
                hello = self.take_first_hello()
            except Exception as e:
                return (yield from self.refuse(e))
            if hello is None:
                return False, None
            done, err = yield from super().receive_handshake_data(hello)
            if done or err:
                return done, err
            if not is_hello_retry(self.answer or b""):
                self.checked = True
                return (yield from self.release())
        try:
            complete = self.second_hello_complete()
        except Exception as e:
            return (yield from self.refuse(e))
        if not complete:
            return False, None
        self.checked = True
        return (yield from self.release())

    def take_first_hello(self) -> bytes | None:
        """The first hello's records, once complete and acceptable; the rest stays held."""
        found = self.next_message(skip_ccs=False)
        if found is None:
            return None
        message, end = found
        self.first = client_hello(message)
        if reason := alpn_refusal(self.first, self.context.options.http2):
            raise Refusal(NO_APPLICATION_PROTOCOL, reason)
        hello, self.held = bytes(self.held[:end]), self.held[end:]
        return hello

    def second_hello_complete(self) -> bool:
        """After a HelloRetryRequest: whether a second hello that changes nothing is held."""
        assert self.first is not None
        found = self.next_message(skip_ccs=True)
        if found is None:
            return False
        if reason := hello_change(self.first, client_hello(found[0])):
            raise Refusal(ILLEGAL_PARAMETER, reason)
        return True

    def next_message(self, *, skip_ccs: bool) -> tuple[bytes, int] | None:
        if len(self.held) > MAX_HELLO:
            raise ValueError(f"a ClientHello over {MAX_HELLO // 1024} KiB")
        return handshake_message(bytes(self.held), skip_ccs=skip_ccs)

    def release(self) -> layer.CommandGenerator[tuple[bool, str | None]]:
        held, self.held = bytes(self.held), bytearray()
        if not held:
            return False, None
        return (yield from super().receive_handshake_data(held))

    def tls_interact(self) -> layer.CommandGenerator[None]:
        for command in super().tls_interact():
            if self.answer is None and isinstance(command, commands.SendData):
                self.answer = command.data
            yield command

    def refuse(self, error: Exception) -> layer.CommandGenerator[tuple[bool, str | None]]:
        if isinstance(error, Refusal):
            description, reason = error.description, str(error)
        elif isinstance(error, ValueError):
            description, reason = ILLEGAL_PARAMETER, str(error)
        else:  # fail closed, in one line
            description, reason = INTERNAL_ERROR, f"cannot check the ClientHello: {error!r}"
        self.refusal = printable(reason)
        yield commands.SendData(self.conn, alert(description))
        return False, self.refusal

    def on_handshake_error(self, err: str) -> layer.CommandGenerator[None]:
        if self.refusal is None:
            yield from super().on_handshake_error(err)
            return
        host, port = self.context.server.address or (None, None)
        client = self.context.client
        refused = Decision(False, self.refusal)
        started = client.timestamp_start
        self.recorder.line("-", host, port, "-", None, refused, started=started, client=client)
        # Skip ClientTLSLayer's own message: it would blame the client's trust in our CA.
        yield from TLSLayer.on_handshake_error(self, err)
        self.event_to_child = self.errored  # type: ignore[method-assign]
