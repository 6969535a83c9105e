"""What setup cannot do for the user, checked where it can be: after `setup`, what is left."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from claude_proxy.cli import fence
from claude_proxy.defaults import DEFAULT_HOST, DEFAULT_PORT
from claude_proxy.state import ca, paths

OK, TODO, UNKNOWN = "ok", "TODO", "?"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Step:
    state: str  # OK, TODO or UNKNOWN (cannot check here)
    what: str
    detail: str


def steps(target: str, http_port: int, socks_port: int) -> list[Step]:
    confdir = paths.config_dir()
    cert, bundle = ca.cert_path(confdir), ca.bundle_path(confdir)
    found = [
        listening(http_port, "HTTP"),
        listening(socks_port, "SOCKS"),
    ]
    if target == "claude-code":
        found.append(environment(http_port, cert))
    found.append(keychain(cert))
    found.append(tools(bundle))
    if sandbox := sandbox_programs():
        found.append(sandbox)
    return found


def sandbox_programs() -> Step | None:
    """Linux: the sandbox (Claude Code's and srt's) runs bubblewrap and socat; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    missing = fence.missing_tools(shutil.which)
    if not missing:
        return Step(OK, "sandbox", "bwrap and socat are installed")
    names = " and ".join(tool for tool, _ in missing)
    packages = " ".join(package for _, package in missing)
    return Step(
        TODO,
        "sandbox",
        f"{names} not found: the sandbox cannot start, and with failIfUnavailable Claude Code "
        f"refuses to run commands; install the package {packages} (apt-get install {packages}, "
        f"dnf install {packages})",
    )


def report(target: str, found: list[Step]) -> list[str]:
    lines = [f"{s.state:<5}{s.what}: {s.detail}" for s in found]
    if target == "claude-code":
        lines.append(
            "Then start `claude` as usual: `/sandbox` shows the sandbox on, and a command that "
            "reaches for a refused host gets claude-proxy's 403."
        )
    else:
        lines.append("Then run commands as `srt COMMAND`: their traffic goes through claude-proxy.")
    return lines


def listening(port: int, kind: str, timeout: float = 2.0) -> Step:
    where = f"{DEFAULT_HOST}:{port}"
    try:
        with socket.create_connection((DEFAULT_HOST, port), timeout=timeout):
            return Step(OK, f"{kind} port", f"something answers on {where}")
    except OSError as e:
        return Step(
            TODO,
            f"{kind} port",
            f"nothing answers on {where} ({e.strerror or e}): start claude-proxy "
            "(scripts/install-agent.sh on macOS) with these ports",
        )


def environment(http_port: int, cert: Path) -> Step:
    """Claude Code's own traffic (outside the sandbox) follows HTTPS_PROXY and trusts our CA."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or ""
    try:
        parts = urlsplit(proxy)
        points_here = parts.hostname in LOOPBACK_NAMES and parts.port == http_port
    except ValueError:
        points_here = False
    trusts = os.environ.get("NODE_EXTRA_CA_CERTS") == str(cert)
    if points_here and trusts:
        return Step(OK, "env", f"HTTPS_PROXY is {proxy}, NODE_EXTRA_CA_CERTS is the CA")
    port_flag = "" if http_port == DEFAULT_PORT else f" --port {http_port}"
    wrong = [] if points_here else [f"HTTPS_PROXY is {proxy or 'not set'}"]
    wrong += [] if trusts else [f"NODE_EXTRA_CA_CERTS is not {cert}"]
    return Step(
        TODO,
        "env",
        f'in this shell {" and ".join(wrong)}: add `eval "$(claude-proxy env{port_flag})"` to '
        f"your shell profile (fish: `claude-proxy env --shell fish{port_flag} | source`)",
    )


def keychain(cert: Path) -> Step:
    if not cert.exists():
        return Step(TODO, "CA", f"no CA in {cert.parent} yet: run `claude-proxy ca`")
    if sys.platform != "darwin":
        return Step(UNKNOWN, "keychain", "cannot check here (not macOS)")
    result = subprocess.run(
        ["security", "verify-cert", "-c", str(cert), "-p", "ssl"],
        capture_output=True,
        check=False,
    )
    if result.returncode == 0:
        return Step(OK, "keychain", "the login keychain trusts the CA for SSL")
    return Step(TODO, "keychain", "the CA is not trusted for SSL: run scripts/install-agent.sh")


def tools(bundle: Path) -> Step:
    """Commands inside the sandbox reach allowed hosts only if they trust our CA."""
    if not bundle.exists():
        return Step(
            TODO,
            "tools",
            "commands in the sandbox need a CA bundle: run `claude-proxy ca --bundle`, then add "
            "the lines `claude-proxy env --tools` prints to your shell profile",
        )
    if os.environ.get("SSL_CERT_FILE") != str(bundle):
        return Step(
            TODO,
            "tools",
            f"SSL_CERT_FILE is not {bundle} in this shell: add the lines "
            "`claude-proxy env --tools` prints to your shell profile",
        )
    return Step(OK, "tools", f"SSL_CERT_FILE is the bundle {bundle}")
