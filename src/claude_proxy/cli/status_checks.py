"""The checks behind `claude-proxy status` that talk to something: the proxy's ports, the keychain.

The proxy checks go the whole way without contacting any upstream: a tunnel to an allowed host
(CONNECT, and SOCKS5), then a TLS handshake inside it that must verify against *our* CA. The
proxy's lazy connection strategy opens nothing upstream before a request, and the probe sends
none. A probe proves itself (accounts.probe_proof, from a key in the state folder that the agent
cannot read: defaults.PROBE_HEADER, defaults.SOCKS_PROBE_METHOD), so the proxy records it as a
probe and not as traffic; anyone else who claims to be one is logged like any client. No mitmproxy
import here: `status` starts fast.
"""

from __future__ import annotations

import os
import shlex
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from claude_proxy import defaults
from claude_proxy.state import accounts, paths

PROBE_HOST = "api.anthropic.com"  # allowed by the built-in rules, which no flag removes
PROBE_PORT = 443
TIMEOUT = 3.0
INSTALL = "scripts/install-agent.sh (in the claude-proxy checkout)"


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str
    detail: str
    fix: str = ""  # for a failing check: the command that fixes it


@dataclass(frozen=True)
class Target:
    """What to check: the installed agent's ports and config folder, unless told otherwise."""

    host: str
    port: int
    socks_port: int
    config_dir: Path
    agent_installed: bool


def start_fix(target: Target) -> str:
    if target.agent_installed:
        return f"launchctl kickstart -k gui/{os.getuid()}/{paths.LABEL}, or {INSTALL}"
    return f"claude-proxy run --port {target.port} --socks-port {target.socks_port}"


def proof_header() -> str:
    """The header that proves this probe is status's own (none while the proxy has no key)."""
    proof = accounts.probe_proof(paths.state_dir())
    return f"{defaults.PROBE_HEADER}: {proof.hex()}\r\n" if proof else ""


def probe_http(target: Target, cert: Path | None) -> Check:
    """CONNECT to an allowed host, then TLS inside the tunnel verified against our CA."""
    where = f"{target.host}:{target.port}"
    what = f"proxy on {where}"
    try:
        sock = socket.create_connection((target.host, target.port), timeout=TIMEOUT)
    except OSError as e:
        return Check(False, what, f"nothing listens ({e.strerror or e})", start_fix(target))
    with sock:
        try:
            sock.sendall(
                f"CONNECT {PROBE_HOST}:{PROBE_PORT} HTTP/1.1\r\nHost: {PROBE_HOST}:{PROBE_PORT}\r\n"
                f"User-Agent: {defaults.PROBE_AGENT}\r\n{proof_header()}\r\n".encode()
            )
            head = read_head(sock)
        except TimeoutError:
            return silent(what, target)
        except OSError as e:
            return Check(False, what, f"the connection failed ({e.strerror or e})", other(target))
        lines = head.decode("latin-1").split("\r\n")
        if not head:
            return Check(False, what, "it closes the connection without answering", other(target))
        if lines[0].split(" ")[1:2] != ["200"]:
            if any(
                line.lower().startswith(defaults.REFUSAL_HEADER.lower() + ":") for line in lines
            ):
                why = f"claude-proxy refuses {PROBE_HOST}: {lines[0][:80]!r}"
                return Check(False, what, why, start_fix(target))
            return Check(False, what, f"something else answers: {lines[0][:80]!r}", other(target))
        return handshake(sock, what, target, cert)


def probe_socks(target: Target, cert: Path | None) -> Check:
    """The same through the SOCKS5 listener: a tunnel to an allowed host, then verified TLS."""
    where = f"{target.host}:{target.socks_port}"
    what = f"SOCKS5 on {where}"
    name = PROBE_HOST.encode()
    request = b"\x05\x01\x00\x03" + bytes([len(name)]) + name + PROBE_PORT.to_bytes(2, "big")
    try:
        sock = socket.create_connection((target.host, target.socks_port), timeout=TIMEOUT)
    except OSError as e:
        return Check(False, what, f"nothing listens ({e.strerror or e})", start_fix(target))
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
                return Check(False, what, f"something else answers: {greeting!r}", other(target))
            sock.sendall(request)
            reply = read_exactly(sock, 10)
        except TimeoutError:
            return silent(what, target)
        except OSError as e:
            return Check(False, what, f"the connection failed ({e.strerror or e})", other(target))
        if reply[:2] == b"\x05\x02":
            why = f"claude-proxy refuses {PROBE_HOST} (not allowed by ruleset)"
            return Check(False, what, why, start_fix(target))
        if reply[:2] != b"\x05\x00":
            return Check(False, what, f"something else answers: {reply!r}", other(target))
        return handshake(sock, what, target, cert)


def handshake(sock: socket.socket, what: str, target: Target, cert: Path | None) -> Check:
    if cert is None:
        why = "a tunnel opens, but there is no CA to verify it against"
        return Check(False, what, why, "the CA line's fix, then this again")
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
        return Check(False, what, why, restart_fix(target))
    except TimeoutError:
        return Check(False, what, "a tunnel opens, but no TLS handshake within 3 s", other(target))
    except (ssl.SSLError, OSError) as e:
        return Check(False, what, f"the TLS handshake failed ({e})", restart_fix(target))
    return Check(True, what, f"TLS to {PROBE_HOST} through it verifies against the CA")


def silent(what: str, target: Target) -> Check:
    return Check(False, what, f"something listens but does not answer within {TIMEOUT:.0f} s",
                 other(target))  # fmt: skip


def other(target: Target) -> str:
    """What to run when another program holds the port."""
    return (
        f"lsof -nP -iTCP:{target.port} -iTCP:{target.socks_port} -sTCP:LISTEN (stop it, "
        "or install the agent with other ports)"
    )


def restart_fix(target: Target) -> str:
    if target.agent_installed:
        return f"launchctl kickstart -k gui/{os.getuid()}/{paths.LABEL}, or {INSTALL}"
    return f"restart claude-proxy with the CA in {target.config_dir}"


def read_head(sock: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65536:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def keychain(home: Path, cert: Path) -> Check:
    """The keychain's own trust decision for SSL (a "Never Trust" entry fails), not an entry."""
    fix = (
        "security add-trusted-cert -r trustRoot -p ssl -p basic -k "
        f"{shlex.quote(str(paths.login_keychain(home)))} {shlex.quote(str(cert))}"
    )
    if not cert.exists():
        return Check(False, "keychain", f"no certificate at {cert} to check", INSTALL)
    try:
        result = subprocess.run(
            ["security", "verify-cert", "-c", str(cert), "-p", "ssl", "-L"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check(False, "keychain", f"cannot ask it (security verify-cert: {e})", fix)
    if result.returncode == 0:
        return Check(True, "keychain", "trusts the CA for SSL")
    said = (result.stdout + result.stderr).strip().splitlines()
    why = said[-1] if said else f"exit {result.returncode}"
    return Check(False, "keychain", f"does not trust the CA for SSL ({why})", fix)
