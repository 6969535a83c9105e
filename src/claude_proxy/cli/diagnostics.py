"""The checks of this machine behind `status` and `setup`'s "what remains": one result type,
one check per question, and the two ways they are shown.

A `Check` passes, fails (and then names its fix), or cannot tell here (the keychain, off macOS).
`status` shows every check as `ok` or `FAIL` with the fix on a line of its own (and as JSON);
setup shows what is left as `ok`, `TODO` (the problem, then its fix) or `?`.

The proxy probes go the whole way without contacting any upstream: a tunnel to an allowed host
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
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from claude_proxy import defaults
from claude_proxy.state import accounts, ca, paths

# A check's state: it passes, it fails, or it cannot be told here.
OK, FAIL, CANNOT_TELL = True, False, None
PROBE_HOST = "api.anthropic.com"  # allowed by the built-in rules, which no flag removes
PROBE_PORT = 443
TIMEOUT = 3.0  # for status's probes
SETUP_TIMEOUT = 2.0  # for setup's "something answers"
INSTALL = "scripts/install-agent.sh (in the claude-proxy checkout)"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
SANDBOX_TOOLS = (("bwrap", "bubblewrap"), ("socat", "socat"))  # what Claude Code's sandbox runs


@dataclass(frozen=True)
class Check:
    ok: bool | None  # OK, FAIL or CANNOT_TELL
    what: str
    detail: str
    fix: str = ""  # for a failing check: what fixes it (a command where there is one)


@dataclass(frozen=True)
class Proxy:
    """The proxy status checks: the installed agent's ports and config folder, unless told
    otherwise, and whether launchd runs it (which decides the fix)."""

    host: str
    port: int
    socks_port: int
    config_dir: Path
    agent_installed: bool


# How they are shown


def status_lines(checks: Iterable[Check]) -> list[str]:
    """`status`: each row ok or FAIL, and under a failure its fix."""
    lines = []
    for check in checks:
        lines.append(f"{'ok' if check.ok else 'FAIL':<5}{check.what}: {check.detail}")
        if not check.ok and check.fix:
            lines.append(f"     fix: {check.fix}")
    return lines


def status_rows(checks: Iterable[Check]) -> list[dict[str, object]]:
    """`status --json`: the rows."""
    return [{"ok": c.ok, "what": c.what, "detail": c.detail, "fix": c.fix} for c in checks]


def remaining_lines(target: str, checks: Iterable[Check]) -> list[str]:
    """setup's "what remains yours to do": ok, TODO (the problem, then its fix) or ? (cannot
    tell). The fix follows a colon, or a semicolon where the problem has a colon of its own."""
    labels = {OK: "ok", FAIL: "TODO", CANNOT_TELL: "?"}
    lines = []
    for check in checks:
        fix = ""
        if check.ok is FAIL and check.fix:
            fix = f"{'; ' if ': ' in check.detail else ': '}{check.fix}"
        lines.append(f"{labels[check.ok]:<5}{check.what}: {check.detail}{fix}")
    if target == "claude-code":
        lines.append(
            "Then start `claude` as usual: `/sandbox` shows the sandbox on, and a command that "
            "reaches for a refused host gets claude-proxy's 403."
        )
    else:
        lines.append("Then run commands as `srt COMMAND`: their traffic goes through claude-proxy.")
    return lines


# What setup cannot do for the user, checked where it can be


def remaining(target: str, *, home: Path, http_port: int, socks_port: int) -> list[Check]:
    """After `setup TARGET`: the listeners, the environment (claude-code), the CA and the
    keychain, the tools' bundle, the sandbox's programs (Linux)."""
    confdir = paths.config_dir()
    cert, bundle = ca.cert_path(confdir), ca.bundle_path(confdir)
    found = [
        answers(port, f"{kind} port", SETUP_TIMEOUT)
        for port, kind in ((http_port, "HTTP"), (socks_port, "SOCKS"))
    ]
    if target == "claude-code":
        found.append(environment(http_port, cert))
    if not cert.exists():
        found.append(Check(FAIL, "CA", f"no CA in {cert.parent} yet", "run `claude-proxy ca`"))
    elif sys.platform != "darwin":
        found.append(Check(CANNOT_TELL, "keychain", "cannot check here (not macOS)"))
    else:
        found.append(keychain(home, cert))
    found.append(tools(bundle))
    if sandbox := sandbox_programs():
        found.append(sandbox)
    return found


def answers(port: int, what: str, timeout: float) -> Check:
    """Whether something listens on the port (nothing more is asked of it)."""
    where = f"{defaults.DEFAULT_HOST}:{port}"
    sock = listening(defaults.DEFAULT_HOST, port, timeout)
    if isinstance(sock, str):
        fix = "start claude-proxy (scripts/install-agent.sh on macOS) with these ports"
        return Check(FAIL, what, f"nothing answers on {where} ({sock})", fix)
    sock.close()
    return Check(OK, what, f"something answers on {where}")


def environment(http_port: int, cert: Path) -> Check:
    """Claude Code's own traffic (outside the sandbox) follows HTTPS_PROXY and trusts our CA."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or ""
    try:
        parts = urlsplit(proxy)
        points_here = parts.hostname in LOOPBACK_NAMES and parts.port == http_port
    except ValueError:
        points_here = False
    trusts = os.environ.get("NODE_EXTRA_CA_CERTS") == str(cert)
    if points_here and trusts:
        return Check(OK, "env", f"HTTPS_PROXY is {proxy}, NODE_EXTRA_CA_CERTS is the CA")
    port_flag = "" if http_port == defaults.DEFAULT_PORT else f" --port {http_port}"
    wrong = [] if points_here else [f"HTTPS_PROXY is {proxy or 'not set'}"]
    wrong += [] if trusts else [f"NODE_EXTRA_CA_CERTS is not {cert}"]
    return Check(
        FAIL,
        "env",
        f"in this shell {' and '.join(wrong)}",
        f'add `eval "$(claude-proxy env{port_flag})"` to your shell profile '
        f"(fish: `claude-proxy env --shell fish{port_flag} | source`)",
    )


def tools(bundle: Path) -> Check:
    """Commands inside the sandbox reach allowed hosts only if they trust our CA."""
    profile = "add the lines `claude-proxy env --tools` prints to your shell profile"
    if not bundle.exists():
        why = "commands in the sandbox need a CA bundle"
        return Check(FAIL, "tools", why, f"run `claude-proxy ca --bundle`, then {profile}")
    if os.environ.get("SSL_CERT_FILE") != str(bundle):
        return Check(FAIL, "tools", f"SSL_CERT_FILE is not {bundle} in this shell", profile)
    return Check(OK, "tools", f"SSL_CERT_FILE is the bundle {bundle}")


def sandbox_programs() -> Check | None:
    """Linux: the sandbox (Claude Code's and srt's) runs bubblewrap and socat; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    missing = [(tool, package) for tool, package in SANDBOX_TOOLS if shutil.which(tool) is None]
    if not missing:
        return Check(OK, "sandbox", "bwrap and socat are installed")
    names = " and ".join(tool for tool, _ in missing)
    packages = " ".join(package for _, package in missing)
    return Check(
        FAIL,
        "sandbox",
        f"{names} not found: the sandbox cannot start, and with failIfUnavailable Claude Code "
        "refuses to run commands",
        f"install the package {packages} (apt-get install {packages}, dnf install {packages})",
    )


# Shared by both


def listening(host: str, port: int, timeout: float) -> socket.socket | str:
    """A connection to host:port, or why there is none (nothing listens)."""
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        return str(e.strerror or e)


def keychain(home: Path, cert: Path) -> Check:
    """The keychain's own trust decision for SSL (a "Never Trust" entry fails), not an entry;
    from local certificates only (-L). macOS's `security`: the callers ask it there only."""
    fix = (
        "security add-trusted-cert -r trustRoot -p ssl -p basic -k "
        f"{shlex.quote(str(paths.login_keychain(home)))} {shlex.quote(str(cert))}"
    )
    if not cert.exists():
        return Check(FAIL, "keychain", f"no certificate at {cert} to check", INSTALL)
    try:
        result = subprocess.run(
            ["security", "verify-cert", "-c", str(cert), "-p", "ssl", "-L"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check(FAIL, "keychain", f"cannot ask it (security verify-cert: {e})", fix)
    if result.returncode == 0:
        return Check(OK, "keychain", "trusts the CA for SSL")
    said = (result.stdout + result.stderr).strip().splitlines()
    why = said[-1] if said else f"exit {result.returncode}"
    return Check(FAIL, "keychain", f"does not trust the CA for SSL ({why})", fix)


# status: the proxy's two ports, the whole way


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
