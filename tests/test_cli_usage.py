"""The command line as a user meets it: `env` for every shell, usage errors in one line with
exit 2, no traceback for any input, closed pipes, `--version`, help, completion, `--json`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EXECUTABLE


def cli(home: Path, *args: str, env: dict[str, str] | None = None,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    full = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    full.pop("SHELL", None)
    full.update(HOME=str(home), **(env or {}))
    return subprocess.run([str(EXECUTABLE), *args], env=full, capture_output=True, text=True,
                          timeout=60, input=stdin if stdin is not None else "")  # fmt: skip


def one_line_usage_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def cert(home: Path) -> Path:
    return home / ".config" / "claude-proxy" / "mitmproxy-ca-cert.pem"


# env


def test_env_bash_is_a_shell_and_its_lines_run_in_bash(ca_home: Path) -> None:
    result = cli(ca_home, "env", "--shell", "bash", "--port", "9999")
    assert result.returncode == 0, result.stderr
    show = "echo $HTTPS_PROXY $NODE_EXTRA_CA_CERTS"
    out = subprocess.run(["bash", "-c", result.stdout + show], capture_output=True, text=True)
    assert out.stdout.split() == ["http://127.0.0.1:9999", *str(cert(ca_home)).split()]


@pytest.mark.parametrize("shell", ["/usr/local/bin/bash", "/bin/dash", "/bin/ksh"])
def test_env_follows_a_posix_shell_in_shell(ca_home: Path, shell: str) -> None:
    result = cli(ca_home, "env", env={"SHELL": shell})
    assert result.returncode == 0 and "export HTTPS_PROXY=" in result.stdout


def test_env_refuses_a_shell_it_cannot_write_for(ca_home: Path) -> None:
    line = one_line_usage_error(cli(ca_home, "env", env={"SHELL": "/bin/tcsh"}))
    assert "tcsh" in line and "sh, bash, zsh, fish, nu" in line and "--shell" in line
    line = one_line_usage_error(cli(ca_home, "env", "--shell", "csh"))
    assert "csh" in line and "bash" in line


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_env_puts_an_ipv6_host_in_brackets(ca_home: Path, host: str) -> None:
    result = cli(ca_home, "env", "--shell", "sh", "--host", host, "--port", "9999")
    assert result.returncode == 0, result.stderr
    assert "export HTTPS_PROXY='http://[::1]:9999'" in result.stdout.splitlines()
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "--max-time", "5", "--proxy", "http://[::1]:1",
         "https://api.anthropic.com/"], capture_output=True, text=True,
    )  # fmt: skip
    assert "URL" not in out.stderr  # curl takes the form env prints (it then finds no proxy)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--port", "0"], "1-65535"),
        (["--port", "99999"], "1-65535"),
        (["--host", "a b"], "'a b'"),
        (["--host", "example.com/x"], "example.com/x"),
        (["--host", ""], "''"),
    ],
)
def test_env_refuses_a_bad_host_or_port(ca_home: Path, args: list[str], says: str) -> None:
    result = cli(ca_home, "env", *args)
    assert says in one_line_usage_error(result)
    assert result.stdout == ""


def test_env_tools_makes_the_bundle_it_names(ca_home: Path) -> None:
    bundle = ca_home / ".config" / "claude-proxy" / "ca-bundle.pem"
    assert not bundle.exists()
    result = cli(ca_home, "env", "--shell", "sh", "--tools")
    assert result.returncode == 0, result.stderr
    assert f"export CURL_CA_BUNDLE='{bundle}'" in result.stdout.splitlines()
    assert cert(ca_home).read_text().strip() in bundle.read_text()


def test_env_tools_without_a_ca_fails_and_prints_nothing(home: Path) -> None:
    result = cli(home, "env", "--tools")
    assert result.returncode == 4, result
    assert result.stdout == ""
    assert "claude-proxy ca" in result.stderr and "Traceback" not in result.stderr


def test_env_clears_no_proxy_unless_told(ca_home: Path) -> None:
    env = {"NO_PROXY": "*", "no_proxy": "*"}
    lines = cli(ca_home, "env", "--shell", "sh", env=env).stdout
    out = subprocess.run(["sh", "-c", lines + 'echo "[$NO_PROXY][$no_proxy]"'],
                         env={**os.environ, **env}, capture_output=True, text=True)  # fmt: skip
    assert out.stdout.strip() == "[][]"  # nothing inherited bypasses the proxy
    lines = cli(ca_home, "env", "--shell", "sh", "--no-proxy", "localhost,127.0.0.1").stdout
    out = subprocess.run(["sh", "-c", lines + 'echo "$NO_PROXY $no_proxy"'],
                         capture_output=True, text=True)  # fmt: skip
    assert out.stdout.split() == ["localhost,127.0.0.1"] * 2


# check


def test_check_takes_a_url(home: Path) -> None:
    result = cli(home, "check", "https://api.anthropic.com/v1/messages")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("allow api.anthropic.com:443 GET /v1/messages")
    result = cli(home, "check", "POST", "https://api.anthropic.com/v1/messages?beta=true")
    assert result.stdout.startswith("allow api.anthropic.com:443 POST /v1/messages")
    result = cli(home, "check", "http://api.anthropic.com/")
    assert result.returncode == 1
    assert result.stdout.startswith("refuse http://api.anthropic.com:80")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["*.anthropic.com"], "a rule"),
        ([], "claude-proxy check"),
        (["api.anthropic.com", "GET"], "METHOD and PATH"),
        (["ftp://api.anthropic.com/"], "https://"),
        (["exa mple.com"], "exa mple.com"),
    ],
)
def test_check_usage_errors_are_one_line(home: Path, args: list[str], says: str) -> None:
    result = cli(home, "check", *args)
    assert says in one_line_usage_error(result)
    assert result.stdout == ""


def test_check_json(home: Path) -> None:
    result = cli(home, "check", "--json", "POST", "https://api.anthropic.com/v1/messages")
    assert result.returncode == 0
    document = json.loads(result.stdout)
    assert document["allowed"] is True
    assert document["host"] == "api.anthropic.com" and document["port"] == 443
    assert document["request"] == {"method": "POST", "path": "/v1/messages"}
    assert document["rule"] == "*.anthropic.com"
    refused = json.loads(cli(home, "check", "--json", "example.com").stdout)
    assert refused["allowed"] is False and "allowlist" in refused["reason"]


# config


def test_config_check_of_a_missing_file_fails(home: Path) -> None:
    result = cli(home, "config", "check", "/nonexistent.toml")
    assert result.returncode == 2
    assert "/nonexistent.toml does not exist" in result.stderr


def test_a_missing_editor_is_named(home: Path) -> None:
    result = cli(home, "config", "edit", env={"EDITOR": "nonexistent-editor", "VISUAL": ""})
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "nonexistent-editor" in line and "$EDITOR" in line
    config = home / ".config" / "claude-proxy" / "config.toml"
    assert not list(config.parent.glob(".config.edit-*"))  # no copy left behind


def test_config_show_json(home: Path) -> None:
    result = cli(home, "config", "show", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    rules = {rule["rule"]: rule for rule in document["rules"]}
    assert rules["*.anthropic.com"]["action"] == "allow"
    assert rules["*.anthropic.com"]["origin"] == "built-in default"
    assert document["ports"]["http"] == 9051 and document["ports"]["source"] == "the defaults"


# closed pipes: quiet, with the exit a Unix tool killed by SIGPIPE has


def closed_pipe(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run with stdout a pipe whose reading end is already closed: every write fails."""
    read, write = os.pipe()
    os.close(read)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    try:
        return subprocess.run([str(EXECUTABLE), *args], env={**env, "HOME": str(home)},
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)  # fmt: skip
    finally:
        os.close(write)


@pytest.fixture(scope="module")
def audited_home(made_ca: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A HOME whose audit log has a refusal in it, written by the real proxy."""
    from tests.conftest import ProxyProcess, curl

    home = tmp_path_factory.mktemp("audited") / "home"
    shutil.copytree(made_ca, home)
    proxy = ProxyProcess(home, ["--port", "0"], {}).wait_listening()
    try:
        assert curl(proxy, "https://example.com/").returncode != 0
    finally:
        assert proxy.stop() == 0
    yield home


@pytest.mark.parametrize(
    "args",
    [["log", "--json"], ["log", "--suggest"], ["log"], ["setup", "srt", "--dry-run"],
     ["config", "show"], ["completion", "bash"], ["--help"]],
)  # fmt: skip
def test_a_closed_pipe_ends_quietly(audited_home: Path, args: list[str]) -> None:
    result = closed_pipe(audited_home, *args)
    assert result.stderr == ""
    # 128 + SIGPIPE, as `yes | head -1` gives yes; argparse's help ignores a closed pipe itself
    assert result.returncode == (0 if args == ["--help"] else 141)


# run, setup


def test_run_names_the_host_that_is_not_loopback(home: Path) -> None:
    result = cli(home, "run", "--host", "10.1.2.3", "--port", "0", "--socks-port", "0")
    line = one_line_usage_error(result)
    assert "10.1.2.3" in line and "all addresses" not in line and "--expose-to-network" in line


def test_setup_ports_say_what_they_take(home: Path) -> None:
    for port in ("0", "x"):
        result = cli(home, "setup", "claude-code", "--port", port, "--dry-run")
        line = one_line_usage_error(result)
        assert "1-65535" in line and "picks" not in line
    help_text = cli(home, "setup", "claude-code", "--help").stdout
    assert "picks" not in help_text and "1-65535" in help_text


def test_a_missing_config_dir_is_refused(home: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no such folder"
    result = cli(home, "run", "--config-dir", str(missing), "--port", "0", "--socks-port", "0")
    line = one_line_usage_error(result)
    assert str(missing) in line and "mkdir" in line
    assert not missing.exists()


def test_a_plist_for_a_missing_config_dir_is_refused(home: Path, tmp_path: Path) -> None:
    """The agent would not start with it: `run` refuses a --config-dir that is not there."""
    missing = tmp_path / "no such folder"
    output = tmp_path / "agent.plist"
    result = cli(home, "plist", "--executable", str(EXECUTABLE), "--config-dir", str(missing),
                 "--output", str(output))  # fmt: skip
    line = one_line_usage_error(result)
    assert str(missing) in line and "mkdir" in line and "claude-proxy paths" in line
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == [home.name]  # no plist, no folder


def test_a_ca_folder_with_only_dhparam_keeps_config_toml(home: Path) -> None:
    confdir = home / ".config" / "claude-proxy"
    confdir.mkdir(parents=True)
    (confdir / "mitmproxy-dhparam.pem").write_text("dh")
    (confdir / "config.toml").write_text("")
    result = cli(home, "ca")
    assert result.returncode == 4
    assert "mitmproxy-dhparam.pem" in result.stderr
    assert "move the folder" not in result.stderr and "config.toml" in result.stderr


# damaged state files name their fix


@pytest.mark.parametrize(
    ("name", "args", "fix"),
    [
        ("organizations.json", ["orgs"], "mv "),
        ("pin.json", ["orgs"], "claude-proxy pin --off"),
        ("audit.db", ["log"], "mv "),
    ],
)
def test_a_damaged_state_file_names_its_fix(
    home: Path, name: str, args: list[str], fix: str
) -> None:
    state = home / ".local" / "state" / "claude-proxy"
    state.mkdir(parents=True)
    (state / name).write_bytes(b"\x00not what it should be" * 100)
    result = cli(home, *args)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert name in line and fix in line


# conventions


def test_version(home: Path) -> None:
    from importlib.metadata import version

    result = cli(home, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"claude-proxy {version('claude-proxy')}"


SUBCOMMANDS = ["run", "ca", "env", "check", "config", "plist", "status", "paths", "log",
               "setup", "orgs", "pin", "completion"]  # fmt: skip


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_a_description_an_example_and_option_help(
    home: Path, command: str
) -> None:
    from claude_proxy.cli import main as module

    result = cli(home, command, "--help")
    assert result.returncode == 0
    assert re.search(r"(?m)^examples?:\n  .*claude-proxy ", result.stdout), result.stdout
    parser = module.build_parser()
    for action in module.subparser(parser, command)._actions:
        assert action.help, f"{command}: {action.option_strings or action.dest} has no help"


def test_a_misspelt_command_gets_a_suggestion(home: Path) -> None:
    line = one_line_usage_error(cli(home, "stauts"))
    assert "did you mean" in line and "status" in line
    line = one_line_usage_error(cli(home, "config", "shwo"))
    assert "show" in line


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_load_in_their_shells(home: Path, shell: str) -> None:
    runner = [shell, "-c"]
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed (.ci/run installs it)")
    script = cli(home, "completion", shell)
    assert script.returncode == 0
    assert "status" in script.stdout and "socks-port" in script.stdout
    load = {"bash": "source /dev/stdin", "zsh": "autoload -U compinit; compinit -u; "
            "source /dev/stdin", "fish": "source"}[shell]  # fmt: skip
    out = subprocess.run([*runner, load], input=script.stdout, capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert out.returncode == 0, (shell, out.stderr)


def test_bash_completion_completes_commands_and_options(home: Path) -> None:
    script = cli(home, "completion", "bash").stdout
    probe = (
        script + "\nCOMP_WORDS=(claude-proxy sta); COMP_CWORD=1; _claude_proxy; "
        'echo "${COMPREPLY[@]}"\n'
        "COMP_WORDS=(claude-proxy status --so); COMP_CWORD=2; _claude_proxy; "
        'echo "${COMPREPLY[@]}"\n'
        "COMP_WORDS=(claude-proxy setup ''); COMP_CWORD=2; _claude_proxy; "
        'echo "${COMPREPLY[@]}"\n'
    )
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    first, second, third = out.stdout.splitlines()
    assert first.split() == ["status"]
    assert second.split() == ["--socks-port"]
    assert sorted(third.split()) == ["claude-code", "srt", "undo-all"]


def test_completion_of_an_unknown_shell_is_a_usage_error(home: Path) -> None:
    assert "bash, zsh, fish" in one_line_usage_error(cli(home, "completion", "tcsh"))


def test_usage_errors_are_one_line(home: Path) -> None:
    for args in (["env", "--port", "x"], ["log", "--since", "yesterday"], ["status", "--bogus"]):
        line = one_line_usage_error(cli(home, *args))
        assert line.startswith("claude-proxy"), line
        assert "--help" in line


def test_python_m_runs_the_same_cli(home: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "claude_proxy", "--version"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.stdout.startswith("claude-proxy ")


@pytest.mark.parametrize(
    ("command", "code", "said"),
    [("plist", 2, "standard output is closed: pass --output FILE"), ("completion bash", 0, "")],
)
def test_a_closed_standard_output_is_no_traceback(
    home: Path, command: str, code: int, said: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    result = subprocess.run(
        ["bash", "-c", f"exec {EXECUTABLE} {command} >&-"],
        env={**env, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == code, result.stderr
    assert result.stderr == (f"claude-proxy: {said}\n" if said else "")


@pytest.mark.parametrize("command", [("env", "--shell", "sh"), ("check", "api.anthropic.com"),
                                     ("config", "check"), ("status",)])  # fmt: skip
def test_a_config_toml_that_is_a_fifo_is_refused_not_waited_on(
    home: Path, command: tuple[str, ...]
) -> None:
    path = home / ".config" / "claude-proxy" / "config.toml"
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    result = cli(home, *command)  # a hang fails by the subprocess timeout
    if command[0] == "env":
        assert result.returncode == 0  # the ports come from elsewhere; env still answers
    else:
        assert result.returncode != 0
        assert "not a regular file" in result.stdout + result.stderr


def test_log_of_an_audit_database_that_is_a_folder_names_the_fix(home: Path) -> None:
    (home / ".local" / "state" / "claude-proxy" / "audit.db").mkdir(parents=True)
    result = cli(home, "log")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "it is not a file" in line and "mv " in line
