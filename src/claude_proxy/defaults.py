"""Where claude-proxy listens unless told otherwise.

The proxy, the CLI and `setup` all need these; they live here so that asking for them does not
import mitmproxy.
"""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"  # what clients are told (`env`); the proxy listens on ::1 too
DEFAULT_PORT = 9051
DEFAULT_SOCKS_PORT = 9052

# How `claude-proxy status` proves its probes are its own (with accounts.probe_proof, which only
# a reader of the state folder can compute), so that the proxy records them as probes:
PROBE_AGENT = "claude-proxy-status"  # the User-Agent on its CONNECT (a name, not a proof)
PROBE_HEADER = "X-Claude-Proxy-Probe"  # on its CONNECT: the proof, in hex
SOCKS_PROBE_METHOD = 0x80  # a private SOCKS5 method (RFC 1928): its sub-negotiation is the proof
REFUSAL_HEADER = "X-Claude-Proxy"  # on every answer the proxy makes itself; status looks for it
