"""One mitmproxy: the proxy runs on the version pyproject.toml pins (the one the suite runs on) and
refuses any other at start, with one line that names both."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

import mitmproxy.version

from claude_proxy import mitm
from claude_proxy.errors import ExitCode
from tests.conftest import EXECUTABLE

ROOT = Path(__file__).resolve().parent.parent


def pinned(name: str) -> str:
    """The exact version pyproject.toml pins for `name`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [version] = [d.split("==")[1] for d in project["dependencies"] if d.startswith(f"{name}==")]
    return version


def test_the_suite_runs_on_the_pinned_mitmproxy_and_the_proxy_knows_it() -> None:
    assert mitmproxy.version.VERSION == pinned("mitmproxy") == mitm.tested_version()


def installed_elsewhere(folder: Path, version: str) -> dict[str, str]:
    """An environment in which another mitmproxy's metadata comes first on the path."""
    info = folder / f"mitmproxy-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: mitmproxy\nVersion: {version}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    return {**env, "HOME": str(folder / "home"), "PYTHONPATH": str(folder)}


def test_another_mitmproxy_is_refused_at_start_with_one_line(tmp_path: Path) -> None:
    env = installed_elsewhere(tmp_path, "12.2.0")
    result = subprocess.run(
        [str(EXECUTABLE), "run", "--port", "0", "--socks-port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == ExitCode.MITMPROXY
    assert result.stderr.splitlines() == [
        "claude-proxy: cannot start: mitmproxy 12.2.0 is installed, but claude-proxy runs only on "
        f"mitmproxy {pinned('mitmproxy')}, the version its tests ran on (it patches mitmproxy's "
        "internals); reinstall it from its checkout: scripts/install-agent.sh, or "
        "uv tool install --reinstall ."
    ]
    assert not (tmp_path / "home" / ".config" / "claude-proxy").exists()  # nothing was made


def test_commands_that_need_no_proxy_still_work_beside_another_mitmproxy(tmp_path: Path) -> None:
    env = installed_elsewhere(tmp_path, "12.2.0")
    result = subprocess.run(
        [str(EXECUTABLE), "check", "api.anthropic.com"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
