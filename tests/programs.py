"""The npm programs the end-to-end tests run, pinned in tests/npm (package.json and its lock):
sandbox-runtime (`srt`) and Claude Code (`claude`); and whether bubblewrap can sandbox here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

NPM_DIR = Path(__file__).parent / "npm"
BIN = NPM_DIR / "node_modules" / ".bin"


def bubblewrap_works() -> str | None:
    """None when bubblewrap can make namespaces here; else why not."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed (Debian package bubblewrap; .ci/run installs it)"
    probe = subprocess.run(
        ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return f"bubblewrap cannot create namespaces here: {probe.stderr.strip()}"
    return None


def sandbox_program(name: str) -> Path:
    """The pinned program `name`, installed on first use; skips where bubblewrap cannot run."""
    if why := bubblewrap_works():
        pytest.skip(why)
    program = BIN / name
    if not program.exists():
        npm = shutil.which("npm")
        assert npm, "npm is needed to install the pinned programs (tests/npm/package.json)"
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--prefix", str(NPM_DIR)],
            check=True,
            capture_output=True,
            timeout=600,
        )
    for tool in ("socat", "rg"):
        assert shutil.which(tool), f"the sandbox needs {tool} (.ci/run installs socat and ripgrep)"
    return program
