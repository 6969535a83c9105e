"""The client's TLS handshake: only protocols the TCP path serves, and one story told twice.

The ALPN protocol agreed with the client is chosen from the first ClientHello, among those
mitmproxy serves over TCP (h3 crashed it), and the upstream is offered exactly that protocol; a
second hello (after a HelloRetryRequest) that changes the SNI or the ALPN offers ends the
handshake, as does a hello that grows past MAX_HELLO. These are the checks and the ClientHello
parsing they need; mitm/client_tls.py (the client TLS layer) and mitm/tls_config.py (the TLS
settings addon) apply them inside mitmproxy.
"""

from __future__ import annotations

from collections.abc import Sequence

from mitmproxy import tls

from claude_proxy.record.decisions import printable

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
