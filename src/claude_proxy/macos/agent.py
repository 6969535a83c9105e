"""The launchd agent: rendering its plist, reading back the installed one, and `status`."""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import sys
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path

from claude_proxy import defaults
from claude_proxy.cli import diagnostics, log_cmd
from claude_proxy.cli.diagnostics import Check
from claude_proxy.errors import ExitCode, ProxyError
from claude_proxy.policy import config_file
from claude_proxy.state import accounts, ca, paths, run_state

LABEL = paths.LABEL
COMMAND = "claude-proxy"  # the console script's name (pyproject's [project.scripts])
SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
PLACEHOLDER = re.compile(r"@([A-Z_]+)@")


def console_script() -> Path:
    """The installed `claude-proxy` command of this environment (never `__main__.py`)."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        found = shutil.which(COMMAND, path=folder)
        if found:
            return Path(os.path.abspath(found))
    raise ProxyError(
        f"cannot find the {COMMAND} command beside {sys.executable}; "
        "pass --executable PATH (the installed claude-proxy)",
        ExitCode.USAGE,
    )


def render_plist(
    template: bytes,
    *,
    executable: Path,
    home: Path,
    log_dir: Path,
    config_dir: Path,
    port: int,
    socks_port: int,
) -> bytes:
    """Fill the template's @NAME@ strings with absolute paths; the serializer does the escaping."""
    folders = (
        ("executable", executable),
        ("home", home),
        ("log folder", log_dir),
        ("config folder", config_dir),
    )
    for what, path in folders:
        if not path.is_absolute():
            raise ProxyError(f"the {what} must be an absolute path, not {path}", ExitCode.USAGE)
    for name, number in (("port", port), ("SOCKS port", socks_port)):
        if not 1 <= number <= 65535:
            raise ProxyError(f"the agent's {name} must be 1-65535, not {number}", ExitCode.USAGE)
    values = {
        "EXECUTABLE": str(executable),
        "HOME": str(home),
        "LOG_DIR": str(log_dir),
        "CONFIG_DIR": str(config_dir),
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
class Installed:
    """What the installed plist tells the agent: its program, ports and config folder."""

    plist: Path | None
    executable: Path | None
    port: int | None
    socks_port: int | None
    config_dir: Path | None


def installed_plist(home: Path) -> Installed:
    """Read the installed plist; raises OSError when it is missing or unreadable, ValueError when
    it is not an agent plist of ours."""
    plist = paths.plist_path(home)
    try:
        document = plistlib.loads(plist.read_bytes())
    except plistlib.InvalidFileException as e:
        raise ValueError(f"not a valid plist ({e})") from e
    if not isinstance(document, dict) or document.get("Label") != LABEL:
        label = document.get("Label") if isinstance(document, dict) else None
        raise ValueError(f"its Label is {label!r}, not {LABEL}")
    arguments = document.get("ProgramArguments")
    if not isinstance(arguments, list) or not arguments:
        raise ValueError("it has no ProgramArguments")
    words = [str(a) for a in arguments]

    def flag(name: str) -> str | None:
        return words[words.index(name) + 1] if name in words[:-1] else None

    def number(name: str) -> int | None:
        text = flag(name)
        return int(text) if text is not None and text.isdigit() else None

    folder = flag("--config-dir")
    return Installed(
        plist=plist,
        executable=Path(words[0]),
        port=number("--port"),
        socks_port=number("--socks-port"),
        config_dir=Path(folder) if folder else None,
    )


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
    told = installed or Installed(None, None, None, None, None)
    proxy = diagnostics.Proxy(
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
    checks.append(diagnostics.probe_http(proxy, cert))
    checks.append(diagnostics.probe_socks(proxy, cert))
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


def claude_code_settings(home: Path, project: Path, proxy: diagnostics.Proxy) -> list[Check]:
    """The settings Claude Code will apply in `project`, judged key by key (`fence.review`)."""
    from claude_proxy.cli import fence, setup_cmd

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


def agent_state(home: Path) -> tuple[Check, Installed | None]:
    check, installed = launchd_agent(home)
    if sys.platform != "darwin":  # launchd is macOS's: elsewhere the listeners decide
        return Check(True, "agent", "not macOS: no launchd agent"), installed
    return check, installed


def launchd_agent(home: Path) -> tuple[Check, Installed | None]:
    plist = paths.plist_path(home)
    try:
        installed = installed_plist(home)
    except FileNotFoundError:
        return Check(False, "agent", f"not installed: no {plist}", diagnostics.INSTALL), None
    except (OSError, ValueError) as e:
        return Check(False, "agent", f"{plist} is unusable: {e}", diagnostics.INSTALL), None
    exe = installed.executable
    if exe is None or not os.access(exe, os.X_OK):
        missing = f"{plist} starts {exe}, which is not there"
        return Check(False, "agent", missing, diagnostics.INSTALL), None
    return Check(True, "agent", f"{plist} (starts {exe})"), installed


def certificate(proxy: diagnostics.Proxy) -> tuple[Check, Path | None]:
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
