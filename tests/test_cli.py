"""The small commands: ca, env, check; and the shell lines env prints, run by real shells."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from claude_proxy.cli import main
from tests.support.cli import run_cli


def test_ca_prints_path_and_fingerprints(home: Path) -> None:
    result = run_cli(home, "ca")
    assert result.returncode == 0
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    cert = Path(lines["certificate"].strip())
    assert cert == home / ".config" / "claude-proxy" / "mitmproxy-ca-cert.pem"
    sha1 = run_cli(home, "ca", "--sha1").stdout.strip()
    assert len(sha1) == 40 and sha1 == sha1.upper()
    assert lines["SHA-1"].strip().replace(":", "") == sha1
    openssl = shutil.which("openssl")
    if openssl:
        out = subprocess.run(
            [openssl, "x509", "-in", str(cert), "-noout", "-fingerprint", "-sha256"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert out.strip().split("=", 1)[1] == lines["SHA-256"].strip()


def test_ca_honours_xdg_config_home(home: Path, tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    result = subprocess.run(
        [*run_cli_args(), "ca", "--sha1"],
        env={"HOME": str(home), "XDG_CONFIG_HOME": str(xdg), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert len(result.stdout.strip()) == 40
    assert (xdg / "claude-proxy" / "mitmproxy-ca.pem").exists()


def run_cli_args() -> list[str]:
    from tests.conftest import EXECUTABLE

    return [str(EXECUTABLE)]


@pytest.mark.parametrize("shell", ["sh", "bash", "zsh", "fish"])
def test_env_lines_run_in_their_shell(home: Path, shell: str) -> None:
    program = shutil.which(shell)
    if program is None:
        pytest.skip(f"{shell} is not installed")
    flag = "fish" if shell == "fish" else "sh" if shell in ("sh", "bash") else "zsh"
    assert run_cli(home, "ca").returncode == 0
    lines = run_cli(home, "env", "--shell", flag, "--port", "9999").stdout
    show = "echo $HTTPS_PROXY $HTTP_PROXY $NODE_EXTRA_CA_CERTS"
    out = subprocess.run([program, "-c", lines + show], capture_output=True, text=True).stdout
    cert = home / ".config" / "claude-proxy" / "mitmproxy-ca-cert.pem"
    assert out.split() == ["http://127.0.0.1:9999", "http://127.0.0.1:9999", *str(cert).split()]


def test_env_warns_when_the_ca_is_missing(home: Path) -> None:
    result = run_cli(home, "env", "--shell", "sh")
    assert result.returncode == 0
    assert "run `claude-proxy ca`" in result.stderr
    assert not (home / ".config" / "claude-proxy").exists()  # env changes nothing


@pytest.mark.parametrize(
    ("value", "shell", "line"),
    [
        ("/a b/c'd", "sh", "export X='/a b/c'\\''d'"),
        ("/a b/c'd", "fish", "set -gx X '/a b/c\\'d'"),
        ('/a "b"', "nu", '$env.X = "/a \\"b\\""'),
    ],
)
def test_export_line_quotes(value: str, shell: str, line: str) -> None:
    assert main.export_line(shell, "X", value) == line


@pytest.mark.parametrize(
    ("args", "code", "out"),
    [
        (["api.anthropic.com"], 0, "allow api.anthropic.com:443 (rule *.anthropic.com)"),
        (["claude.ai:443"], 0, "allow claude.ai:443 (rule claude.ai)"),
        (["example.com"], 1, "refuse example.com:443: example.com is not on the allowlist"),
        (["api.anthropic.com:80"], 1, "refuse api.anthropic.com:80: port 80 is not allowed"),
        (["localhost:8443", "--allow", "localhost:8443"], 0, "allow localhost:8443"),
    ],
)
def test_check(
    args: list[str],
    code: int,
    out: str,
    capsys: pytest.CaptureFixture[str],
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOME", str(home))  # no config.toml: the built-in defaults
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert main.main(["check", *args]) == code
    assert capsys.readouterr().out.startswith(out)


def test_check_bad_destination(capsys: pytest.CaptureFixture[str]) -> None:
    assert main.main(["check", "example.com:http"]) == 2
    assert "bad port" in capsys.readouterr().err
