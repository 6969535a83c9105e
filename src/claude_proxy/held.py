"""Request-body bytes held while their stream waits: per client connection and in all.

While a request waits for its upstream connection or for a hook (the organization probe),
mitmproxy keeps reading the client's body and queues it in memory without limit. The HTTP streams
(timeouts.TimedHttpStream) count what they queue here; a stream that would go over a limit is ended.
"""

from __future__ import annotations

MIB = 1024 * 1024
# Above the Messages API's 32 MB request limit: a real request never meets it while its (fresh)
# upstream connection opens, however fast the client writes.
PER_CLIENT = 40 * MIB  # held for one client connection (all its HTTP/2 streams together)
TOTAL = 160 * MIB  # held for all clients together


class Held:
    def __init__(self, per_client: int = PER_CLIENT, total: int = TOTAL) -> None:
        self.per_client = per_client
        self.total = total
        self.bytes = 0
        self.clients: dict[str, int] = {}  # client connection id → bytes held for it

    def add(self, client: str, size: int) -> str | None:
        """Count `size` more bytes held for `client`; or, counting nothing, why that is too much."""
        mine = self.clients.get(client, 0) + size
        if mine > self.per_client:
            return f"more than {self.per_client // MIB} MiB held"
        if self.bytes + size > self.total:
            return f"more than {self.total // MIB} MiB held for all clients"
        self.clients[client] = mine
        self.bytes += size
        return None

    def release(self, client: str, size: int) -> None:
        mine = self.clients.get(client, 0)
        size = min(size, mine)  # already released with its client connection
        self.bytes -= size
        if mine - size > 0:
            self.clients[client] = mine - size
        else:
            self.clients.pop(client, None)

    def disconnected(self, client: str) -> None:
        self.bytes -= self.clients.pop(client, 0)


HELD = Held()  # one per proxy process
