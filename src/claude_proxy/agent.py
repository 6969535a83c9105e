"""The launchd agent: rendering its plist, and checking that everything is in order (`status`)."""

from __future__ import annotations

import plistlib
import re
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from claude_proxy import ca, config, paths, runstate
from claude_proxy.addon import REFUSAL_HEADER
from claude_proxy.errors import ExitCode, ProxyError

LABEL = "local.claude-proxy"
SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
PROBE_DESTINATION = "status-probe.claude-proxy.invalid:443"


def plist_path(home: Path) -> Path:
    return home / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def render_plist(
    template: bytes, *, executable: Path, home: Path, log_dir: Path, port: int, socks_port: int
) -> bytes:
    """Fill the template's @NAME@ strings with absolute paths; the serializer does the escaping."""
    for what, path in (("executable", executable), ("home", home), ("log folder", log_dir)):
        if not path.is_absolute():
            raise ProxyError(f"the {what} must be an absolute path, not {path}", ExitCode.USAGE)
    values = {
        "EXECUTABLE": str(executable),
        "HOME": str(home),
        "LOG_DIR": str(log_dir),
        "PORT": str(port),
        "SOCKS_PORT": str(socks_port),
        "PATH": f"{executable.parent}:{SYSTEM_PATH}",
    }
    try:
        document = plistlib.loads(template)
    except plistlib.InvalidFileException as e:
        raise ProxyError(f"the plist template is not a valid plist: {e}", ExitCode.USAGE) from e

    def fill(value: object) -> object:
        if isinstance(value, str):
            return PLACEHOLDER.sub(lambda m: substitute(m[1]), value)
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    def substitute(name: str) -> str:
        if name not in values:
            raise ProxyError(f"the plist template has an unknown placeholder @{name}@")
        return values[name]

    rendered = fill(document)
    if not isinstance(rendered, dict) or rendered.get("Label") != LABEL:
        raise ProxyError(f"the plist template's Label must be {LABEL}", ExitCode.USAGE)
    return plistlib.dumps(rendered, sort_keys=False)


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str
    detail: str


def probe(host: str, port: int, timeout: float = 3.0) -> Check:
    """Is claude-proxy answering? Only it refuses a probe CONNECT with its own header."""
    what = f"proxy on {host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(f"CONNECT {PROBE_DESTINATION} HTTP/1.1\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
    except OSError as e:
        return Check(False, what, f"nothing answers ({e.strerror or e})")
    lines = head.decode("latin-1").split("\r\n")
    ours = any(line.lower().startswith(REFUSAL_HEADER.lower() + ":") for line in lines)
    if lines[0].startswith("HTTP/1.1 403") and ours:
        return Check(True, what, "claude-proxy answers and refuses a probe")
    return Check(False, what, f"something else answers: {lines[0][:60]!r}")


def probe_socks(host: str, port: int, timeout: float = 3.0) -> Check:
    """Is a SOCKS5 proxy answering that refuses the probe destination by policy (reply 0x02)?"""
    what = f"SOCKS5 on {host}:{port}"
    name = PROBE_DESTINATION.rsplit(":", 1)[0].encode()
    request = b"\x05\x01\x00\x03" + bytes([len(name)]) + name + (443).to_bytes(2, "big")
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"\x05\x01\x00")
            greeting = sock.recv(2)
            sock.sendall(request)
            reply = sock.recv(10)
    except OSError as e:
        return Check(False, what, f"nothing answers ({e.strerror or e})")
    if greeting == b"\x05\x00" and reply[:2] == b"\x05\x02":
        return Check(True, what, "answers and refuses a probe")
    return Check(False, what, f"something else answers: {(greeting + reply)[:12]!r}")


def keychain_trusts(sha1: str) -> bool:
    """Whether the user's trust settings (macOS) name this exact certificate, by SHA-1."""
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(tmp) / "trust.plist"
        result = subprocess.run(
            ["security", "trust-settings-export", str(exported)],
            capture_output=True,
            check=False,
        )
        if result.returncode != 0 or not exported.exists():
            return False
        trust_list = plistlib.loads(exported.read_bytes()).get("trustList", {})
        return sha1.upper() in {key.upper() for key in trust_list}


def status(*, home: Path, host: str, port: int, socks_port: int) -> list[Check]:
    checks = []
    plist = plist_path(home)
    try:
        label = plistlib.loads(plist.read_bytes()).get("Label")
        checks.append(Check(label == LABEL, "agent", f"{plist} (Label {label})"))
    except (OSError, plistlib.InvalidFileException) as e:
        checks.append(Check(False, "agent", f"not installed: {plist} ({type(e).__name__})"))
    checks.append(probe(host, port))
    checks.append(probe_socks(host, socks_port))
    confdir = paths.config_dir()
    authority = None
    if ca.key_path(confdir).exists():
        try:
            authority = ca.load_ca(confdir)
            colons = authority.colons(authority.sha256)
            checks.append(Check(True, "CA", f"{authority.cert_path} SHA-256 {colons}"))
        except ProxyError as e:
            checks.append(Check(False, "CA", str(e)))
    else:
        checks.append(Check(False, "CA", f"none in {confdir}: run `claude-proxy ca`"))
    if sys.platform == "darwin":
        trusted = authority is not None and keychain_trusts(authority.sha1)
        detail = "trusted for SSL" if trusted else "not trusted: run scripts/install-agent.sh"
        checks.append(Check(trusted, "keychain", detail))
    checks.append(config_check(port))
    log = paths.log_dir() / paths.LOG_FILE
    checks.append(Check(True, "log", str(log) if log.exists() else f"{log} (not written yet)"))
    return checks


def config_check(port: int) -> Check:
    """The policy file: what the proxy on `port` says of it, else whether it is valid on disk."""
    path = paths.config_file()
    running = runstate.read(port)
    if running is not None and running.error:
        return Check(False, "config", f"{running.error}; the proxy keeps its previous policy")
    try:
        loaded = config.load(path)
    except config.ConfigError as e:
        return Check(False, "config", str(e))
    if not loaded.exists:
        return Check(True, "config", f"{path} (not written yet: the built-in defaults apply)")
    if running is not None and running.digest != loaded.digest:
        return Check(False, "config", f"{path} is valid but not yet in force")
    in_force = "in force" if running is not None else "valid"
    return Check(True, "config", f"{path} ({in_force}, {len(loaded.rules)} rules of its own)")
