"""A minimal raw TLS 1.3 client: just enough to provoke a HelloRetryRequest and send a second hello.

It never decrypts anything: whether the server answers a ClientHello with a ServerHello, an alert
or a close is visible in the cleartext record layer.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

HRR_RANDOM = bytes.fromhex("CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C")
X25519 = 0x001D
CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE = 20, 21, 22
SERVER_HELLO = 2
EXT_SERVER_NAME, EXT_GROUPS, EXT_SIGALGS, EXT_ALPN = 0, 10, 13, 16
EXT_VERSIONS, EXT_COOKIE, EXT_KEY_SHARE = 43, 44, 51


def vector(data: bytes, length_bytes: int) -> bytes:
    return len(data).to_bytes(length_bytes, "big") + data


def extension(kind: int, body: bytes) -> bytes:
    return struct.pack("!H", kind) + vector(body, 2)


@dataclass
class Hello:
    """What may differ between the two ClientHellos of one handshake."""

    sni: str | None
    alpn: Sequence[bytes] | None  # None: no ALPN extension at all
    key_share: bytes | None = None  # an x25519 public key, or None for an empty key_share
    cookie: bytes | None = None  # echoed from the HelloRetryRequest
    extra: Sequence[tuple[int, bytes]] = ()  # more extensions (type, body), e.g. ECH


def client_hello(hello: Hello, random: bytes, session_id: bytes) -> bytes:
    """One TLS 1.3 ClientHello in one handshake record."""
    extensions = b""
    if hello.sni is not None:
        name = b"\x00" + vector(hello.sni.encode("idna"), 2)
        extensions += extension(EXT_SERVER_NAME, vector(name, 2))
    extensions += extension(EXT_GROUPS, vector(struct.pack("!H", X25519), 2))
    sigalgs = struct.pack("!8H", 0x0403, 0x0804, 0x0805, 0x0806, 0x0401, 0x0501, 0x0601, 0x0807)
    extensions += extension(EXT_SIGALGS, vector(sigalgs, 2))
    if hello.alpn is not None:
        extensions += extension(EXT_ALPN, vector(b"".join(vector(p, 1) for p in hello.alpn), 2))
    extensions += extension(EXT_VERSIONS, vector(struct.pack("!H", 0x0304), 1))
    if hello.cookie is not None:
        extensions += extension(EXT_COOKIE, vector(hello.cookie, 2))
    for kind, body in hello.extra:
        extensions += extension(kind, body)
    shares = (
        b"" if hello.key_share is None else struct.pack("!H", X25519) + vector(hello.key_share, 2)
    )
    extensions += extension(EXT_KEY_SHARE, vector(shares, 2))
    suites = struct.pack("!3H", 0x1301, 0x1302, 0x1303)
    body = (
        b"\x03\x03"
        + random
        + vector(session_id, 1)
        + vector(suites, 2)
        + b"\x01\x00"
        + vector(extensions, 2)
    )
    message = b"\x01" + vector(body, 3)
    return b"\x16\x03\x01" + vector(message, 2)


def x25519_public_key() -> bytes:
    key = X25519PrivateKey.generate().public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass
class Answer:
    """The server's first meaningful answer to a ClientHello."""

    kind: str  # "hello-retry", "server-hello", "alert", "closed"
    alert: int | None = None  # the alert's description, for kind "alert"
    cookie: bytes | None = None  # a HelloRetryRequest's cookie extension


def read_exactly(sock: socket.socket, n: int) -> bytes | None:
    """n bytes, or None if the peer closes (or resets) first; a timeout propagates."""
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


def wait_closed(sock: socket.socket) -> bytes:
    """Whatever arrives until the peer closes; a timeout propagates."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def read_answer(sock: socket.socket) -> Answer:
    """Skip ChangeCipherSpec records; report the first handshake record, alert or close."""
    while True:
        header = read_exactly(sock, 5)
        if header is None:
            return Answer("closed")
        kind, length = header[0], struct.unpack("!H", header[3:5])[0]
        body = read_exactly(sock, length)
        if body is None:
            return Answer("closed")
        if kind == CHANGE_CIPHER_SPEC:
            continue
        if kind == ALERT:
            return Answer("alert", alert=body[1])
        if kind == HANDSHAKE and body[0] == SERVER_HELLO:
            random = body[6:38]
            if random == HRR_RANDOM:
                return Answer("hello-retry", cookie=hrr_cookie(body))
            return Answer("server-hello")
        raise AssertionError(f"unexpected record {header.hex()} {body[:16].hex()}")


def hrr_cookie(server_hello: bytes) -> bytes | None:
    """The cookie extension of a HelloRetryRequest (whole message, header included), if any."""
    offset = 4 + 2 + 32
    offset += 1 + server_hello[offset]  # legacy_session_id_echo
    offset += 2 + 1  # cipher_suite, legacy_compression_method
    end = offset + 2 + struct.unpack("!H", server_hello[offset : offset + 2])[0]
    offset += 2
    while offset < end:
        kind, length = struct.unpack("!HH", server_hello[offset : offset + 4])
        if kind == EXT_COOKIE:
            return server_hello[offset + 6 : offset + 4 + length]
        offset += 4 + length
    return None


def handshake(sock: socket.socket, hello: Hello) -> Answer:
    """Send one ClientHello with a real key share; return the server's answer."""
    hello = replace(hello, key_share=hello.key_share or x25519_public_key())
    sock.sendall(client_hello(hello, os.urandom(32), os.urandom(32)))
    return read_answer(sock)


def retry_handshake(
    sock: socket.socket, first: Hello, second: Hello, *, pipelined: bool = False
) -> Answer:
    """Send `first` with an empty key_share, expect a HelloRetryRequest, then send `second`.

    `pipelined` sends both hellos at once, without waiting for the HelloRetryRequest (and so
    without its cookie). Returns the server's answer to the second hello.
    """
    random, session_id = os.urandom(32), os.urandom(32)
    opening = client_hello(first, random, session_id)
    second = replace(second, key_share=second.key_share or x25519_public_key())
    if pipelined:
        sock.sendall(opening + client_hello(second, random, session_id))
    else:
        sock.sendall(opening)
    retry = read_answer(sock)
    assert retry.kind == "hello-retry", retry
    if not pipelined:
        second = replace(second, cookie=retry.cookie)
        sock.sendall(client_hello(second, random, session_id))
    return read_answer(sock)
