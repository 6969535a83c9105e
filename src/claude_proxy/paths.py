"""Where claude-proxy keeps its files. Nothing here touches the disk."""

from __future__ import annotations

from pathlib import Path

import platformdirs
from platformdirs.unix import Unix

APP = "claude-proxy"
LOG_FILE = "claude-proxy.log"
CONFIG_FILE = "config.toml"


def config_dir() -> Path:
    """`$XDG_CONFIG_HOME/claude-proxy`, else `~/.config/claude-proxy`, on macOS as on Linux.

    The CA lives here; the install scripts and Claude Code's NODE_EXTRA_CA_CERTS point at it.
    """
    return Path(Unix(APP).user_config_dir)


def config_file() -> Path:
    """The user's policy, `config.toml` beside the CA."""
    return config_dir() / CONFIG_FILE


def log_dir() -> Path:
    """The platform's user log folder: `~/Library/Logs/claude-proxy` on macOS."""
    return Path(platformdirs.user_log_dir(APP))


def state_dir() -> Path:
    """The platform's user state folder: `~/.local/state/claude-proxy` on Linux.

    `setup` keeps its record of what it changed here, so that `--undo` takes back only that.
    """
    return Path(platformdirs.user_state_dir(APP))
