"""`claude-proxy status`: would Claude Code work through the agent, fenced in? One check per
step of its path (the agent, the CA, both listeners, the keychain, the pin, the policy, the logs,
Claude Code's settings), each ok or failing with its fix.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from claude_proxy import defaults
from claude_proxy.cli import diagnostics, fence, log_cmd, probes, setup_cmd
from claude_proxy.cli.diagnostics import Check
from claude_proxy.errors import ProxyError
from claude_proxy.macos import agent
from claude_proxy.policy import config_file
from claude_proxy.state import accounts, ca, paths, run_state


def status(
    *,
    home: Path,
    host: str,
    port: int | None,
    socks_port: int | None,
    config_dir: Path | None = None,
    project: Path | None = None,
    ports_from: str | None = None,
) -> list[Check]:
    """Would Claude Code work through the agent, fenced in? One row per step; all ok, or not.

    `ports_from` says where the ports came from (ports.resolve), shown as a row of its own.
    """
    agent_check, installed = agent_state(home)
    told = installed or agent.Installed(None, None, None, None, None)
    proxy = probes.Proxy(
        host=host,
        port=port or told.port or defaults.DEFAULT_PORT,
        socks_port=socks_port or told.socks_port or defaults.DEFAULT_SOCKS_PORT,
        config_dir=config_dir or told.config_dir or paths.config_dir(),
        agent_installed=installed is not None,
    )
    checks = [agent_check]
    if ports_from:
        checks.append(Check(True, "ports", ports_from))
    ca_check, cert = certificate(proxy)
    checks.append(ca_check)
    checks.append(probes.probe_http(proxy, cert))
    checks.append(probes.probe_socks(proxy, cert))
    if sys.platform == "darwin":
        checks.append(diagnostics.keychain(home, cert or ca.cert_path(proxy.config_dir)))
    checks.append(pin_check(paths.state_dir()))
    checks.append(config_check(proxy.port, proxy.config_dir))
    log = paths.log_dir() / paths.LOG_FILE
    checks.append(Check(True, "log", str(log) if log.exists() else f"{log} (not written yet)"))
    audit_ok, audit_detail = log_cmd.describe(paths.audit_db())
    checks.append(Check(audit_ok, "audit log", audit_detail))
    checks += claude_code_settings(home, project or Path.cwd(), proxy)
    return checks


def claude_code_settings(home: Path, project: Path, proxy: probes.Proxy) -> list[Check]:
    """The settings Claude Code will apply in `project`, judged key by key (`fence.review`)."""
    try:
        scopes = setup_cmd.read_scopes(home, project)
    except ProxyError as e:
        return [Check(False, "Claude Code settings", str(e), "fix that file by hand")]
    secret = setup_cmd.private_files(home)
    review = fence.review(
        scopes, secret=secret, home=home, http_port=proxy.port, socks_port=proxy.socks_port
    )
    checks = [Check(c.ok, f"claude-code {c.what}", c.detail, c.fix) for c in review]
    if (sandbox := diagnostics.sandbox_programs()) is not None:
        checks.append(replace(sandbox, what="sandbox programs"))
    return checks


PIN_FIX = "claude-proxy pin ORG_UUID, or claude-proxy pin --off, rewrites it"
CONFIG_FIX = "claude-proxy config edit (it checks the file before it saves it)"


def pin_check(state: Path) -> Check:
    what = "organization pin"
    try:
        pin = accounts.load_pin(state)
    except accounts.StateError as e:
        damaged = "damaged" in str(e)
        fix = PIN_FIX if damaged else f"make the state folder yours and readable: ls -la {state}"
        return Check(False, what, str(e).removesuffix(accounts.PIN_FIX), fix)
    if pin is None:
        return Check(True, what, "off: credentials of any organization reach Anthropic")
    return Check(True, what, pin.describe())


def agent_state(home: Path) -> tuple[Check, agent.Installed | None]:
    check, installed = launchd_agent(home)
    if sys.platform != "darwin":  # launchd is macOS's: elsewhere the listeners decide
        return Check(True, "agent", "not macOS: no launchd agent"), installed
    return check, installed


def launchd_agent(home: Path) -> tuple[Check, agent.Installed | None]:
    plist = paths.plist_path(home)
    try:
        installed = agent.installed_plist(home)
    except FileNotFoundError:
        return Check(False, "agent", f"not installed: no {plist}", diagnostics.INSTALL), None
    except (OSError, ValueError) as e:
        return Check(False, "agent", f"{plist} is unusable: {e}", diagnostics.INSTALL), None
    exe = installed.executable
    if exe is None or not os.access(exe, os.X_OK):
        missing = f"{plist} starts {exe}, which is not there"
        return Check(False, "agent", missing, diagnostics.INSTALL), None
    return Check(True, "agent", f"{plist} (starts {exe})"), installed


def certificate(proxy: probes.Proxy) -> tuple[Check, Path | None]:
    confdir = proxy.config_dir
    fix = diagnostics.INSTALL if proxy.agent_installed else "claude-proxy ca"
    if not ca.key_path(confdir).exists():
        return Check(False, "CA", f"none in {confdir}", fix), None
    try:
        authority = ca.load_ca(confdir)
    except ProxyError as e:
        return Check(False, "CA", str(e), f"as it says, then {fix}"), None
    colons = authority.colons(authority.sha256)
    return Check(True, "CA", f"{authority.cert_path} SHA-256 {colons}"), authority.cert_path


def config_check(port: int, config_dir: Path) -> Check:
    """The policy file: what the proxy on `port` says of it, else whether it is valid on disk."""
    path = paths.config_file(config_dir)
    running = run_state.read(port)
    if running is not None and running.error:
        detail = f"{running.error}; the proxy keeps its previous policy"
        return Check(False, "config", detail, CONFIG_FIX)
    try:
        loaded = config_file.load(path)
    except config_file.ConfigError as e:
        return Check(False, "config", str(e), CONFIG_FIX)
    if not loaded.exists:
        return Check(True, "config", f"{path} (not written yet: the built-in defaults apply)")
    if running is not None and running.digest != loaded.digest:
        return Check(
            False,
            "config",
            f"{path} is valid but not yet in force",
            f"read it now: kill -HUP {running.pid} (the proxy on port {port})",
        )
    in_force = "in force" if running is not None else "valid"
    return Check(True, "config", f"{path} ({in_force}, {len(loaded.rules)} rules of its own)")
