"""Ports for tests: free now and not handed out before in this session."""

from __future__ import annotations

import socket

HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this session: two calls in a row could
    otherwise return the same port (the kernel may reuse one as soon as its socket closes)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in HANDED_OUT:
            HANDED_OUT.add(port)
            return port
