"""Hundreds of clients at once: each connects, sends its first bytes, and keeps its socket until
every one is answered (as clients that read a refusal do not close at once)."""

from __future__ import annotations

import selectors
import socket
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Answer:
    data: bytes  # all the client read, until `complete` or the proxy's close
    seconds: float | None  # from its connect to its answer; None: no answer before the deadline


def burst(port: int, clients: int, first: bytes, complete: bytes, within: float) -> list[Answer]:
    """`clients` clients connect to loopback `port` at once and send `first`; each reads until
    its answer holds `complete` or the proxy closes, for `within` seconds at most in all."""
    selector = selectors.DefaultSelector()
    sockets: list[socket.socket] = []
    started: list[float] = []
    data: dict[int, bytes] = {}
    answered: dict[int, float] = {}
    try:
        for i in range(clients):
            sock = socket.socket()
            sock.setblocking(False)
            started.append(time.perf_counter())
            sock.connect_ex(("127.0.0.1", port))
            sockets.append(sock)
            selector.register(sock, selectors.EVENT_WRITE, i)
        waiting = set(range(clients))
        deadline = time.monotonic() + within
        while waiting and time.monotonic() < deadline:
            for key, events in selector.select(timeout=0.5):
                i, sock = key.data, sockets[key.data]
                if events & selectors.EVENT_WRITE:
                    try:
                        sock.send(first)
                    except OSError:  # refused before it could send: its answer is what it read
                        answered[i] = time.perf_counter()
                        waiting.discard(i)
                        selector.unregister(sock)
                        continue
                    selector.modify(sock, selectors.EVENT_READ, i)
                    continue
                try:
                    chunk = sock.recv(4096)
                except OSError:
                    chunk = b""
                data[i] = data.get(i, b"") + chunk
                if not chunk or complete in data[i]:
                    answered[i] = time.perf_counter()
                    waiting.discard(i)
                    selector.unregister(sock)
    finally:
        selector.close()
        for sock in sockets:
            sock.close()
    return [
        Answer(data.get(i, b""), answered[i] - started[i] if i in answered else None)
        for i in range(clients)
    ]
