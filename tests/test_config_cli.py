"""`config path|edit|check|show` and `check HOST [METHOD PATH]`, run as the user runs them."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXECUTABLE, ProxyProcess, start_proxy
from tests.support.cli import run_cli
from tests.support.reload import config_file, wait_applied
from tests.upstream import Upstream

# A scripted editor: replaces the file it is given with $NEW_CONTENT, and records that it ran.
EDITOR_SCRIPT = """
import os, sys
path = sys.argv[1]
with open(os.environ["EDITOR_LOG"], "a") as log:
    log.write(path + "\\n")
with open(path, "w") as file:
    file.write(os.environ["NEW_CONTENT"])
"""


def edit(home: Path, tmp_path: Path, content: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "editor.py"
    script.write_text(EDITOR_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "VISUAL"))}
    env.update(
        HOME=str(home),
        EDITOR=f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}",
        NEW_CONTENT=content,
        EDITOR_LOG=str(tmp_path / "editor.log"),
    )
    return subprocess.run(
        [str(EXECUTABLE), "config", "edit"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_config_path_writes_the_example_once(home: Path) -> None:
    path = config_file(home)
    result = run_cli(home, "config", "path")
    assert result.returncode == 0
    assert result.stdout == f"{path}\n"
    assert "wrote" in result.stderr
    assert path.read_text().startswith("# claude-proxy's policy")
    path.write_text("defaults = false\n")
    again = run_cli(home, "config", "path")
    assert again.stderr == ""
    assert path.read_text() == "defaults = false\n"


def test_run_writes_the_example_where_none_is(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    proxy = start_proxy(home, upstream, upstream_ca_file)
    assert proxy.stop() == 0
    assert run_cli(home, "config", "check").stdout == (
        f"{config_file(home)}: valid, 0 rules of its own and the built-in defaults\n"
    )


@pytest.mark.parametrize(
    ("content", "code", "out"),
    [
        ("defaults = false\n[[allow]]\nhost = 'a.example'\n", 0, "valid, 1 rule of its own\n"),
        ("[[allow]]\nhost = 'a.example'\nport = 1\n", 2, ":3: [[allow]] has an unknown key"),
        ("[[allow]\n", 2, ":1:8: Expected ']]' at the end of an array declaration (TOML syntax)"),
        ("[[allow]]\nhost = 'a.example'\n[[allow]]\nhost='a.example'\n", 0, ":3: warning: "),
    ],
)
def test_config_check(home: Path, content: str, code: int, out: str) -> None:
    path = config_file(home)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    result = run_cli(home, "config", "check")
    assert result.returncode == code
    assert out in result.stdout
    assert path.read_text() == content


def test_config_check_another_file(home: Path, tmp_path: Path) -> None:
    other = tmp_path / "candidate.toml"
    other.write_text("[[deny]]\nhost = 'x.example'\nports = 'all'\n")
    result = run_cli(home, "config", "check", str(other))
    assert result.returncode == 2
    assert f"{other}:3: ports must be a list of port numbers" in result.stdout


def test_config_show_names_where_each_rule_comes_from(home: Path) -> None:
    path = config_file(home)
    path.parent.mkdir(parents=True)
    path.write_text(
        "[[allow]]\nhost = 'github.com'\nmethods = ['GET']\ncomment = 'read only'\n"
        "[[deny]]\nhost = 'gist.github.com'\n"
    )
    result = run_cli(home, "config", "show", "--allow", "localhost:8443")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0] == (
        f"# the policy: {path}, the built-in defaults and the --allow flags of the running "
        "claude-proxy"
    )
    rows = [" ".join(line.split()) for line in lines[1:]]
    assert rows[0] == "allow anthropic.com:443 built-in default"
    assert rows[6] == f"allow github.com:443 GET {' '.join(str(path).split())}:1 # read only"
    assert rows[7] == f"deny gist.github.com:* {' '.join(str(path).split())}:5"
    assert rows[8] == "allow localhost:8443 --allow"
    assert len(rows) == 9


def test_config_show_includes_the_running_proxys_flags(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    proxy = start_proxy(home, upstream, upstream_ca_file, "--allow", "localhost:8443")
    try:
        wait_applied(proxy, config_file(home).read_text())
        result = run_cli(home, "config", "show", "--port", str(proxy.port))
        assert (
            f"# the proxy on port {proxy.port} (pid {proxy.proc.pid}): this file is in force"
            in result.stdout.splitlines()
        )
        assert any(
            line.split()[:2] == ["allow", "localhost:8443"]
            and line.endswith(f"--allow (the proxy on port {proxy.port})")
            for line in result.stdout.splitlines()
        ), result.stdout
    finally:
        assert proxy.stop() == 0


def test_config_edit_installs_a_valid_edit(home: Path, tmp_path: Path) -> None:
    path = config_file(home)
    path.parent.mkdir(parents=True)
    path.write_text("defaults = true\n")
    path.chmod(0o640)
    inode = path.stat().st_ino
    new = "defaults = false\n[[allow]]\nhost = 'github.com'\n"
    result = edit(home, tmp_path, new)
    assert result.returncode == 0, result.stderr
    assert path.read_text() == new
    assert path.stat().st_mode & 0o777 == 0o640
    assert path.stat().st_ino != inode  # replaced in one rename
    edited = Path((tmp_path / "editor.log").read_text().strip())
    assert edited != path and edited.parent == path.parent  # the editor had a copy
    assert not edited.exists()
    assert sorted(p.name for p in path.parent.iterdir() if "config" in p.name) == ["config.toml"]


@pytest.mark.parametrize(
    "new", ["[[allow]]\nhost = '*.com'\n", "[[allow]\n", "[[allow]]\nhost = 'a.example'\nx = 1\n"]
)
def test_config_edit_refuses_an_invalid_edit(home: Path, tmp_path: Path, new: str) -> None:
    path = config_file(home)
    path.parent.mkdir(parents=True)
    path.write_text("defaults = true\n")
    result = edit(home, tmp_path, new)
    assert result.returncode == 2
    assert f"{path}:" in result.stderr
    assert f"the edit is not valid; {path} is unchanged" in result.stderr
    assert path.read_text() == "defaults = true\n"
    assert sorted(p.name for p in path.parent.iterdir() if "config" in p.name) == ["config.toml"]


def test_config_edit_of_a_missing_file_starts_from_the_example(home: Path, tmp_path: Path) -> None:
    result = edit(home, tmp_path, "defaults = false\n")
    assert result.returncode == 0, result.stderr
    assert config_file(home).read_text() == "defaults = false\n"


def test_config_edit_of_a_folder_says_it_is_a_folder(home: Path, tmp_path: Path) -> None:
    path = config_file(home)
    (path / "inside").mkdir(parents=True)
    result = edit(home, tmp_path, "defaults = false\n")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line == (
        f"claude-proxy: {path} is a folder, where config.toml must be a file: move the folder "
        f"aside (mv {shlex.quote(str(path))} {shlex.quote(str(path) + '.folder')}), then edit "
        "again"
    )
    assert not (tmp_path / "editor.log").exists()  # no editor was started
    assert [p.name for p in path.iterdir()] == ["inside"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.toml"]


def test_an_edit_reaches_the_running_proxy(
    home: Path, tmp_path: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    proxy: ProxyProcess = start_proxy(home, upstream, upstream_ca_file)
    try:
        new = "[[deny]]\nhost = 'claude.ai'\n"
        assert edit(home, tmp_path, new).returncode == 0
        wait_applied(proxy, new)
        assert run_cli(home, "status", "--port", str(proxy.port)).stdout.count("ok   config:") == 1
    finally:
        assert proxy.stop() == 0


@pytest.mark.parametrize(
    ("args", "code", "first_line"),
    [
        (["github.com"], 0, "allow github.com:443 (rule config.toml:1)"),
        (["github.com", "GET", "/repos/x?token=1"], 0, "allow github.com:443 GET /repos/x (rule"),
        (
            ["github.com", "POST", "/repos/x"],
            1,
            "refuse github.com:443 POST /repos/x: no rule allows POST /repos/x on github.com:443",
        ),
        (
            ["github.com", "GET", "/settings/keys"],
            1,
            "refuse github.com:443 GET /settings/keys: GET /settings/keys on github.com:443 is "
            "denied by the rule at config.toml:5",
        ),
        (["pinned.example"], 0, "allow pinned.example:443 (rule config.toml:9): passed through"),
        (
            ["pinned.example", "POST", "/x"],
            0,
            "allow pinned.example:443 (rule config.toml:9): "
            "passed through as it is, never decrypted (its requests are not seen)",
        ),
        (["api.anthropic.com"], 0, "allow api.anthropic.com:443 (rule *.anthropic.com)"),
        (["github.com", "GET"], 2, ""),
    ],
)
def test_check_uses_the_config_file(
    home: Path, args: list[str], code: int, first_line: str
) -> None:
    path = config_file(home)
    path.parent.mkdir(parents=True)
    path.write_text(
        "[[allow]]\nhost = 'github.com'\nmethods = ['GET']\n\n"
        "[[deny]]\nhost = 'github.com'\npaths = ['/settings']\n\n"
        "[[allow]]\nhost = 'pinned.example'\ninspect = false\n"
    )
    result = run_cli(home, "check", *args)
    assert result.returncode == code, result.stderr
    if first_line:
        assert result.stdout.splitlines()[0].startswith(first_line)
    if args == ["github.com"]:
        assert "each request is checked too" in result.stdout
        assert f"({path}:1)" in result.stdout


def test_check_with_a_broken_config_says_so(home: Path) -> None:
    path = config_file(home)
    path.parent.mkdir(parents=True)
    path.write_text("[[allow]]\nhost = 'github.com'\nports = ['443']\n")
    result = run_cli(home, "check", "github.com")
    assert result.returncode == 2
    assert f"{path}:3: ports must be a list" in result.stderr


def test_run_refuses_an_invalid_file(home: Path) -> None:
    path = config_file(home)
    path.parent.mkdir(parents=True)
    path.write_text("[[allow]]\nhost = '*.com'\n[[deny]]\nhost = 'x.example'\nport = 1\n")
    result = run_cli(home, "--port", "0", "--socks-port", "0")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{path}:2: host '*.com' is too broad")
    assert lines[1].startswith(f"{path}:5: [[deny]] has an unknown key 'port'")
    assert lines[2] == f"claude-proxy: {path} is not valid; fix it (`claude-proxy config edit`)"
