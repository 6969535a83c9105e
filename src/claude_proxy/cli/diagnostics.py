"""The checks of this machine behind `status` and `setup`'s "what remains": one result type,
one check per question, and the two ways they are shown.

A `Check` passes, fails (and then names its fix), or cannot tell here (the keychain, off macOS).
`status` shows every check as `ok` or `FAIL` with the fix on a line of its own (and as JSON);
setup shows what is left as `ok`, `TODO` (the problem, then its fix) or `?`. `status`'s probes
of the proxy, which need TLS, are in `probes`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from claude_proxy import defaults
from claude_proxy.state import ca, paths

# A check's state: it passes, it fails, or it cannot be told here.
OK, FAIL, CANNOT_TELL = True, False, None
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
    import subprocess  # here: only on macOS do setup and status ask the keychain

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
