"""`status`'s probes of the proxy: through each listener the whole way, without contacting any
upstream.

A tunnel to an allowed host (CONNECT, and SOCKS5), then a TLS handshake inside it that must verify
against *our* CA. The proxy's lazy connection strategy opens nothing upstream before a request,
and the probe sends none. A probe proves itself (accounts.probe_proof, from a key in the state
folder that the agent cannot read: defaults.PROBE_HEADER, defaults.SOCKS_PROBE_METHOD), so the
proxy records it as a probe and not as traffic; anyone else who claims to be one is logged like
any client. No mitmproxy import here: `status` starts fast.
"""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from claude_proxy import defaults
from claude_proxy.cli.diagnostics import FAIL, INSTALL, OK, Check, listening
from claude_proxy.state import accounts, paths

PROBE_HOST = "api.anthropic.com"  # allowed by the built-in rules, which no flag removes
PROBE_PORT = 443
TIMEOUT = 3.0


@dataclass(frozen=True)
class Proxy:
    """The proxy status checks: the installed agent's ports and config folder, unless told
    otherwise, and whether launchd runs it (which decides the fix)."""

    host: str
    port: int
    socks_port: int
    config_dir: Path
    agent_installed: bool


def start_fix(proxy: Proxy) -> str:
    if proxy.agent_installed:
        return f"launchctl kickstart -k gui/{os.getuid()}/{paths.LABEL}, or {INSTALL}"
    return f"claude-proxy run --port {proxy.port} --socks-port {proxy.socks_port}"


def proof_header() -> str:
    """The header that proves this probe is status's own (none while the proxy has no key)."""
    proof = accounts.probe_proof(paths.state_dir())
    return f"{defaults.PROBE_HEADER}: {proof.hex()}\r\n" if proof else ""


def probe_http(proxy: Proxy, cert: Path | None) -> Check:
    """CONNECT to an allowed host, then TLS inside the tunnel verified against our CA."""
    what = f"proxy on {proxy.host}:{proxy.port}"
    sock = listening(proxy.host, proxy.port, TIMEOUT)
    if isinstance(sock, str):
        return Check(FAIL, what, f"nothing listens ({sock})", start_fix(proxy))
    with sock:
        try:
            sock.sendall(
                f"CONNECT {PROBE_HOST}:{PROBE_PORT} HTTP/1.1\r\nHost: {PROBE_HOST}:{PROBE_PORT}\r\n"
                f"User-Agent: {defaults.PROBE_AGENT}\r\n{proof_header()}\r\n".encode()
            )
            head = read_head(sock)
        except TimeoutError:
            return silent(what, proxy)
        except OSError as e:
            return Check(FAIL, what, f"the connection failed ({e.strerror or e})", other(proxy))
        lines = head.decode("latin-1").split("\r\n")
        if not head:
            return Check(FAIL, what, "it closes the connection without answering", other(proxy))
        if lines[0].split(" ")[1:2] != ["200"]:
            if any(
                line.lower().startswith(defaults.REFUSAL_HEADER.lower() + ":") for line in lines
            ):
                why = f"claude-proxy refuses {PROBE_HOST}: {lines[0][:80]!r}"
                return Check(FAIL, what, why, start_fix(proxy))
            return Check(FAIL, what, f"something else answers: {lines[0][:80]!r}", other(proxy))
        return handshake(sock, what, proxy, cert)


def probe_socks(proxy: Proxy, cert: Path | None) -> Check:
    """The same through the SOCKS5 listener: a tunnel to an allowed host, then verified TLS."""
    what = f"SOCKS5 on {proxy.host}:{proxy.socks_port}"
    name = PROBE_HOST.encode()
    request = b"\x05\x01\x00\x03" + bytes([len(name)]) + name + PROBE_PORT.to_bytes(2, "big")
    sock = listening(proxy.host, proxy.socks_port, TIMEOUT)
    if isinstance(sock, str):
        return Check(FAIL, what, f"nothing listens ({sock})", start_fix(proxy))
    with sock:
        try:
            proof = accounts.probe_proof(paths.state_dir())
            offered = [0, defaults.SOCKS_PROBE_METHOD] if proof else [0]
            sock.sendall(bytes([5, len(offered), *offered]))
            greeting = read_exactly(sock, 2)
            if greeting == bytes([5, defaults.SOCKS_PROBE_METHOD]) and proof:
                sock.sendall(bytes([len(proof)]) + proof)
                greeting = b"\x05\x00" if read_exactly(sock, 2) == b"\x01\x00" else greeting
            if greeting != b"\x05\x00":
                return Check(FAIL, what, f"something else answers: {greeting!r}", other(proxy))
            sock.sendall(request)
            reply = read_exactly(sock, 10)
        except TimeoutError:
            return silent(what, proxy)
        except OSError as e:
            return Check(FAIL, what, f"the connection failed ({e.strerror or e})", other(proxy))
        if reply[:2] == b"\x05\x02":
            why = f"claude-proxy refuses {PROBE_HOST} (not allowed by ruleset)"
            return Check(FAIL, what, why, start_fix(proxy))
        if reply[:2] != b"\x05\x00":
            return Check(FAIL, what, f"something else answers: {reply!r}", other(proxy))
        return handshake(sock, what, proxy, cert)


def handshake(sock: socket.socket, what: str, proxy: Proxy, cert: Path | None) -> Check:
    if cert is None:
        why = "a tunnel opens, but there is no CA to verify it against"
        return Check(FAIL, what, why, "the CA line's fix, then this again")
    context = ssl.create_default_context(cafile=str(cert))  # our CA alone, not the system's
    context.set_alpn_protocols(["http/1.1"])
    try:
        with context.wrap_socket(sock, server_hostname=PROBE_HOST):
            pass  # the handshake is the proof; no request is sent
    except ssl.SSLCertVerificationError as e:
        why = (
            f"it serves {PROBE_HOST} with a certificate that is not from the CA in {cert.parent} "
            f"({e.verify_message}): it runs with another CA"
        )
        return Check(FAIL, what, why, restart_fix(proxy))
    except TimeoutError:
        return Check(FAIL, what, "a tunnel opens, but no TLS handshake within 3 s", other(proxy))
    except (ssl.SSLError, OSError) as e:
        return Check(FAIL, what, f"the TLS handshake failed ({e})", restart_fix(proxy))
    return Check(OK, what, f"TLS to {PROBE_HOST} through it verifies against the CA")


def silent(what: str, proxy: Proxy) -> Check:
    return Check(FAIL, what, f"something listens but does not answer within {TIMEOUT:.0f} s",
                 other(proxy))  # fmt: skip


def other(proxy: Proxy) -> str:
    """What to run when another program holds the port."""
    return (
        f"lsof -nP -iTCP:{proxy.port} -iTCP:{proxy.socks_port} -sTCP:LISTEN (stop it, "
        "or install the agent with other ports)"
    )


def restart_fix(proxy: Proxy) -> str:
    if proxy.agent_installed:
        return f"launchctl kickstart -k gui/{os.getuid()}/{paths.LABEL}, or {INSTALL}"
    return f"restart claude-proxy with the CA in {proxy.config_dir}"


def read_head(sock: socket.socket) -> bytes:
    """An HTTP head (up to the blank line, at most 64 KiB), or what came before the close."""
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65536:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


def read_exactly(sock: socket.socket, size: int) -> bytes:
    """`size` bytes, or fewer if the peer closes first."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data
