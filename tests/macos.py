"""Recording stand-ins for the macOS-only programs (launchctl, security, plutil, uname).

Each logs its arguments, one call per line, and exits with the codes a test queued for it
(`launchctl-bootout` holding "36\\n0" makes the first bootout answer 36, the next 0), as macOS's
programs do. Everything else the scripts use is real: bash, uv, the claude-proxy tool.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

STANDIN = r"""#!/usr/bin/env bash
name=$(basename "$0")
printf '%s\n' "${name} $*" >> "${FAKE_STATE}/calls"
key="${name}-${1:-}"
code=0
if [ -s "${FAKE_STATE}/${key}" ]; then
  code=$(head -n 1 "${FAKE_STATE}/${key}")
  tail -n +2 "${FAKE_STATE}/${key}" > "${FAKE_STATE}/${key}.rest"
  mv "${FAKE_STATE}/${key}.rest" "${FAKE_STATE}/${key}"
fi
case "${name} ${1:-}" in
  "uname -s") cat "${FAKE_STATE}/uname" 2>/dev/null || echo Darwin ;;
  "security trust-settings-export")
    [ -s "${FAKE_STATE}/trusted-sha1" ] || { echo "No Trust Settings were found." >&2; exit 1; }
    printf '<plist><dict><key>trustList</key><dict><key>%s</key><dict/></dict></dict></plist>\n' \
      "$(cat "${FAKE_STATE}/trusted-sha1")" > "$2" ;;
  "security find-certificate")
    [ -s "${FAKE_STATE}/keychain-sha1" ] &&
      echo "SHA-1 hash: $(cat "${FAKE_STATE}/keychain-sha1")" ;;
  "plutil -lint")
    "@PYTHON@" -c 'import plistlib, sys; plistlib.load(open(sys.argv[1], "rb"))' "$2" || exit 1
    echo "$2: OK" ;;
esac
exit "${code}"
"""

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def uv_dir() -> str:
    """The folder of the uv running these tests (`uv run` says where), else the one on PATH."""
    uv = os.environ.get("UV") or shutil.which("uv")
    assert uv, "uv is needed"
    return str(Path(uv).parent)


class Mac:
    """A fake HOME and the stand-ins on PATH, with the real uv installing into temporary folders."""

    def __init__(self, tmp: Path, home: Path) -> None:
        self.home = home
        self.state = tmp / "state"
        self.bin = tmp / "standins"
        self.tools = tmp / "uv-tools"
        self.state.mkdir()
        self.bin.mkdir()
        for name in ("launchctl", "security", "plutil", "uname"):
            path = self.bin / name
            path.write_text(STANDIN.replace("@PYTHON@", sys.executable))
            path.chmod(0o755)
        inherited = {  # the machine's own settings (registry certificates …), not its session's
            k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "SSH_", "UV_"))
        }
        self.env = {
            **inherited,
            "HOME": str(home),
            "PATH": os.pathsep.join([str(self.bin), str(Path(sys.executable).parent), uv_dir(),
                                     os.environ.get("PATH", "/usr/bin:/bin")]),
            "FAKE_STATE": str(self.state),
            "UV_TOOL_DIR": str(self.tools / "tools"),
            "UV_TOOL_BIN_DIR": str(self.tools / "bin"),
            "UV_PYTHON": sys.base_prefix + "/bin/python3",
            "UV_PYTHON_DOWNLOADS": "never",
            "UV_CACHE_DIR": os.environ.get("UV_CACHE_DIR", str(Path.home() / ".cache" / "uv")),
            "CLAUDE_PROXY_WAIT_SECONDS": "5",
            "LANG": "C.UTF-8",
        }  # fmt: skip
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
    def keychain(self) -> str:
        return f"{self.home}/Library/Keychains/login.keychain-db"

    def answer(self, program: str, verb: str, *codes: int) -> None:
        """Queue the exit codes the next `program verb` calls return."""
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

    def calls(self) -> list[str]:
        path = self.state / "calls"
        lines = path.read_text().splitlines() if path.exists() else []
        return [self.tidy(line) for line in lines]

    def tidy(self, line: str) -> str:
        """Calls with the fake HOME as ~ and a temporary file as <tmp>."""
        words = line.replace(str(self.home), "~").split(" ")
        return " ".join("<tmp>" if "claude-proxy-trust" in w else w for w in words)
