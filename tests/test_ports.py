"""Every command agrees on where the proxy listens: --port/--socks-port, else the running proxy
(its run-state file), else the installed agent's plist, else [listen] in config.toml, else the
defaults. And `status` off macOS is decided by the listeners, the CA and the settings."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import EXECUTABLE, ProxyProcess, start_proxy
from tests.support.cli import run_cli
from tests.support.ports import free_port
from tests.upstream import Upstream


def write_listen(home: Path, port: int, socks_port: int) -> Path:
    path = home / ".config" / "claude-proxy" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"[listen]\nport = {port}\nsocks_port = {socks_port}\n")
    return path


def env_proxy(home: Path, *args: str) -> str:
    result = run_cli(home, "env", "--shell", "sh", *args)
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("export HTTPS_PROXY="))
    return line.split("=", 1)[1].strip("'")


def settings_ports(result: subprocess.CompletedProcess[str]) -> tuple[int, int]:
    text = result.stdout
    http = next(x for x in text.splitlines() if '"httpProxyPort"' in x)
    socks = next(x for x in text.splitlines() if '"socksProxyPort"' in x)
    return int(http.split(":")[1].strip(" ,")), int(socks.split(":")[1].strip(" ,"))


def test_every_command_takes_the_ports_from_config_toml(home: Path) -> None:
    port, socks_port = free_port(), free_port()
    write_listen(home, port, socks_port)
    assert env_proxy(home) == f"http://127.0.0.1:{port}"
    status = run_cli(home, "status")
    assert f"FAIL proxy on 127.0.0.1:{port}:" in status.stdout
    assert f"FAIL SOCKS5 on 127.0.0.1:{socks_port}:" in status.stdout
    assert "[listen] in" in status.stdout
    dry = run_cli(home, "setup", "claude-code", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert settings_ports(dry) == (port, socks_port)
    assert "[listen]" in dry.stderr
    shown = json.loads(run_cli(home, "config", "show", "--json").stdout)
    assert (shown["ports"]["http"], shown["ports"]["socks"]) == (port, socks_port)


def test_setup_keeps_the_ports_config_toml_names(home: Path) -> None:
    port, socks_port = free_port(), free_port()
    write_listen(home, port, socks_port)
    assert run_cli(home, "setup", "claude-code", "--yes").returncode == 0
    settings = json.loads((home / ".claude" / "settings.json").read_text())
    network = settings["sandbox"]["network"]
    assert (network["httpProxyPort"], network["socksProxyPort"]) == (port, socks_port)
    again = run_cli(home, "setup", "claude-code", "--dry-run")
    assert "already has these settings: nothing to change" in again.stdout  # not back to 9051


def test_every_command_finds_the_running_proxy(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    listen = free_port()
    write_listen(home, listen, free_port())  # the proxy below runs on other ports
    proxy = start_proxy(home, upstream, upstream_ca_file, "--socks-port", "0")
    try:
        assert env_proxy(home) == f"http://127.0.0.1:{proxy.port}"
        env = run_cli(home, "env", "--shell", "sh")
        assert f"[listen] in {home}/.config/claude-proxy/config.toml says HTTP {listen}" in (
            env.stderr
        )
        assert "applies at its next start" in env.stderr
        status = run_cli(home, "status")
        assert f"ok   proxy on 127.0.0.1:{proxy.port}:" in status.stdout, status.stdout
        assert f"ok   SOCKS5 on 127.0.0.1:{proxy.socks_port}:" in status.stdout
        assert "the running proxy (pid" in status.stdout
        dry = run_cli(home, "setup", "srt", "--dry-run")
        assert settings_ports(dry) == (proxy.port, proxy.socks_port)
        shown = run_cli(home, "config", "show")
        assert f"# the proxy on port {proxy.port} (pid" in shown.stdout
        assert env_proxy(home, "--port", "9999") == "http://127.0.0.1:9999"  # a flag wins
    finally:
        assert proxy.stop() == 0


def paths_ports(home: Path, *args: str) -> tuple[int, int]:
    result = run_cli(home, "paths", *args)
    assert result.returncode == 0, result.stderr
    values = dict(shlex.split(line)[0].split("=", 1) for line in result.stdout.splitlines())
    return int(values["PORT"]), int(values["SOCKS_PORT"])


def test_paths_takes_the_ports_as_every_command_does(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    assert paths_ports(home) == (9051, 9052)
    listen = free_port(), free_port()
    write_listen(home, *listen)
    assert paths_ports(home) == listen
    plist = home / "Library" / "LaunchAgents" / "local.claude-proxy.plist"
    plist.parent.mkdir(parents=True)
    agent = free_port(), free_port()
    rendered = run_cli(home, "plist", "--executable", str(EXECUTABLE), "--port", str(agent[0]),
                       "--socks-port", str(agent[1]), "--output", str(plist))  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    assert paths_ports(home) == agent  # the installed agent's plist outranks [listen]
    proxy = start_proxy(home, upstream, upstream_ca_file, "--socks-port", "0")
    try:
        assert paths_ports(home) == (proxy.port, proxy.socks_port)  # the running proxy, first
        assert paths_ports(home, "--installed") == agent  # what the installed agent is told
    finally:
        assert proxy.stop() == 0


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--port", "19051", "--socks-port", "19051"],
        ["setup", "claude-code", "--dry-run", "--port", "19052", "--socks-port", "19052"],
        ["setup", "srt", "--dry-run", "--port", "9052"],  # the default SOCKS port
        ["env", "--port", "9052"],
        ["run", "--port", "9052"],
        ["plist", "--port", "9052"],
    ],
)
def test_the_http_port_and_the_socks_port_must_differ(home: Path, args: list[str]) -> None:
    result = run_cli(home, *args)
    assert result.returncode == 2, result
    assert "must differ" in result.stderr and "Traceback" not in result.stderr


def test_config_toml_with_one_port_for_both_is_refused(home: Path) -> None:
    path = write_listen(home, 19051, 19051)
    result = run_cli(home, "config", "check")
    assert result.returncode == 2
    assert f"{path}:3: socks_port must differ from port" in result.stdout


def test_status_off_macos_needs_no_agent(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    proxy: ProxyProcess = start_proxy(home, upstream, upstream_ca_file, "--socks-port", "0")
    try:
        ports = ("--port", str(proxy.port), "--socks-port", str(proxy.socks_port))
        assert run_cli(home, "setup", "claude-code", "--yes", *ports).returncode == 0
        status = run_cli(home, "status", "--project", str(home), "--json")
        document = json.loads(status.stdout)
        rows = {row["what"]: row for row in document["checks"]}
        assert rows["agent"] == {"ok": True, "what": "agent",
                                 "detail": "not macOS: no launchd agent", "fix": ""}  # fmt: skip
        assert [r for r in document["checks"] if not r["ok"]] == []
        assert status.returncode == 0 and document["ok"] is True
    finally:
        assert proxy.stop() == 0


def test_a_run_state_left_behind_by_a_proxy_that_is_gone_is_not_believed(home: Path) -> None:
    """A state file whose process id now names another process (after a SIGKILL or a reboot):
    its port is not listened on, so `env` and `status` take the next source, not that port."""
    port, socks_port = free_port(), free_port()
    state = home / ".local" / "state" / "claude-proxy" / f"proxy-{port}.json"
    state.parent.mkdir(parents=True)
    state.write_text(
        json.dumps(
            {
                "pid": 1,
                "port": port,
                "config": "",
                "digest": "",
                "loaded_at": 0.0,
                "rules": 0,
                "error": None,
                "flags": [],
                "socks_port": socks_port,
            }
        )
    )
    assert f":{port}" not in env_proxy(home)
    assert env_proxy(home).endswith(":9051")


def test_env_takes_the_socks_port_too(home: Path) -> None:
    """The SOCKS port the user names frees the default one for the HTTP listener."""
    assert env_proxy(home, "--port", "9052", "--socks-port", "9053").endswith(":9052")
    result = run_cli(home, "env", "--shell", "sh", "--port", "9052")
    assert result.returncode == 2 and "--socks-port" in result.stderr
