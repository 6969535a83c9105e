"""A fake Mac for the install scripts: a temporary HOME and the stand-ins of tests/standins.py.

Everything else the scripts use is real: bash, the claude-proxy tool (built once per session by
the real `uv tool install`), and the agent itself, which the launchctl stand-in starts from the
plist the script rendered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
STANDINS = Path(__file__).resolve().with_name("standins.py")
PROGRAMS = ("launchctl", "security", "plutil", "uname", "uv")


def uv_dir() -> str:
    """The folder of the uv running these tests (`uv run` says where), else the one on PATH."""
    import shutil

    uv = os.environ.get("UV") or shutil.which("uv")
    assert uv, "uv is needed"
    return str(Path(uv).parent)


def tool_env(tools: Path) -> dict[str, str]:
    """What `uv tool install` needs here: temporary tool folders, this Python, no downloads."""
    inherited = {  # the machine's own settings (registry certificates …), not its session's
        k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "SSH_", "UV_"))
    }
    return {
        **inherited,
        "UV_TOOL_DIR": str(tools / "tools"),
        "UV_TOOL_BIN_DIR": str(tools / "bin"),
        "UV_PYTHON": sys.base_prefix + "/bin/python3",
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_CACHE_DIR": os.environ.get("UV_CACHE_DIR", str(Path.home() / ".cache" / "uv")),
        "LANG": "C.UTF-8",
    }


def build_tool(tools: Path) -> Path:
    """The real `uv tool install --reinstall` of this checkout with uv.lock's versions as
    constraints, as install-agent.sh runs it."""
    env = {**tool_env(tools), "PATH": os.pathsep.join([uv_dir(), os.environ["PATH"]])}
    constraints = tools / "constraints.txt"
    for command in (
        ["uv", "export", "--quiet", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project",
         "--no-header", "--project", str(ROOT), "--output-file", str(constraints)],
        ["uv", "tool", "install", "--reinstall", "--constraints", str(constraints), str(ROOT)],
    ):  # fmt: skip
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    return tools / "bin" / "claude-proxy"


class Mac:
    """A fake HOME and the stand-ins on PATH; the tool is the session's build, linked by `uv`."""

    def __init__(self, tmp: Path, home: Path, built: Path) -> None:
        self.home = home
        self.state = tmp / "state"
        self.bin = tmp / "standins"
        self.tools = tmp / "uv-tools"
        self.state.mkdir()
        self.bin.mkdir()
        for name in PROGRAMS:
            path = self.bin / name
            path.write_text(
                f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(STANDINS.parent)!r})\n"
                f"import standins\nsys.exit(standins.main({name!r}))\n"
            )
            path.chmod(0o755)
        self.env = {
            **tool_env(self.tools),
            "HOME": str(home),
            "PATH": os.pathsep.join([str(self.bin), "/usr/bin", "/bin"]),
            "FAKE_STATE": str(self.state),
            "FAKE_BUILT_TOOL": str(built),
            "FAKE_REAL_UV": str(Path(uv_dir()) / "uv"),
            "CLAUDE_PROXY_WAIT_SECONDS": "20",
        }
        self.uid = os.getuid()

    @property
    def exe(self) -> Path:
        return self.tools / "bin" / "claude-proxy"

    @property
    def plist(self) -> Path:
        return self.home / "Library" / "LaunchAgents" / "local.claude-proxy.plist"

    @property
    def confdir(self) -> Path:
        return self.home / ".config" / "claude-proxy"

    @property
    def logdir(self) -> Path:
        return self.home / ".local" / "state" / "claude-proxy" / "log"  # platformdirs on Linux

    @property
    def keychain(self) -> str:
        return f"{self.home}/Library/Keychains/login.keychain-db"

    def answer(self, program: str, verb: str, *codes: int) -> None:
        """Queue the exit codes the next `program verb` calls return (0: do the real work)."""
        (self.state / f"{program}-{verb}").write_text("".join(f"{c}\n" for c in codes))

    def set(self, name: str, value: str) -> None:
        (self.state / name).write_text(value)

    def run(self, script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        calls = self.state / "calls"
        calls.unlink(missing_ok=True)
        return subprocess.run(
            ["bash", str(SCRIPTS / script), *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )

    def calls(self, *programs: str) -> list[str]:
        path = self.state / "calls"
        lines = path.read_text().splitlines() if path.exists() else []
        wanted = programs or tuple(p for p in PROGRAMS if p != "uv")
        return [self.tidy(line) for line in lines if line.split(" ", 1)[0] in wanted]

    def tidy(self, line: str) -> str:
        """Calls with the fake HOME as ~, the checkout as <repo>, a temporary file as <tmp>."""
        words = line.replace(str(self.home), "~").replace(str(ROOT), "<repo>").split(" ")
        temporary = ("claude-proxy-trust", "claude-proxy-constraints")
        return " ".join("<tmp>" if any(t in w for t in temporary) else w for w in words)

    # The keychain

    def keychain_state(self) -> dict[str, object]:
        path = self.state / "keychain.json"
        return json.loads(path.read_text()) if path.exists() else {"certs": [], "trust": {}}

    def put_in_keychain(self, sha1: str, trust: str | None) -> None:
        """A certificate in the login keychain, trusted, marked "never" (Never Trust) or None."""
        state = self.keychain_state()
        state["certs"] = [*state["certs"], sha1]  # type: ignore[misc]
        if trust:
            state["trust"] = {**state["trust"], sha1: trust}  # type: ignore[dict-item]
        (self.state / "keychain.json").write_text(json.dumps(state))

    # The agent launchd runs

    def launchd(self) -> dict[str, object]:
        path = self.state / "launchd.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def starts(self) -> list[int]:
        path = self.state / "starts"
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def agent_pid(self) -> int | None:
        pid = self.launchd().get("pid")
        return pid if isinstance(pid, int) else None

    def kill_agents(self) -> None:
        """Teardown: every program the launchctl stand-in started and that still runs."""
        for pid in self.starts():
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue  # ended (or not Linux: nothing to check it by)
            if b"claude-proxy" in command:  # still ours, not a reused pid
                os.kill(pid, signal.SIGKILL)
