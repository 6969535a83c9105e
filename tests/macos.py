"""A Mac for the install scripts and the agent: a temporary HOME, and either the stand-ins of
tests/standins.py (`Mac`, on any machine) or this Mac's own programs (`RealMac`, on macOS with
CLAUDE_PROXY_REAL_MACOS=1).

Both answer the same questions (`AnyMac`): is the agent loaded, how often did launchd start it,
does the keychain trust a certificate, which certificates does the login keychain hold, does a
plist lint. The agent tests state what must be true on a Mac through these questions only, so the
stand-in run and the real one check the same things. Everything else the scripts use is real in
both: bash, the claude-proxy tool, and the agent itself, which launchd (or the launchctl
stand-in) starts from the plist the script rendered.
"""

from __future__ import annotations

import json
import os
import plistlib
import re
import signal
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path

from claude_proxy.state import paths
from tests import standins
from tests.support.certs import sha1

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
STANDINS = Path(__file__).resolve().with_name("standins.py")
PROGRAMS = ("launchctl", "security", "plutil", "uname", "uv")

# The variable that runs the agent tests against this Mac's own launchctl, security and plutil,
# and the marker of those tests (.github/workflows/macos.yml selects them by both).
REAL_MACOS_VARIABLE = "CLAUDE_PROXY_REAL_MACOS"
REAL_MACOS_MARKER = "real_macos"


def real_macos_skip_reason() -> str | None:
    """Why the real-macOS run cannot run here, or None when it can."""
    if sys.platform != "darwin":
        return (
            f"real macOS run: needs macOS's launchctl, security and plutil, and this is "
            f"{sys.platform} (the stand-in run checks the same things here)"
        )
    if os.environ.get(REAL_MACOS_VARIABLE) != "1":
        return (
            f"real macOS run: it loads {paths.LABEL} into this user's launchd domain and changes "
            f"this user's trust settings; set {REAL_MACOS_VARIABLE}=1 to run it"
        )
    return None


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
        ["uv", *standins.INSTALL, str(constraints), str(ROOT)],
    ):  # fmt: skip
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    return tools / "bin" / "claude-proxy"

    return True


class AnyMac(ABC):
    """What the agent tests need of a Mac, stand-in or real: run the scripts as a user would, and
    observe what macOS holds afterwards."""

    label = paths.LABEL
    env: dict[str, str]

    def __init__(self, home: Path, tools: Path) -> None:
        self.home = home
        self.tools = tools
        self.uid = os.getuid()

    @property
    def exe(self) -> Path:
        return self.tools / "bin" / "claude-proxy"

    @property
    def plist(self) -> Path:
        return paths.plist_path(self.home)

    @property
    def confdir(self) -> Path:
        return self.home / ".config" / "claude-proxy"

    @property
    def keychain(self) -> str:
        return str(paths.login_keychain(self.home))

    @property
    @abstractmethod
    def logdir(self) -> Path:
        """The agent's log folder: platformdirs' user log folder."""

    @property
    @abstractmethod
    def statedir(self) -> Path:
        """platformdirs' user state folder (setup's record)."""

    def run(self, script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPTS / script), *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )

    # What macOS holds

    @abstractmethod
    def loaded(self) -> bool:
        """Whether launchd has the agent loaded in this user's gui domain."""

    @abstractmethod
    def agent_pid(self) -> int | None:
        """The pid of the agent launchd runs, None when it runs none."""

    @abstractmethod
    def runs(self) -> int:
        """How many times launchd started the agent since it was loaded (0: not loaded)."""

    @abstractmethod
    def trusts(self, cert: Path) -> bool:
        """The keychain's own SSL trust decision for `cert` (`security verify-cert`)."""

    @abstractmethod
    def trust_settings(self) -> set[str]:
        """The SHA-1s this user's trust settings name (trusted or Never Trust), beyond those that
        were there before the test."""

    @abstractmethod
    def certificates(self) -> set[str]:
        """The SHA-1s of the certificates in the test's login keychain."""

    @abstractmethod
    def plist_valid(self, path: Path) -> bool:
        """Whether `plutil -lint` accepts the file."""

    @abstractmethod
    def mark_never_trust(self, cert: Path) -> None:
        """`cert` in the login keychain, marked "Never Trust" by the user."""

    @abstractmethod
    def cleanup(self) -> None:
        """Teardown: nothing the test loaded, trusted or started is left behind."""


class Mac(AnyMac):
    """A fake HOME and the stand-ins on PATH; the tool is the session's build, linked by `uv`."""

    def __init__(self, tmp: Path, home: Path, built: Path) -> None:
        super().__init__(home, tmp / "uv-tools")
        self.state = tmp / "state"
        self.bin = tmp / "standins"
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

    @property
    def logdir(self) -> Path:
        return self.home / ".local" / "state" / "claude-proxy" / "log"  # platformdirs on Linux

    @property
    def statedir(self) -> Path:
        return self.home / ".local" / "state" / "claude-proxy"

    def answer(self, program: str, verb: str, *codes: int) -> None:
        """Queue the exit codes the next `program verb` calls return (0: do the real work)."""
        (self.state / f"{program}-{verb}").write_text("".join(f"{c}\n" for c in codes))

    def say(self, program: str, answer: str) -> None:
        """What `program` answers from now on (`uname`: "Linux")."""
        (self.state / program).write_text(answer)

    def run(self, script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        (self.state / "calls").unlink(missing_ok=True)
        return super().run(script, *args, **env)

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
        if sha1 not in state["certs"]:  # type: ignore[operator]
            state["certs"] = [*state["certs"], sha1]  # type: ignore[misc]
        if trust:
            state["trust"] = {**state["trust"], sha1: trust}  # type: ignore[dict-item]
        (self.state / "keychain.json").write_text(json.dumps(state))

    def trusts(self, cert: Path) -> bool:
        trust = self.keychain_state()["trust"]
        assert isinstance(trust, dict)
        return trust.get(sha1(cert)) == "trusted"

    def trust_settings(self) -> set[str]:
        trust = self.keychain_state()["trust"]
        assert isinstance(trust, dict)
        return set(trust)

    def certificates(self) -> set[str]:
        certs = self.keychain_state()["certs"]
        assert isinstance(certs, list)
        return set(certs)

    def mark_never_trust(self, cert: Path) -> None:
        self.put_in_keychain(sha1(cert), "never")

    def plist_valid(self, path: Path) -> bool:
        try:  # what the plutil stand-in accepts
            plistlib.loads(path.read_bytes())
        except (OSError, plistlib.InvalidFileException):
            return False
        return True

    # The agent launchd runs

    def launchd(self) -> dict[str, object]:
        path = self.state / "launchd.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def loaded(self) -> bool:
        return self.launchd().get("label") == self.label

    def runs(self) -> int:
        runs = self.launchd().get("runs", 0)
        return runs if isinstance(runs, int) else 0

    def starts(self) -> list[int]:
        path = self.state / "starts"
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def agent_pid(self) -> int | None:
        pid = self.launchd().get("pid")
        return pid if isinstance(pid, int) else None

    def cleanup(self) -> None:
        self.kill_agents()

    def kill_agents(self) -> None:
        """Teardown: every program the launchctl stand-in started and that still runs."""
        for pid in self.starts():
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue  # ended (or not Linux: nothing to check it by)
            if b"claude-proxy" in command:  # still ours, not a reused pid
                os.kill(pid, signal.SIGKILL)


LAUNCHCTL, SECURITY, PLUTIL = "/bin/launchctl", "/usr/bin/security", "/usr/bin/plutil"


def ask(*command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """One of macOS's own programs, by its absolute path (never a stand-in), bounded in time: a
    keychain call that waits for a password dialog nobody answers fails instead of hanging."""
    return subprocess.run(
        list(command), env=env, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


class RealMac(AnyMac):
    """This Mac, with a temporary HOME: the real launchctl, security, plutil and uv.

    The agent is loaded into this user's `gui/UID` domain under its real label, so the run refuses
    to start while one is loaded (it would replace the user's agent). The login keychain the
    scripts name (`$HOME/Library/Keychains/login.keychain-db`) is one made for the test by
    `security create-keychain` at that path, unlocked, with no lock timeout: the user's own is never
    touched. Trust settings are per user, not per keychain: the teardown removes those of every CA
    the test made.
    """

    def __init__(self, tmp: Path, home: Path) -> None:
        super().__init__(home, tmp / "uv-tools")
        self.tmp = tmp
        self.env = {
            **tool_env(self.tools),
            "HOME": str(home),
            "PATH": os.pathsep.join([uv_dir(), "/usr/bin", "/bin", "/usr/sbin", "/sbin"]),
            "CLAUDE_PROXY_WAIT_SECONDS": "60",
        }
        self.domain = f"gui/{self.uid}"
        if self.loaded():
            raise AssertionError(
                f"{self.label} is loaded in {self.domain}: the real macOS run would replace it; "
                "run scripts/uninstall-agent.sh first, and install-agent.sh again afterwards"
            )
        self.before = self._trust_settings()
        Path(self.keychain).parent.mkdir(parents=True)
        for command in (
            ["create-keychain", "-p", "", self.keychain],
            ["set-keychain-settings", self.keychain],  # no timeout, no lock on sleep
            ["unlock-keychain", "-p", "", self.keychain],
        ):
            made = ask(SECURITY, *command)
            assert made.returncode == 0, f"security {command[0]}: {made.stderr}"
        assert Path(self.keychain).is_file(), f"security create-keychain made no {self.keychain}"

    @property
    def logdir(self) -> Path:
        return self.home / "Library" / "Logs" / "claude-proxy"  # platformdirs on macOS

    @property
    def statedir(self) -> Path:
        return self.home / "Library" / "Application Support" / "claude-proxy"

    def _print(self) -> str | None:
        found = ask(LAUNCHCTL, "print", f"{self.domain}/{self.label}")
        return found.stdout if found.returncode == 0 else None

    def loaded(self) -> bool:
        return self._print() is not None

    def _field(self, name: str) -> int | None:
        found = re.search(rf"^\s+{name} = (\d+)\s*$", self._print() or "", re.M)
        return int(found[1]) if found else None

    def agent_pid(self) -> int | None:
        return self._field("pid")

    def runs(self) -> int:
        return self._field("runs") or 0

    def trusts(self, cert: Path) -> bool:
        verdict = ask(SECURITY, "verify-cert", "-c", str(cert), "-p", "ssl", "-L", env=self.env)
        return verdict.returncode == 0

    def _trust_settings(self) -> set[str]:
        with tempfile.TemporaryDirectory() as folder:
            exported = Path(folder) / "trust.plist"
            said = ask(SECURITY, "trust-settings-export", str(exported))
            if said.returncode != 0:
                assert "No Trust Settings" in said.stdout + said.stderr, said.stderr
                return set()
            trust_list = plistlib.loads(exported.read_bytes()).get("trustList", {})
        return {name.upper() for name in trust_list}

    def trust_settings(self) -> set[str]:
        return self._trust_settings() - self.before

    def certificates(self) -> set[str]:
        found = ask(SECURITY, "find-certificate", "-a", "-Z", self.keychain)
        return set(re.findall(r"^SHA-1 hash: ([0-9A-F]{40})$", found.stdout, re.M))

    def plist_valid(self, path: Path) -> bool:
        return ask(PLUTIL, "-lint", str(path)).returncode == 0

    def mark_never_trust(self, cert: Path) -> None:
        marked = ask(SECURITY, "add-trusted-cert", "-r", "deny", "-k", self.keychain, str(cert))
        assert marked.returncode == 0, f"security add-trusted-cert -r deny: {marked.stderr}"

    def cleanup(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # 36: the agent is still stopping
            if ask(LAUNCHCTL, "bootout", f"{self.domain}/{self.label}").returncode != 36:
                break
            time.sleep(0.5)
        trusted = self.trust_settings()
        for cert in self.tmp.rglob("mitmproxy-ca-cert.pem"):  # every CA the test made
            if sha1(cert) in trusted:
                ask(SECURITY, "remove-trusted-cert", str(cert))
        ask(SECURITY, "delete-keychain", self.keychain)
