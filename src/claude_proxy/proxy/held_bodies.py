"""Request-body bytes held while their stream waits: per client connection and in all.

While a request waits for its upstream connection or for a hook (the organization probe),
mitmproxy keeps reading the client's body and queues it in memory without limit. The HTTP streams
(mitm.timed_http.TimedHttpStream) count what they queue in the proxy's one `Held`, which
`service.build_master` makes and hands to the parts that count or pause.

Once an HTTP/1 client has PAUSE bytes held, its connection is not read until they have moved on
(down to half of that): the rest of an upload waits in the client and the kernel, as TCP intends,
and an upload of any size gets through a slow upstream connect. The limits are what is left where
that cannot act (HTTP/2, whose streams share the connection): a stream that would go over one is
ended.
"""

from __future__ import annotations

from collections.abc import Callable

MIB = 1024 * 1024
# Above the Messages API's 32 MB request limit: a real request never meets it while its (fresh)
# upstream connection opens, however fast the client writes.
PER_CLIENT = 40 * MIB  # held for one client connection (all its HTTP/2 streams together)
TOTAL = 160 * MIB  # held for all clients together
PAUSE = 4 * MIB  # held for one client connection, above which it is not read

FlowControl = Callable[[str, bool], None]  # (client connection id, stop reading?)


class Held:
    def __init__(
        self, per_client: int = PER_CLIENT, total: int = TOTAL, pause: int = PAUSE
    ) -> None:
        self.per_client = per_client
        self.total = total
        self.pause = pause
        self.bytes = 0
        self.clients: dict[str, int] = {}  # client connection id → bytes held for it
        self.paused: set[str] = set()  # client connections not read for now
        self.flow_control: FlowControl | None = None  # set by the addon that reaches the sockets
        # (client connection id, stop reading?) for the upstream connections serving a client
        self.upstream_control: FlowControl | None = None

    def add(self, client: str, size: int, pausable: bool = True) -> str | None:
        """Count `size` more bytes held for `client`; or, counting nothing, why that is too much.

        Past the pause size, a `pausable` client (an HTTP/1 connection) is not read for now.
        """
        mine = self.clients.get(client, 0) + size
        if mine > self.per_client:
            return f"more than {self.per_client // MIB} MiB held"
        if self.bytes + size > self.total:
            return f"more than {self.total // MIB} MiB held for all clients"
        self.clients[client] = mine
        self.bytes += size
        if pausable and mine >= self.pause and self.flow_control is not None:
            # Again on every piece while paused: asyncio's stream reader resumes reading on its
            # own when its buffer drains, which may undo a pause made while it was full.
            self.paused.add(client)
            self.flow_control(client, True)
        return None

    def release(self, client: str, size: int) -> None:
        mine = self.clients.get(client, 0)
        size = min(size, mine)  # already released with its client connection
        self.bytes -= size
        if mine - size > 0:
            self.clients[client] = mine - size
        else:
            self.clients.pop(client, None)
        if client in self.paused and mine - size <= self.pause // 2:
            self.paused.discard(client)
            if self.flow_control is not None:
                self.flow_control(client, False)

    def disconnected(self, client: str) -> None:
        self.bytes -= self.clients.pop(client, 0)
        self.paused.discard(client)
