"""`setup claude-code` / `setup srt` on real files, through the real CLI, with a temporary HOME."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import claude_proxy
from tests.mountns import MountNamespace
from tests.support.cli import run
from tests.support.files import mode

OTHER_KEYS: dict[str, Any] = {
    "model": "opus",
    "permissions": {"allow": ["Bash(ls:*)"], "deny": []},
    "env": {"DISABLE_TELEMETRY": "1"},
}
SANDBOX_KEYS: dict[str, Any] = {
    "sandbox": {
        "excludedCommands": ["docker"],
        "network": {"allowUnixSockets": ["/var/run/docker.sock"]},
    },
}
OURS = {"enabled": True, "network": {"httpProxyPort": 9051, "socksProxyPort": 9052}}


SHELL_STARTUP = [".zshenv", ".zprofile", ".zshrc", ".zlogin", ".bashrc", ".bash_profile",
                 ".bash_login", ".profile", ".config/fish"]  # fmt: skip
CLAUDE_CODE_CONFIG = ["settings.json", "settings.local.json", "agents/**", "skills/**",
                      "commands/**", "hooks/**", "plugins/**", "output-styles/**",
                      "workflows/**"]  # fmt: skip


def fence(
    home: Path, http_port: int = 9051, socks_port: int = 9052, programs: Sequence[str] = ()
) -> dict[str, Any]:
    """What setup claude-code writes for a HOME (Claude Code's `//` starts an absolute path).
    `programs`: the folders claude-proxy's Python runs code from (see `programs_in`)."""
    conf = f"/{home}/.config/claude-proxy"
    state = f"/{home}/.local/state/claude-proxy"
    secret_files = [f"{conf}/mitmproxy-ca.pem", f"{conf}/mitmproxy-ca.p12", f"{conf}/config.toml"]
    plist = f"/{home}/Library/LaunchAgents/local.claude-proxy.plist"
    startup = [f"/{home}/{name}" for name in SHELL_STARTUP]
    return {
        "sandbox": {
            "enabled": True,
            "failIfUnavailable": True,
            "allowUnsandboxedCommands": False,
            "network": {"httpProxyPort": http_port, "socksProxyPort": socks_port},
            "filesystem": {
                "denyRead": [*secret_files, state],
                "denyWrite": [conf, state, *programs, plist, *startup],
            },
        },
        "permissions": {
            "deny": [
                *[f"Read({f})" for f in secret_files],
                f"Read({state}/**)",
                f"Edit({conf}/**)",
                f"Edit({state}/**)",
                *[f"Edit({p}/**)" for p in programs],
                f"Edit({plist})",
                *[f"Edit(//**/.claude/{name})" for name in CLAUDE_CODE_CONFIG],
                "Edit(//**/.mcp.json)",
                "Edit(//**/.git/hooks/**)",
                "Edit(//**/.git/config)",
                f"Edit(/{home}/.claude.json)",
                *[
                    f"Edit({p}{'/**' if '/' in p.rsplit(str(home), 1)[1][1:] else ''})"
                    for p in startup
                ],
                "Edit(//etc/claude-code/**)",
            ]
        },
    }


def programs_in(path: Path, home: Path) -> list[str]:
    """The program folders a written file names: denyWrite entries outside HOME."""
    written = json.loads(path.read_text())
    deny_write = written["sandbox"]["filesystem"]["denyWrite"]
    return [p for p in deny_write if not p.startswith(f"/{home}/")]


def test_the_code_that_enforces_is_guarded(home: Path) -> None:
    """The environment, the interpreter it was made from (a sitecustomize.py there would run) and
    the package's folder on sys.path (an editable install) are out of the agent's reach."""
    assert run(home, "setup", "claude-code", "--yes").returncode == 0
    guarded = [Path(p[1:]) for p in programs_in(settings_file(home), home)]
    package = Path(claude_proxy.__file__).parent
    for folder in (Path(sys.prefix), Path(sys.base_prefix), package.parent):
        assert any(folder == g or g in folder.parents for g in guarded), (folder, guarded)


def srt_fence(home: Path, programs: Sequence[str]) -> dict[str, list[str]]:
    """srt's lists: plain absolute paths (`programs` as `programs_in` finds them, without `/`)."""
    conf, state = home / ".config" / "claude-proxy", home / ".local" / "state" / "claude-proxy"
    secret = [conf / "mitmproxy-ca.pem", conf / "mitmproxy-ca.p12", conf / "config.toml", state]
    plist = home / "Library" / "LaunchAgents" / "local.claude-proxy.plist"
    guarded = [str(conf), str(state), *programs, str(plist)]
    return {"denyRead": [str(p) for p in secret], "denyWrite": guarded}


def srt_programs(path: Path, home: Path) -> list[str]:
    written = json.loads(path.read_text())
    return [p for p in written["filesystem"]["denyWrite"] if not p.startswith(f"{home}/")]


SRT_REQUIRED = {
    "network": {
        "allowedDomains": [
            "anthropic.com",
            "*.anthropic.com",
            "claude.ai",
            "*.claude.ai",
            "claude.com",
            "*.claude.com",
        ],
        "deniedDomains": [],
    },
    "filesystem": {"denyRead": [], "allowWrite": [], "denyWrite": []},
}


def settings_file(home: Path) -> Path:
    return home / ".claude" / "settings.json"


def write_settings(path: Path, document: Any, mode: int = 0o640) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=4) + "\n")
    path.chmod(mode)
    return path.read_bytes()


def backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".claude-proxy-backup-*"))


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under `root` with its mode and content: what "changes nothing" compares."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        found[str(path.relative_to(root))] = (st.st_mode, content)
    return found


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("original", [OTHER_KEYS, SANDBOX_KEYS], ids=["other-keys", "sandbox-keys"])
def test_merges_without_touching_other_keys(home: Path, original: dict[str, Any]) -> None:
    """Everything of the user's stays, except (with --yes) the settings that open the fence."""
    path = settings_file(home)
    before = write_settings(path, original)
    result = run(home, "setup", "claude-code", "--yes")
    assert result.returncode == 0, result.stderr
    merged = json.loads(path.read_text())
    ours = fence(home, programs=programs_in(path, home))
    permissions = original.get("permissions", {})
    expected = {
        **original,
        "sandbox": ours["sandbox"],
        "permissions": {
            **permissions,
            "deny": [*permissions.get("deny", []), *ours["permissions"]["deny"]],
        },
    }
    assert merged == expected
    assert mode(path) == 0o640
    [backup] = backups(path)
    assert backup.read_bytes() == before and mode(backup) == 0o640
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, backup.name])
    assert '+            "httpProxyPort": 9051,' in result.stdout.splitlines()  # the diff
    assert result.stdout.index("httpProxyPort") < result.stdout.index(f"wrote {path}")
    undone = run(home, "setup", "claude-code", "--undo", "--yes")
    assert undone.returncode == 0, undone.stderr
    assert json.loads(path.read_text()) == original


def test_names_what_opens_the_fence_and_removes_it_only_with_yes(home: Path) -> None:
    path = settings_file(home)
    before = write_settings(path, SANDBOX_KEYS)
    dry = run(home, "setup", "claude-code", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "  sandbox.excludedCommands: the commands it names run outside the sandbox" in dry.stdout
    assert "sandbox.network.allowUnixSockets: a Unix socket reaches a service" in dry.stdout
    assert "setup removes them only with --yes" in dry.stdout
    assert '-        "excludedCommands": [' not in dry.stdout  # not part of the change
    assert path.read_bytes() == before
    result = run(home, "setup", "claude-code", "--yes")
    assert '-        "excludedCommands": [' in result.stdout.splitlines()
    assert "excludedCommands" not in json.loads(path.read_text())["sandbox"]


def test_project_settings(home: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    result = run(home, "setup", "claude-code", "--project", str(project), "--yes", "--port", "8123")
    assert result.returncode == 0, result.stderr
    written = json.loads((project / ".claude" / "settings.json").read_text())
    settings = project / ".claude" / "settings.json"
    assert written == fence(home, http_port=8123, programs=programs_in(settings, home))
    assert not settings_file(home).exists()


def test_missing_file_and_folder_are_created_private(home: Path) -> None:
    path = settings_file(home)
    result = run(home, "setup", "claude-code", "--yes")
    assert result.returncode == 0, result.stderr
    assert json.loads(path.read_text()) == fence(home, programs=programs_in(path, home))
    assert mode(path.parent) == 0o700 and mode(path) == 0o600
    assert backups(path) == []
    assert "--- /dev/null" in result.stdout
    undone = run(home, "setup", "claude-code", "--undo", "--yes")
    assert undone.returncode == 0, undone.stderr
    assert not path.exists()  # setup made it, undo takes it back
    assert path.parent.is_dir()


BROKEN = '{\n  "model": "opus"\n  "theme": "dark"\n}\n'


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (BROKEN, "{path}:3:3: Expecting ',' delimiter"),
        ('[{"sandbox": {}}]\n', "{path}: the top level is an array, not an object"),
        ('{"sandbox": true}\n', "{path}: sandbox is `true`, not an object"),
        (
            '{"sandbox": {"network": "none"}}\n',
            "{path}: sandbox.network is a string, not an object",
        ),
    ],
    ids=["syntax", "top-level-array", "sandbox-not-object", "network-not-object"],
)
def test_refuses_a_file_it_cannot_merge_into(home: Path, text: str, error: str) -> None:
    path = settings_file(home)
    path.parent.mkdir()
    path.write_text(text)
    state = tree(home)
    result = run(home, "setup", "claude-code", "--yes")
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert error.format(path=path) in line and "nothing was written" in line
    assert path.read_text() == text
    assert tree(home) == state  # no backup, no record, nothing


def test_refuses_srt_network_that_is_not_an_object(home: Path) -> None:
    path = home / ".srt-settings.json"
    path.write_text('{"network": []}')
    result = run(home, "setup", "srt", "--yes")
    assert result.returncode == 2
    assert f"{path}: network is an array, not an object" in one_line(result.stderr)
    assert path.read_text() == '{"network": []}'


def test_read_only_file(home: Path) -> None:
    path = settings_file(home)
    before = write_settings(path, OTHER_KEYS, mode=0o444)
    state = tree(home)
    result = run(home, "setup", "claude-code", "--yes")
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert f"{path} is read-only (mode 0444)" in line and "nothing was written" in line
    assert path.read_bytes() == before and mode(path) == 0o444
    assert tree(home) == state


def test_no_terminal_and_no_yes_refuses(home: Path) -> None:
    path = settings_file(home)
    before = write_settings(path, OTHER_KEYS)
    state = tree(home)
    result = run(home, "setup", "claude-code")
    assert result.returncode == 2
    assert "pass --yes" in one_line(result.stderr)
    assert path.read_bytes() == before
    assert tree(home) == state


@pytest.fixture
def terminal() -> Iterator[tuple[int, int]]:
    controller, stdin = os.openpty()
    yield controller, stdin
    os.close(controller)
    os.close(stdin)


@pytest.mark.parametrize(("answer", "written"), [("n", False), ("", False), ("y", True)])
def test_asks_on_a_terminal(
    home: Path, terminal: tuple[int, int], answer: str, written: bool
) -> None:
    controller, stdin = terminal
    path = settings_file(home)
    before = write_settings(path, OTHER_KEYS)
    os.write(controller, answer.encode() + b"\n")  # waits in the terminal until it is read
    result = run(home, "setup", "claude-code", stdin=stdin)
    assert "Write it? [y/N]" in result.stdout
    assert result.returncode == (0 if written else 1), result.stderr
    assert (path.read_bytes() != before) == written
    assert bool(backups(path)) == written


def test_dry_run_changes_nothing_anywhere(home: Path) -> None:
    write_settings(settings_file(home), SANDBOX_KEYS)
    state = tree(home)
    for target in ("claude-code", "srt"):
        result = run(home, "setup", target, "--dry-run")
        assert result.returncode == 0, result.stderr
        assert "httpProxyPort" in result.stdout and "dry run: nothing was written" in result.stdout
        assert tree(home) == state
    assert run(home, "setup", "claude-code", "--yes").returncode == 0
    state = tree(home)
    result = run(home, "setup", "claude-code", "--undo", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert '-            "httpProxyPort": 9051,' in result.stdout.splitlines()
    assert tree(home) == state


def test_undo_keeps_what_the_user_changed_meanwhile(home: Path) -> None:
    path = settings_file(home)
    write_settings(path, OTHER_KEYS)
    assert run(home, "setup", "claude-code", "--yes").returncode == 0
    document = json.loads(path.read_text())
    document["model"] = "sonnet"
    document["theme"] = "dark"
    document["sandbox"]["excludedCommands"] = ["docker"]
    path.write_text(json.dumps(document, indent=2))
    result = run(home, "setup", "claude-code", "--undo", "--yes")
    assert result.returncode == 0, result.stderr
    expected = {**OTHER_KEYS, "model": "sonnet", "theme": "dark"}
    expected["sandbox"] = {"excludedCommands": ["docker"]}  # the emptied network object is gone
    assert json.loads(path.read_text()) == expected
    assert mode(path) == 0o640
    again = run(home, "setup", "claude-code", "--undo", "--yes")
    assert again.returncode == 0
    assert "nothing to undo" in again.stdout


def test_undo_leaves_our_key_alone_when_the_user_changed_it(home: Path) -> None:
    path = settings_file(home)
    write_settings(path, OTHER_KEYS)
    assert run(home, "setup", "claude-code", "--yes").returncode == 0
    document = json.loads(path.read_text())
    document["sandbox"]["network"]["httpProxyPort"] = 8080
    path.write_text(json.dumps(document))
    result = run(home, "setup", "claude-code", "--undo", "--yes")
    assert result.returncode == 0, result.stderr
    assert (
        "sandbox.network.httpProxyPort is now 8080, not the 9051 setup wrote: left as it is"
        in result.stdout
    )
    assert json.loads(path.read_text()) == {
        **OTHER_KEYS,
        "sandbox": {"network": {"httpProxyPort": 8080}},
    }


def test_undo_restores_the_values_setup_replaced(home: Path) -> None:
    path = settings_file(home)
    original = {
        **OTHER_KEYS,
        "sandbox": {
            "enabled": False,
            "network": {"httpProxyPort": 3128, "allowLocalBinding": True},
        },
    }
    write_settings(path, original)
    assert run(home, "setup", "claude-code", "--yes").returncode == 0
    assert run(home, "setup", "claude-code", "--yes", "--port", "9999").returncode == 0
    assert json.loads(path.read_text())["sandbox"]["network"]["httpProxyPort"] == 9999
    result = run(home, "setup", "claude-code", "--undo", "--yes")
    assert result.returncode == 0, result.stderr
    assert json.loads(path.read_text()) == original  # as before the first run, not the second
    assert len(backups(path)) == 3  # one per write, undo included


def test_second_run_with_the_same_ports_changes_nothing(home: Path) -> None:
    path = settings_file(home)
    write_settings(path, OTHER_KEYS)
    assert run(home, "setup", "claude-code", "--yes").returncode == 0
    state = tree(home)
    result = run(home, "setup", "claude-code")  # no --yes needed: there is nothing to ask
    assert result.returncode == 0, result.stderr
    assert "already has these settings" in result.stdout
    assert tree(home) == state


def test_srt(home: Path) -> None:
    path = home / ".srt-settings.json"
    result = run(home, "setup", "srt", "--yes", "--socks-port", "1081")
    assert result.returncode == 0, result.stderr
    written = json.loads(path.read_text())
    ports = {"httpProxyPort": 9051, "socksProxyPort": 1081}
    assert written == {
        "network": {**ports, **SRT_REQUIRED["network"]},
        "filesystem": {
            **SRT_REQUIRED["filesystem"],
            **srt_fence(home, srt_programs(path, home)),
        },
    }
    assert mode(path) == 0o600
    assert "Then run commands as `srt COMMAND`" in result.stdout
    assert run(home, "setup", "srt", "--undo", "--yes").returncode == 0
    assert not path.exists()


def test_srt_keeps_the_users_own_lists(home: Path) -> None:
    path = home / ".srt-settings.json"
    original = {
        "network": {"allowedDomains": ["github.com"], "deniedDomains": ["evil.example"]},
        "filesystem": {"denyRead": ["~/.ssh"], "allowWrite": ["."], "denyWrite": []},
        "enableWeakerNestedSandbox": True,
    }
    write_settings(path, original)
    assert run(home, "setup", "srt", "--yes").returncode == 0
    written = json.loads(path.read_text())
    assert written["network"] == {
        **original["network"],
        "httpProxyPort": 9051,
        "socksProxyPort": 9052,
    }
    assert written["filesystem"] == {
        "denyRead": ["~/.ssh", *srt_fence(home, srt_programs(path, home))["denyRead"]],
        "allowWrite": ["."],
        "denyWrite": srt_fence(home, srt_programs(path, home))["denyWrite"],
    }
    assert written["enableWeakerNestedSandbox"] is True
    assert run(home, "setup", "srt", "--undo", "--yes").returncode == 0
    assert json.loads(path.read_text()) == original


def test_port_zero_is_refused(home: Path) -> None:
    result = run(home, "setup", "srt", "--yes", "--port", "0")
    assert result.returncode == 2
    assert "not 0" in result.stderr
    assert not (home / ".srt-settings.json").exists()


def test_says_what_remains_and_checks_it(home: Path) -> None:
    with socket.socket() as listening, socket.socket() as silent:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        silent.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        http_port, socks_port = listening.getsockname()[1], silent.getsockname()[1]
        cert = home / ".config" / "claude-proxy" / "mitmproxy-ca-cert.pem"
        env = {"HTTPS_PROXY": f"http://127.0.0.1:{http_port}", "NODE_EXTRA_CA_CERTS": str(cert)}
        ports = ("--port", str(http_port), "--socks-port", str(socks_port))
        result = run(home, "setup", "claude-code", "--yes", *ports, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"ok   HTTP port: something answers on 127.0.0.1:{http_port}" in lines
    assert any(
        line.startswith(f"TODO SOCKS port: nothing answers on 127.0.0.1:{socks_port} ")
        for line in lines
    )
    assert any(line.startswith("ok   env: HTTPS_PROXY is http://127.0.0.1:") for line in lines)
    if sys.platform != "darwin":
        assert "TODO CA: no CA in" in result.stdout  # checked before the keychain
    unset = run(home, "setup", "claude-code", "--yes", "--port", "9999", env={"HTTPS_PROXY": ""})
    assert "TODO env: in this shell HTTPS_PROXY is not set" in unset.stdout
    assert 'eval "$(claude-proxy env --port 9999)"' in unset.stdout


def test_keychain_cannot_be_checked_off_macos(home: Path) -> None:
    if sys.platform == "darwin":
        pytest.skip("macOS checks the keychain")
    assert run(home, "ca").returncode == 0
    result = run(home, "setup", "srt", "--yes")
    assert "?    keychain: cannot check here (not macOS)" in result.stdout.splitlines()


def test_undo_with_no_record(home: Path) -> None:
    path = settings_file(home)
    write_settings(path, {"sandbox": OURS})  # the same keys, but not setup's doing
    state = tree(home)
    result = run(home, "setup", "claude-code", "--undo", "--yes")
    assert result.returncode == 0
    assert f"nothing to undo: setup has not changed {path}" in result.stdout
    assert tree(home) == state


@pytest.mark.parametrize(
    "args",
    [
        ["setup", "claude-code", "--dry-run"],
        ["setup", "srt", "--yes"],
        ["setup", "claude-code", "--undo", "--yes"],
        ["ca", "--bundle"],
        ["ca"],
        ["env", "--tools"],
    ],
    ids=" ".join,
)
def test_commands_do_not_import_mitmproxy(home: Path, args: list[str]) -> None:
    assert run(home, "ca").returncode == 0  # making a CA is the one thing that needs mitmproxy
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "claude_proxy", *args],
        env={**env, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()]
    assert "claude_proxy.cli.main" in imported  # the measurement saw our own imports
    assert [name for name in imported if name.split(".")[0] == "mitmproxy"] == []


def test_a_linked_settings_file_stays_a_link(home: Path, tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "claude-settings.json"
    before = write_settings(real, OTHER_KEYS)
    path = settings_file(home)
    path.parent.mkdir()
    path.symlink_to(real)
    result = run(home, "setup", "claude-code", "--yes")
    assert result.returncode == 0, result.stderr
    assert path.is_symlink() and path.resolve() == real
    expected = fence(home, programs=programs_in(real, home))
    assert json.loads(real.read_text())["sandbox"] == expected["sandbox"]
    [backup] = backups(real)
    assert backup.read_bytes() == before


def test_an_empty_file_is_an_empty_object(home: Path) -> None:
    path = home / ".srt-settings.json"
    path.write_text("\n")
    result = run(home, "setup", "srt", "--yes")
    assert result.returncode == 0, result.stderr
    assert json.loads(path.read_text())["network"]["httpProxyPort"] == 9051
    assert [b.read_text() for b in backups(path)] == ["\n"]


# The managed settings file: root's, outranking every other (in a mount namespace of its own)

MANAGED = Path("/etc/claude-code/managed-settings.json")


def managed(home: Path, programs: Sequence[str]) -> dict[str, Any]:
    expected = fence(home, programs=programs)
    expected["allowManagedHooksOnly"] = True
    expected["allowManagedMcpServersOnly"] = True
    expected["allowedMcpServers"] = []
    expected["sandbox"]["filesystem"] = {
        "allowManagedReadPathsOnly": True,
        **expected["sandbox"]["filesystem"],
    }
    return expected


def in_namespace(namespace: MountNamespace, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        namespace.command(argv, Path("/")), capture_output=True, text=True, timeout=30
    )


def test_managed_needs_root_and_writes_nothing(home: Path) -> None:
    """In a user namespace of its own the command is not root (uid 65534, as the kernel says)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) runs the command without root")
    state = tree(home)
    result = run(home, "setup", "claude-code", "--managed", "--yes", prefix=("unshare", "--user"))
    assert result.returncode == 2
    assert one_line(result.stderr) == (
        f"claude-proxy: --managed writes {MANAGED}, which only root may change: run it "
        "with sudo; nothing was written"
    )
    assert tree(home) == state


def test_managed_is_root_owned_merged_and_undone(home: Path, managed_etc: MountNamespace) -> None:
    original = {"model": "opus", "permissions": {"deny": ["Bash(rm:*)"]}}
    upper = managed_etc.upper / "claude-code"
    upper.mkdir(mode=0o755)
    path = upper / "managed-settings.json"  # /etc/claude-code/managed-settings.json inside
    before = write_settings(path, original, mode=0o644)
    dry = run(home, "setup", "claude-code", "--managed", "--dry-run", namespace=managed_etc)
    assert dry.returncode == 0, dry.stderr
    assert f"+++ {MANAGED}" in dry.stdout and path.read_bytes() == before
    result = run(home, "setup", "claude-code", "--managed", "--yes", namespace=managed_etc)
    assert result.returncode == 0, result.stderr
    written = json.loads(path.read_text())
    expected = managed(home, programs_in(path, home))
    deny = ["Bash(rm:*)", *expected["permissions"]["deny"]]
    assert written == {**expected, "model": "opus", "permissions": {"deny": deny}}
    info = path.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o644)
    assert [b.read_bytes() for b in backups(path)] == [before]
    assert "cannot lock the sandbox" not in result.stdout  # that is the user scope's warning
    undone = run(
        home, "setup", "claude-code", "--managed", "--undo", "--yes", namespace=managed_etc
    )
    assert undone.returncode == 0, undone.stderr
    assert json.loads(path.read_text()) == original


def test_managed_folder_and_file_are_made_for_claude_code_to_read(
    home: Path, managed_etc: MountNamespace
) -> None:
    result = run(home, "setup", "claude-code", "--managed", "--yes", namespace=managed_etc)
    assert result.returncode == 0, result.stderr
    shown = in_namespace(managed_etc, "stat", "-c", "%a %u %n", str(MANAGED.parent), str(MANAGED))
    assert shown.stdout.splitlines() == [f"755 0 {MANAGED.parent}", f"644 0 {MANAGED}"]
    undone = run(
        home, "setup", "claude-code", "--managed", "--undo", "--yes", namespace=managed_etc
    )
    assert undone.returncode == 0, undone.stderr
    assert in_namespace(managed_etc, "test", "-e", str(MANAGED)).returncode == 1
    assert not MANAGED.exists()  # this machine's own /etc never saw it


@pytest.mark.parametrize(
    ("owner", "mode", "said"),
    [
        (65534, 0o644, "is owned by uid 65534, mode 0644"),
        (0, 0o664, "is owned by uid 0, mode 0664"),
        (0, 0o444, "is read-only (mode 0444)"),
    ],
    ids=["another-owner", "group-writable", "read-only"],
)
def test_managed_refuses_a_file_others_could_change(
    home: Path, managed_etc: MountNamespace, owner: int, mode: int, said: str
) -> None:
    upper = managed_etc.upper / "claude-code"
    upper.mkdir(mode=0o755)
    path = upper / "managed-settings.json"
    before = write_settings(path, {"model": "opus"}, mode=mode)
    os.chown(path, owner, owner)
    result = run(home, "setup", "claude-code", "--managed", "--yes", namespace=managed_etc)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert f"{MANAGED} {said}" in line and "nothing was written" in line
    assert path.read_bytes() == before and backups(path) == []


def test_managed_and_project_are_one_or_the_other(home: Path) -> None:
    result = run(home, "setup", "claude-code", "--managed", "--project", str(home))
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr


# What Claude Code reads besides the file setup writes


def test_an_unparsable_file_in_another_scope_stops_setup(home: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    local = project / ".claude" / "settings.local.json"
    local.parent.mkdir(parents=True)
    local.write_text('{"sandbox": {"enabled": false,}}\n')
    state = tree(home)
    result = run(home, "setup", "claude-code", "--yes", cwd=project)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert f"cannot parse {local}:1:30:" in line and "nothing was written" in line
    assert tree(home) == state


def test_openings_in_other_scopes_are_named_with_their_file(home: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    local = project / ".claude" / "settings.local.json"
    shared = project / ".claude" / "settings.json"
    before = write_settings(local, {"sandbox": {"enableWeakerNetworkIsolation": True}})
    write_settings(shared, {"sandbox": {"excludedCommands": ["docker *"]}})
    result = run(home, "setup", "claude-code", "--yes", cwd=project)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert (
        f'FAIL sandbox.excludedCommands: ["docker *"] ({shared}): the commands it names run '
        "outside the sandbox"
    ) in lines
    assert (
        f"FAIL sandbox.enableWeakerNetworkIsolation: true (local: {local}): trustd becomes a way "
        "out of the sandbox (macOS)"
    ) in lines
    assert f"     fix: remove sandbox.excludedCommands from {shared}" in lines
    assert local.read_bytes() == before  # named, never changed: it is not the file setup writes


def test_missing_sandbox_programs_are_named_with_their_package(home: Path, tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("bubblewrap and socat are what the sandbox needs on Linux")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    result = run(home, "setup", "claude-code", "--yes", env={"PATH": str(bin_dir)})
    assert result.returncode == 0, result.stderr
    assert (
        "TODO sandbox: bwrap and socat not found: the sandbox cannot start, and with "
        "failIfUnavailable Claude Code refuses to run commands; install the package bubblewrap "
        "socat (apt-get install bubblewrap socat, dnf install bubblewrap socat)"
    ) in result.stdout.splitlines()


def test_a_dangling_link_is_refused(home: Path, tmp_path: Path) -> None:
    path = settings_file(home)
    path.parent.mkdir()
    path.symlink_to(tmp_path / "gone" / "settings.json")
    result = run(home, "setup", "claude-code", "--yes")
    assert result.returncode == 2
    assert "is a link to" in one_line(result.stderr) and "which does not exist" in result.stderr
    assert not (tmp_path / "gone").exists()  # no folder made for it


def test_a_file_that_is_not_regular_is_refused_without_waiting(home: Path) -> None:
    path = settings_file(home)
    path.parent.mkdir()
    os.mkfifo(path)  # reading it would wait for a writer forever
    result = run(home, "setup", "claude-code", "--yes")
    assert result.returncode == 2
    assert f"{path} is not a regular file" in one_line(result.stderr)


def test_a_folder_no_rule_can_name_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home[1]"
    home.mkdir()
    result = run(home, "setup", "claude-code", "--yes")
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "holds [ ], which Claude Code's path rules read as a pattern" in line
    assert not settings_file(home).exists()


def test_undo_all_takes_back_every_file_and_names_the_one_that_needs_root(
    home: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    assert run(home, "setup", "claude-code", "--yes").returncode == 0
    assert run(home, "setup", "claude-code", "--yes", "--project", str(project)).returncode == 0
    assert run(home, "setup", "srt", "--yes").returncode == 0
    record = home / ".local" / "state" / "claude-proxy" / "setup-record.json"
    document = json.loads(record.read_text())
    document["files"][str(MANAGED)] = {
        "target": "claude-code",
        "managed": True,
        "created_file": True,
        "created": [],
        "changes": [],
    }
    record.write_text(json.dumps(document))
    result = run(home, "setup", "undo-all", "--yes", prefix=("unshare", "--user"))
    assert result.returncode == 1
    assert (
        f"{MANAGED}: run `sudo claude-proxy setup claude-code --managed --undo` (root's file)"
        in result.stdout.splitlines()
    )
    for path in (settings_file(home), project / ".claude" / "settings.json"):
        assert not path.exists()
    assert not (home / ".srt-settings.json").exists()
    assert list(json.loads(record.read_text())["files"]) == [str(MANAGED)]


def test_numbers_in_a_settings_file_are_kept_as_written(home: Path) -> None:
    path = settings_file(home)
    path.parent.mkdir()
    path.write_text('{\n  "cleanupPeriodDays": 1e999,\n  "ratio": 1.50\n}\n')
    result = run(home, "setup", "claude-code", "--yes")
    assert result.returncode == 0, result.stderr
    text = path.read_text()
    assert '"cleanupPeriodDays": 1e999,' in text and '"ratio": 1.50,' in text
    assert "Infinity" not in text
    assert run(home, "setup", "claude-code", "--undo", "--yes").returncode == 0
    assert path.read_text() == '{\n  "cleanupPeriodDays": 1e999,\n  "ratio": 1.50\n}\n'
