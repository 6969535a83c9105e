"""The client's TLS handshake: only protocols the TCP path serves, and one story told twice.

mitmproxy takes the SNI and the ALPN offers it passes upstream from the first ClientHello, while
OpenSSL negotiates with the client from the second one after a HelloRetryRequest. A second hello
that changes either would let a client speak h2 to us while the upstream is offered HTTP/1.1
(framing lost in conversion), so it ends the handshake. The ALPN protocol agreed with the client
is chosen here, from the first hello, among those mitmproxy serves over TCP (h3 crashed it), and
the upstream is offered exactly that protocol.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mitmproxy import ctx, tls
from mitmproxy.addons import tlsconfig
from mitmproxy.proxy import commands, context, layer, layers
from mitmproxy.proxy.layers.tls import TLSLayer

from claude_proxy.policy.rules import Decision
from claude_proxy.record.decisions import Recorder, printable

logger = logging.getLogger(__name__)

HTTP2 = b"h2"
HTTP1 = (b"http/1.1", b"http/1.0")  # curl --http1.0 offers only http/1.0
SERVER_NAME, ALPN = 0, 16  # extension types
CHANGE_CIPHER_SPEC, HANDSHAKE = 20, 22  # record types
CLIENT_HELLO = 1
HELLO_RETRY_RANDOM = bytes.fromhex(
    "CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C"
)
ILLEGAL_PARAMETER, NO_APPLICATION_PROTOCOL, INTERNAL_ERROR = 47, 120, 80  # alerts
MAX_HELLO = 64 * 1024  # bytes a ClientHello may take; real ones are a few KiB
NO_ALPN = b""  # OpenSSL refuses empty protocol names, so it matches no offer


def supported_alpns(http2: bool) -> tuple[bytes, ...]:
    return (HTTP2, *HTTP1) if http2 else HTTP1


def choose_alpn(offers: Sequence[bytes], http2: bool) -> bytes | None:
    """The client's most preferred protocol that mitmproxy serves over TCP, if any."""
    supported = supported_alpns(http2)
    return next((offer for offer in offers if offer in supported), None)


def alpn_refusal(hello: tls.ClientHello, http2: bool) -> str | None:
    """Why a first ClientHello's ALPN offers cannot be served, or None if they can."""
    if not any(kind == ALPN for kind, _ in hello.extensions):
        return None  # no ALPN: HTTP/1.1, as mitmproxy does
    offers = hello.alpn_protocols
    if choose_alpn(offers, http2) is not None:
        return None
    shown = printable(", ".join(offer.decode("latin-1") for offer in offers))
    return f"the client offers no protocol the proxy serves over TCP (ALPN: {shown or 'empty'})"


def hello_change(first: tls.ClientHello, second: tls.ClientHello) -> str | None:
    """What the second ClientHello (after a HelloRetryRequest) changes that it must not."""
    for kind, name in ((SERVER_NAME, "server name (SNI)"), (ALPN, "ALPN offers")):
        if extension(first, kind) != extension(second, kind):
            return f"the second ClientHello changes the {name}"
    return None


def extension(hello: tls.ClientHello, kind: int) -> list[bytes]:
    return [body for k, body in hello.extensions if k == kind]


def handshake_message(data: bytes, *, skip_ccs: bool) -> tuple[bytes, int] | None:
    """The first handshake message in `data` and the end of its last record, or None if cut short.

    Raises ValueError for any other record, or for a message that shares its last record with
    something else (clients never do that with a ClientHello).
    """
    message, offset = b"", 0
    while len(data) >= offset + 5:
        kind, length = data[offset], int.from_bytes(data[offset + 3 : offset + 5])
        if data[offset + 1] != 3 or length == 0:
            raise ValueError("not a TLS record")
        if len(data) < offset + 5 + length:
            return None
        body, offset = data[offset + 5 : offset + 5 + length], offset + 5 + length
        if kind == CHANGE_CIPHER_SPEC and skip_ccs and not message:
            continue  # TLS 1.3 clients may send one before the second hello
        if kind != HANDSHAKE:
            raise ValueError(f"a record of type {kind} where a ClientHello belongs")
        message += body
        if len(message) >= 4:
            size = 4 + int.from_bytes(message[1:4])
            if len(message) > size:
                raise ValueError("a ClientHello shares its record with another message")
            if len(message) == size:
                return message, offset
    return None


def client_hello(message: bytes) -> tls.ClientHello:
    if message[0] != CLIENT_HELLO:
        raise ValueError("not a ClientHello")
    try:
        return tls.ClientHello(message[4:])
    except Exception as e:  # the parser raises more than ValueError on malformed input
        raise ValueError(f"malformed ClientHello: {type(e).__name__}") from e


def is_hello_retry(data: bytes) -> bool:
    """Whether the server's first flight starts with a HelloRetryRequest."""
    return data[:1] == b"\x16" and data[5:6] == b"\x02" and data[11:43] == HELLO_RETRY_RANDOM


def alert(description: int) -> bytes:
    return b"\x15\x03\x03\x00\x02\x02" + bytes([description])


class Refusal(Exception):
    def __init__(self, description: int, reason: str) -> None:
        super().__init__(reason)
        self.description = description


class GuardedClientTLSLayer(layers.ClientTLSLayer):
    """mitmproxy's client TLS layer, holding back each ClientHello until it has been checked.

    The first hello must offer a protocol the TCP path serves (or no ALPN at all). What follows
    it waits until OpenSSL has answered it: after a HelloRetryRequest, only a second hello with
    the same SNI and ALPN offers reaches OpenSSL.
    """

    def __init__(self, context: context.Context, recorder: Recorder) -> None:
        super().__init__(context)
        self.recorder = recorder
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


class GuardedTlsConfig(tlsconfig.TlsConfig):
    """mitmproxy's TlsConfig, with the ALPN protocol chosen from the first hello only."""

    def tls_start_client(self, tls_start: tls.TlsData) -> None:
        super().tls_start_client(tls_start)
        try:
            if tls_start.ssl_conn is not None:
                pin_client_alpn(tls_start)
        except Exception as e:
            logger.error("no TLS with the client: choosing its protocol failed: %r", e)
            tls_start.ssl_conn = None  # mitmproxy then closes the connection

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        super().tls_start_server(tls_start)
        try:
            if tls_start.ssl_conn is not None:
                offer_upstream(tls_start)
        except Exception as e:
            logger.error("no TLS with the upstream: choosing its protocols failed: %r", e)
            tls_start.ssl_conn = None


def pin_client_alpn(tls_start: tls.TlsData) -> None:
    """OpenSSL agrees to exactly the protocol chosen from the first hello, or to none."""
    assert tls_start.ssl_conn is not None
    app_data: tlsconfig.AppData = tls_start.ssl_conn.get_app_data()
    forced = app_data["client_alpn"]  # mitmproxy forces http/1.1 in some modes
    offers = tls_start.conn.alpn_offers if forced is None else [forced]
    app_data["client_alpn"] = choose_alpn(offers, ctx.options.http2) or NO_ALPN


def offer_upstream(tls_start: tls.TlsData) -> None:
    """The upstream is offered the protocol agreed with the client: it may agree or not, never
    pick another one."""
    assert tls_start.ssl_conn is not None
    client = tls_start.context.client
    if client.tls_established:
        offers = [client.alpn] if client.alpn else []
    else:
        offers = [o for o in client.alpn_offers if o in supported_alpns(ctx.options.http2)]
    if offers:
        tls_start.ssl_conn.set_alpn_protos(offers)
    elif tls_start.conn.alpn_offers:  # pyOpenSSL cannot unset what TlsConfig offered
        raise ValueError("the upstream would be offered protocols the client did not agree to")
    tls_start.conn.alpn_offers = offers
