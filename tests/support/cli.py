"""Running the real claude-proxy command with a temporary HOME."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.conftest import EXECUTABLE
from tests.mountns import MountNamespace


def run_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env["HOME"] = str(home)
    return subprocess.run(
        [str(EXECUTABLE), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def run(
    home: Path,
    *args: str,
    env: dict[str, str] | None = None,
    stdin: int | None = None,
    cwd: Path | None = None,
    namespace: MountNamespace | None = None,
    prefix: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """The CLI with HOME at `home`, run in `cwd` (default: HOME), whose settings it also reads."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    full_env.update(HOME=str(home), **(env or {}))
    argv = [*prefix, str(EXECUTABLE), *args]
    return subprocess.run(
        namespace.command(argv, cwd or home) if namespace else argv,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd or home,
        stdin=subprocess.DEVNULL if stdin is None else stdin,
    )
