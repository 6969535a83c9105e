"""The launchd agent: rendering its plist and reading back the installed one."""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import NamedTuple

from claude_proxy.errors import ExitCode, ProxyError
from claude_proxy.state import paths

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


class Installed(NamedTuple):  # not a dataclass: `paths` reads it, and dataclasses is slow to import
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
