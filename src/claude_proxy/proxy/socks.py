"""SOCKS5 with the same enforcement as CONNECT: the target is decided before the reply.

A refused target is answered with reply 0x02 ("connection not allowed by ruleset"); what follows
an allowed one is checked like a CONNECT tunnel (TLS only, SNI, every request). Username/password
(mitmproxy answers 0xFF: no acceptable method, since no proxyauth is set), BIND and UDP ASSOCIATE
(0x07: command not supported) are refused by mitmproxy's own layer. This is what the SOCKS5 layer
asks (mitm/socks5.py is the layer): the Enforcer's decision, logged as a SOCKS5 tunnel; the
client cap; the status probe's proof.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import connection

from claude_proxy.policy.rules import Decision
from claude_proxy.record.decisions import Recorder, proves_probe

METHOD = "SOCKS5"  # how these tunnels appear in the decision log


@dataclass(frozen=True)
class SocksPolicy:
    decide: Callable[[connection.Client, str, int], Decision]  # the Enforcer's open_tunnel
    refused_by_cap: Callable[[str], bool]  # whether the client cap refused this client id
    recorder: Recorder  # writes the tunnel's decision

    def over_cap(self, client_id: str) -> bool:
        return self.refused_by_cap(client_id)

    def proves_probe(self, proof: bytes) -> bool:
        return proves_probe(proof)

    def open_tunnel(
        self, client: connection.Client, host: str, port: int, *, probe: bool
    ) -> Decision:
        started = time.time()
        decision = self.decide(client, host, port)
        self.recorder.line(
            METHOD, host, port, "-", "-", decision, started=started, client=client, probe=probe
        )
        return decision
