"""Where the proxy listens, one answer for every command (`env`, `status`, `setup`, `config show`).

In order: `--port` / `--socks-port`; else the running proxy (its run-state file); else the
installed agent's plist (the ports launchd starts it with); else `[listen]` in config.toml; else
the defaults. Each port is taken from the first source that names it. The HTTP and SOCKS ports
must differ. Pure Python and light: `env` runs in every new shell.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import NamedTuple

from claude_proxy import defaults
from claude_proxy.errors import ExitCode, ProxyError
from claude_proxy.state import files, paths, run_state

FLAGS = "--port/--socks-port"
DEFAULTS = "the defaults"


class Ports(NamedTuple):  # not a dataclass: `env` needs this, and dataclasses is slow to import
    port: int
    socks_port: int
    source: str  # where the HTTP port came from, for the user
    socks_source: str
    running: run_state.RunState | None = None  # the running proxy they name, if one does

    def describe(self) -> str:
        if self.source == self.socks_source:
            return f"HTTP {self.port}, SOCKS {self.socks_port} (from {self.source})"
        return (
            f"HTTP {self.port} (from {self.source}), SOCKS {self.socks_port} "
            f"(from {self.socks_source})"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "http": self.port,
            "socks": self.socks_port,
            "source": self.source,
            "socks_source": self.socks_source,
        }


def resolve(
    port: int | None = None,
    socks_port: int | None = None,
    *,
    home: Path | None = None,
    config_dir: Path | None = None,
    state_dir: Path | None = None,
    fixed: bool = True,
) -> Ports:
    """The ports to tell clients (or to probe). `fixed`: a port 0 (picked at each start) from
    config.toml is no answer: it is an error naming the fix."""
    sources: list[tuple[str, int | None, int | None]] = [(FLAGS, port, socks_port)]
    running = find_running(port, state_dir)
    if running is not None:
        where = f"the running proxy (pid {running.pid})"
        sources.append((where, running.port, running.socks_port))
    agent_port, agent_socks = installed_agent_ports(home or Path.home())
    sources.append(("the installed agent's plist", agent_port, agent_socks))
    config_file = paths.config_file(config_dir)
    listen_port, listen_socks = listen_ports(config_file)
    sources.append((f"[listen] in {config_file}", listen_port, listen_socks))
    sources.append((DEFAULTS, defaults.DEFAULT_PORT, defaults.DEFAULT_SOCKS_PORT))
    http_source, http = next((s, p) for s, p, _ in sources if p is not None)
    socks_source, socks = next((s, p) for s, _, p in sources if p is not None)
    found = Ports(http, socks, http_source, socks_source, running)
    if fixed:
        for number, source, flag in ((http, http_source, "--port"),
                                     (socks, socks_source, "--socks-port")):  # fmt: skip
            if number == 0:
                raise ProxyError(
                    f"{source} gives port 0 (a free port picked at each start), which clients "
                    f"cannot be told: start the proxy first, or pass {flag}",
                    ExitCode.USAGE,
                )
    check_distinct(found)
    return found


def pending(found: Ports, config_dir: Path | None = None) -> str | None:
    """When the running proxy's ports are not the ones [listen] names (a change that applies at
    its next start), a sentence saying so; else None."""
    if found.running is None or found.source != found.socks_source:
        return None
    config_file = paths.config_file(config_dir)
    listen = dict(zip(("HTTP", "SOCKS"), listen_ports(config_file), strict=True))
    running = {"HTTP": found.port, "SOCKS": found.socks_port}
    differ = [f"{kind} {listen[kind]}" for kind in running
              if listen[kind] not in (None, 0, running[kind])]  # fmt: skip
    if not differ:
        return None
    return (
        f"{found.source} listens on HTTP {found.port}, SOCKS {found.socks_port}; [listen] in "
        f"{config_file} says {', '.join(differ)}, which applies at its next start"
    )


def check_distinct(found: Ports) -> None:
    if found.port == found.socks_port and found.port != 0:
        raise ProxyError(
            f"the HTTP and the SOCKS port are both {found.port} ({found.describe()}): they must "
            "differ; pass --port or --socks-port, or change [listen] in config.toml",
            ExitCode.USAGE,
        )


def find_running(port: int | None, state_dir: Path | None = None) -> run_state.RunState | None:
    """The running proxy on `port`; with no port, the only one running (the newest of several)."""
    if port is not None:
        return run_state.read(port, state_dir)
    alive = run_state.running(state_dir)
    return max(alive, key=lambda s: s.loaded_at) if alive else None


def installed_agent_ports(home: Path) -> tuple[int | None, int | None]:
    """The ports in the installed agent's plist (launchd starts it with them), if there is one."""
    plist = paths.plist_path(home)
    if not plist.exists():
        return None, None
    import plistlib

    try:
        document = plistlib.loads(plist.read_bytes())
        words = [str(w) for w in document.get("ProgramArguments", [])]
    except (OSError, ValueError, AttributeError, plistlib.InvalidFileException):
        return None, None

    def number(flag: str) -> int | None:
        text = words[words.index(flag) + 1] if flag in words[:-1] else ""
        return int(text) if text.isdigit() else None

    return number("--port"), number("--socks-port")


def listen_ports(config_file: Path) -> tuple[int | None, int | None]:
    """`[listen] port` and `socks_port` in config.toml, read lightly (a broken file names none:
    the commands that judge the file say what is wrong with it)."""
    try:
        text = files.read_regular(config_file).decode()
    except (OSError, UnicodeDecodeError):
        return None, None
    if "listen" not in text:  # most files: no need to import tomllib to know
        return None, None
    import tomllib

    try:
        listen = tomllib.loads(text).get("listen", {})
    except ValueError:
        return None, None
    if not isinstance(listen, dict):
        return None, None

    def number(key: str) -> int | None:
        value = listen.get(key)
        return value if type(value) is int and 0 <= value <= 65535 else None

    return number("port"), number("socks_port")


def shell_flags(found: Ports) -> str:
    """The flags that name these ports, for a fix to print (empty for the defaults)."""
    words = []
    if found.port != defaults.DEFAULT_PORT:
        words += ["--port", str(found.port)]
    if found.socks_port != defaults.DEFAULT_SOCKS_PORT:
        words += ["--socks-port", str(found.socks_port)]
    return " ".join(shlex.quote(w) for w in words)
