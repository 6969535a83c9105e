"""Where claude-proxy keeps its files, and the agent's name. Nothing here touches the disk.

The install scripts ask for these (`claude-proxy paths`) instead of computing them again.
"""

from __future__ import annotations

import os
from pathlib import Path

APP = "claude-proxy"
LABEL = "local.claude-proxy"  # the launchd agent's label
LOG_FILE = "claude-proxy.log"
# launchd/local.claude-proxy.plist, through the link in macos/: the wheel carries its bytes.
PLIST_TEMPLATE = Path(__file__).parent.parent / "macos" / f"{LABEL}.plist"
AUDIT_FILE = "audit.db"
CONFIG_FILE = "config.toml"


def config_dir() -> Path:
    """`$XDG_CONFIG_HOME/claude-proxy`, else `~/.config/claude-proxy`, on macOS as on Linux.

    The CA lives here; the install scripts and Claude Code's NODE_EXTRA_CA_CERTS point at it.
    The agent is told this folder by its plist (`run --config-dir`): it never computes it.
    The XDG rule is applied here rather than by platformdirs, whose import costs every command
    (`env` runs in each new shell) more than the rest of its start.
    """
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.expanduser("~/.config")
    return Path(base) / APP


def config_file(folder: Path | None = None) -> Path:
    """The user's policy, `config.toml` beside the CA (in `folder`, the agent's --config-dir)."""
    return (folder or config_dir()) / CONFIG_FILE


def log_dir() -> Path:
    """The platform's user log folder: `~/Library/Logs/claude-proxy` on macOS."""
    import platformdirs

    return Path(platformdirs.user_log_dir(APP))


def state_dir() -> Path:
    """The platform's user state folder: `~/.local/state/claude-proxy` on Linux.

    `setup` keeps its record of what it changed here, so that `--undo` takes back only that; the
    organizations seen and the organization pin live here too.
    """
    import platformdirs

    return Path(platformdirs.user_state_dir(APP))


def plist_path(home: Path) -> Path:
    """The installed agent: `~/Library/LaunchAgents/local.claude-proxy.plist`."""
    return home / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def login_keychain(home: Path) -> Path:
    return home / "Library" / "Keychains" / "login.keychain-db"


def audit_db() -> Path:
    """The SQLite audit log of every decision, in the state folder; `claude-proxy log` reads it."""
    return state_dir() / AUDIT_FILE
