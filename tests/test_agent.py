"""The always-on agent: the plist, the install/uninstall scripts, the agent as launchd runs it."""

from __future__ import annotations

import os
import plistlib
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from claude_proxy import agent
from tests.conftest import EXECUTABLE as DEV_EXE
from tests.conftest import ProxyProcess, curl
from tests.macos import ROOT, SCRIPTS, Mac
from tests.test_service import run_cli

TEMPLATE = ROOT / "launchd" / "local.claude-proxy.plist"

GOLDEN = {
    "Label": "local.claude-proxy",
    "ProgramArguments": [
        "/Users/a & b/.local/bin/claude-proxy",
        "run",
        "--port",
        "9051",
        "--socks-port",
        "9052",
        "--quiet",
    ],
    "RunAtLoad": True,
    "KeepAlive": {"SuccessfulExit": False},
    "ThrottleInterval": 10,
    "ProcessType": "Interactive",
    "EnvironmentVariables": {
        "HOME": "/Users/a & b",
        "PATH": "/Users/a & b/.local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "LANG": "en_US.UTF-8",
        "PYTHONUNBUFFERED": "1",
    },
    "WorkingDirectory": "/Users/a & b",
    "StandardOutPath": "/Users/a & b/Library/Logs/claude-proxy/launchd.stdout.log",
    "StandardErrorPath": "/Users/a & b/Library/Logs/claude-proxy/launchd.stderr.log",
    "SoftResourceLimits": {"NumberOfFiles": 4096},
}


def render(home: str = "/Users/a & b", port: int = 9051) -> bytes:
    return agent.render_plist(
        TEMPLATE.read_bytes(),
        executable=Path(home) / ".local" / "bin" / "claude-proxy",
        home=Path(home),
        log_dir=Path(home) / "Library" / "Logs" / "claude-proxy",
        port=port,
        socks_port=9052,
    )


def test_template_is_itself_a_valid_plist() -> None:
    template = plistlib.loads(TEMPLATE.read_bytes())
    assert template["Label"] == "local.claude-proxy"
    assert "@EXECUTABLE@" in template["ProgramArguments"]


def test_rendered_plist_is_the_golden_one() -> None:
    assert plistlib.loads(render()) == GOLDEN


def test_rendered_plist_escapes_and_holds_absolute_paths_only() -> None:
    text = render().decode()
    assert "/Users/a &amp; b" in text and "/Users/a & b" not in text
    assert "@" not in text and "~" not in text and "$HOME" not in text
    document = plistlib.loads(render("/Users/x/<odd> & 'quoted'", port=8123))
    assert document["EnvironmentVariables"]["HOME"] == "/Users/x/<odd> & 'quoted'"
    assert document["ProgramArguments"][3] == "8123"
    paths = [document["WorkingDirectory"], document["StandardOutPath"],
             document["StandardErrorPath"], document["ProgramArguments"][0]]  # fmt: skip
    assert all(p.startswith("/") for p in paths)


def test_render_refuses_a_relative_executable() -> None:
    with pytest.raises(agent.ProxyError, match="absolute path"):
        agent.render_plist(
            TEMPLATE.read_bytes(),
            executable=Path("claude-proxy"),
            home=Path("/Users/a"),
            log_dir=Path("/Users/a/Library/Logs/claude-proxy"),
            port=9051,
            socks_port=9052,
        )


def test_plist_command_writes_0644(home: Path) -> None:
    out = home / "agent.plist"
    result = run_cli(home, "plist", "--template", str(TEMPLATE), "--port", "9123",
                     "--output", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    document = plistlib.loads(out.read_bytes())
    assert document["ProgramArguments"][3] == "9123"
    assert document["EnvironmentVariables"]["HOME"] == str(home)


# The scripts, with recording stand-ins for macOS's programs


@pytest.fixture
def mac(tmp_path: Path, home: Path) -> Mac:
    return Mac(tmp_path, home)


@pytest.fixture
def serving(mac: Mac) -> Iterator[ProxyProcess]:
    """A real claude-proxy on the agent's port, as launchd would have started it."""
    process = ProxyProcess(mac.home, ["--port", "0", "--socks-port", "0"], {}).wait_listening()
    yield process
    process.stop()


def install_calls(mac: Mac, *, trust: bool = True, bootout: int = 1) -> list[str]:
    domain = f"gui/{mac.uid}"
    calls = ["uname -s", "plutil -lint ~/Library/LaunchAgents/local.claude-proxy.plist"]
    calls += [f"launchctl bootout {domain}/local.claude-proxy"] * bootout
    calls += [
        f"launchctl enable {domain}/local.claude-proxy",
        f"launchctl bootstrap {domain} ~/Library/LaunchAgents/local.claude-proxy.plist",
        f"launchctl kickstart -k {domain}/local.claude-proxy",
        "security trust-settings-export <tmp>",
    ]
    if trust:
        calls.append(
            "security add-trusted-cert -r trustRoot -p ssl -p basic -k "
            "~/Library/Keychains/login.keychain-db ~/.config/claude-proxy/mitmproxy-ca-cert.pem"
        )
    return calls


def test_install(mac: Mac, serving: ProxyProcess) -> None:
    result = mac.run("install-agent.sh", "--port", str(serving.port))
    assert result.returncode == 0, result.stderr
    assert mac.calls() == install_calls(mac)
    assert stat.S_IMODE(mac.plist.stat().st_mode) == 0o644
    document = plistlib.loads(mac.plist.read_bytes())
    assert document["ProgramArguments"] == [str(mac.exe), "run", "--port", str(serving.port),
                                            "--socks-port", "9052", "--quiet"]  # fmt: skip
    assert (mac.home / "Library" / "Logs" / "claude-proxy").is_dir()
    assert "export HTTPS_PROXY='http://127.0.0.1:" in result.stdout
    assert "NODE_EXTRA_CA_CERTS" in result.stdout


def test_second_install_with_everything_in_place(mac: Mac, serving: ProxyProcess) -> None:
    assert mac.run("install-agent.sh", "--port", str(serving.port)).returncode == 0
    sha1 = run_cli(mac.home, "ca", "--sha1").stdout.strip()
    mac.set("trusted-sha1", sha1)
    mac.answer("launchctl", "bootout", 0)  # loaded: it stops
    result = mac.run("install-agent.sh", "--port", str(serving.port))
    assert result.returncode == 0, result.stderr
    assert mac.calls() == install_calls(mac, trust=False)
    assert f"already trusts this CA (SHA-1 {sha1})" in result.stderr


@pytest.mark.parametrize(
    ("bootout", "bootstrap", "bootouts", "bootstraps"),
    [
        ((3,), (0,), 1, 1),
        ((113,), (0,), 1, 1),
        ((36, 36, 0), (0,), 3, 1),  # still stopping: wait
        ((0,), (5, 0), 1, 2),  # already loaded: once more
        ((0,), (37, 0), 1, 2),
    ],
)
def test_install_tolerates_launchctl_states(
    mac: Mac, serving: ProxyProcess, bootout: tuple[int, ...], bootstrap: tuple[int, ...],
    bootouts: int, bootstraps: int,
) -> None:  # fmt: skip
    mac.answer("launchctl", "bootout", *bootout)
    mac.answer("launchctl", "bootstrap", *bootstrap)
    result = mac.run("install-agent.sh", "--port", str(serving.port), "--no-keychain")
    assert result.returncode == 0, result.stderr
    calls = mac.calls()
    assert sum(c.startswith("launchctl bootout") for c in calls) == bootouts
    assert sum(c.startswith("launchctl bootstrap") for c in calls) == bootstraps
    assert calls[-1].startswith("launchctl kickstart -k")


@pytest.mark.parametrize(
    ("bootstrap", "message"),
    [
        ((119,), "the agent is disabled"),
        ((125,), "no GUI session"),
        ((5, 5), "launchctl bootstrap"),
        ((1,), "failed with 1"),
    ],
)
def test_install_stops_on_launchctl_failure(
    mac: Mac, bootstrap: tuple[int, ...], message: str
) -> None:
    mac.answer("launchctl", "bootstrap", *bootstrap)
    result = mac.run("install-agent.sh", "--no-keychain")
    assert result.returncode == 1
    assert message in result.stderr.strip().splitlines()[-1]
    assert not any(c.startswith("launchctl kickstart") for c in mac.calls())


def test_install_over_ssh_skips_the_keychain_with_instructions(
    mac: Mac, serving: ProxyProcess
) -> None:
    result = mac.run("install-agent.sh", "--port", str(serving.port),
                     SSH_CONNECTION="10.0.0.1 5000 10.0.0.2 22")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not any("add-trusted-cert" in c for c in mac.calls())
    assert "security add-trusted-cert -r trustRoot -p ssl -p basic -k" in result.stderr


def test_install_keychain_refusal_is_reported(mac: Mac, serving: ProxyProcess) -> None:
    mac.answer("security", "add-trusted-cert", 1)
    result = mac.run("install-agent.sh", "--port", str(serving.port))
    assert result.returncode == 1
    assert "the CA is not trusted yet" in result.stderr
    assert "export HTTPS_PROXY=" in result.stdout  # the rest was done


def test_install_reports_an_agent_that_does_not_answer(mac: Mac) -> None:
    logs = mac.home / "Library" / "Logs" / "claude-proxy"
    logs.mkdir(parents=True)
    (logs / "launchd.stderr.log").write_text("claude-proxy: cannot listen: the port is in use\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # a port where nothing answers as claude-proxy
        port = taken.getsockname()[1]
    result = mac.run("install-agent.sh", "--port", str(port), "--no-keychain")
    assert result.returncode == 1
    assert "cannot listen: the port is in use" in result.stderr
    assert "the agent did not start" in result.stderr


def test_install_dry_run_changes_nothing(mac: Mac) -> None:
    before = sorted(p.relative_to(mac.home) for p in mac.home.rglob("*"))
    result = mac.run("install-agent.sh", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert sorted(p.relative_to(mac.home) for p in mac.home.rglob("*")) == before
    assert not mac.tools.exists()
    assert mac.calls() == ["uname -s"]
    for step in ("uv tool install --reinstall", "launchctl bootout", "launchctl bootstrap",
                 "add-trusted-cert", "plist --template"):  # fmt: skip
        assert f"would run: {step}" in result.stderr or step in result.stderr


def test_install_refuses_other_systems_and_bad_options(mac: Mac) -> None:
    mac.set("uname", "Linux")
    result = mac.run("install-agent.sh")
    assert result.returncode == 1 and "for macOS" in result.stderr
    mac.set("uname", "Darwin")
    for args in (["--port", "http"], ["--port", "70000"], ["--frobnicate"]):
        result = mac.run("install-agent.sh", *args)
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1


def uninstall_keychain_calls(mac: Mac, sha1: str, *, present: bool) -> list[str]:
    cert = "~/.config/claude-proxy/mitmproxy-ca-cert.pem"
    calls = [
        f"security remove-trusted-cert {cert}",
        "security find-certificate -a -Z ~/Library/Keychains/login.keychain-db",
    ]
    if present:
        calls.append(f"security delete-certificate -Z {sha1} ~/Library/Keychains/login.keychain-db")
    return calls


def test_uninstall_after_install(mac: Mac, serving: ProxyProcess) -> None:
    assert mac.run("install-agent.sh", "--port", str(serving.port)).returncode == 0
    sha1 = run_cli(mac.home, "ca", "--sha1").stdout.strip()
    mac.set("keychain-sha1", sha1)
    mac.answer("launchctl", "bootout", 0)
    result = mac.run("uninstall-agent.sh")
    assert result.returncode == 0, result.stderr
    assert mac.calls() == [
        "uname -s",
        f"launchctl bootout gui/{mac.uid}/local.claude-proxy",
        *uninstall_keychain_calls(mac, sha1, present=True),
    ]
    assert not mac.plist.exists()
    assert not mac.exe.exists()
    assert (mac.confdir / "mitmproxy-ca.pem").exists()  # kept without --purge
    assert (mac.home / "Library" / "Logs" / "claude-proxy").exists()


def test_uninstall_with_nothing_installed(mac: Mac) -> None:
    mac.answer("launchctl", "bootout", 113)
    result = mac.run("uninstall-agent.sh")
    assert result.returncode == 0, result.stderr
    assert mac.calls() == ["uname -s", f"launchctl bootout gui/{mac.uid}/local.claude-proxy"]
    assert "uninstalled" in result.stderr


def test_uninstall_after_partial_install(mac: Mac) -> None:
    """A plist and a CA, but no tool and no keychain entry: each step copes."""
    mac.plist.parent.mkdir(parents=True)
    mac.plist.write_bytes(render(str(mac.home)))
    assert run_cli(mac.home, "ca").returncode == 0
    mac.answer("launchctl", "bootout", 3)
    result = mac.run("uninstall-agent.sh")
    assert result.returncode == 0, result.stderr
    assert not mac.plist.exists()
    assert "holds no certificate with SHA-1" in result.stderr
    assert not any("delete-certificate" in c for c in mac.calls())


def test_uninstall_carries_on_past_failures(mac: Mac) -> None:
    mac.plist.parent.mkdir(parents=True)
    mac.plist.write_bytes(render(str(mac.home)))
    assert run_cli(mac.home, "ca").returncode == 0
    sha1 = run_cli(mac.home, "ca", "--sha1").stdout.strip()
    mac.set("keychain-sha1", sha1)
    mac.answer("launchctl", "bootout", 5)
    mac.answer("security", "delete-certificate", 1)
    result = mac.run("uninstall-agent.sh", "--purge")
    assert result.returncode == 1
    assert "launchctl bootout" in result.stderr and "delete-certificate" in result.stderr
    assert "2 step(s) failed" in result.stderr
    assert not mac.plist.exists()  # the later steps still ran
    assert not mac.confdir.exists()


def test_uninstall_purge_and_dry_run(mac: Mac) -> None:
    assert run_cli(mac.home, "ca").returncode == 0
    logs = mac.home / "Library" / "Logs" / "claude-proxy"
    logs.mkdir(parents=True)
    mac.answer("launchctl", "bootout", 3)
    before = sorted(p.relative_to(mac.home) for p in mac.home.rglob("*"))
    dry = mac.run("uninstall-agent.sh", "--purge", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert sorted(p.relative_to(mac.home) for p in mac.home.rglob("*")) == before
    assert not any(c.startswith(("launchctl", "security remove", "security delete"))
                   for c in mac.calls())  # fmt: skip
    assert f"would run: rm -rf {mac.confdir}" in dry.stderr
    result = mac.run("uninstall-agent.sh", "--purge")
    assert result.returncode == 0, result.stderr
    assert not mac.confdir.exists() and not logs.exists()


# The agent as launchd runs it


def launch(document: dict[str, object]) -> subprocess.Popen[bytes]:
    """Start ProgramArguments as launchd does: its environment only, its folder and log files."""
    env = dict(document["EnvironmentVariables"])  # type: ignore[call-overload]
    out = Path(str(document["StandardOutPath"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "ab") as stdout, open(str(document["StandardErrorPath"]), "ab") as stderr:
        return subprocess.Popen(
            list(document["ProgramArguments"]),  # type: ignore[call-overload]
            env=env,
            cwd=str(document["WorkingDirectory"]),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )


def wait_serving(home: Path, port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        if run_cli(home, "status", "--port", str(port)).stdout.find("ok   proxy on") >= 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"the agent did not serve (exit {process.poll()})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_agent_as_launchd_runs_it(home: Path, tmp_path: Path) -> None:
    port, socks_port = free_port(), free_port()
    rendered = run_cli(home, "plist", "--template", str(TEMPLATE), "--port", str(port),
                       "--socks-port", str(socks_port), "--executable", str(DEV_EXE))  # fmt: skip
    document = plistlib.loads(rendered.stdout.encode())
    status = run_cli(home, "status", "--port", str(port), "--socks-port", str(socks_port))
    assert status.returncode == 1
    assert "FAIL agent: not installed" in status.stdout
    assert "FAIL proxy on 127.0.0.1" in status.stdout
    installed = agent.plist_path(home)
    installed.parent.mkdir(parents=True)
    installed.write_text(rendered.stdout)
    process = launch(document)
    try:
        wait_serving(home, port, process)
        proxy = ProxyProcess.__new__(ProxyProcess)
        proxy.home, proxy.port = home, port
        refused = curl(proxy, "-i", "https://mozilla.org/")
        assert "x-claude-proxy: refused" in refused.stdout.lower()
        status = run_cli(home, "status", "--port", str(port), "--socks-port", str(socks_port))
        assert status.returncode == 0, status.stdout  # on Linux there is no keychain to check
        assert "ok   agent:" in status.stdout
        assert f"ok   SOCKS5 on 127.0.0.1:{socks_port}" in status.stdout
        assert "ok   proxy on 127.0.0.1" in status.stdout and "ok   CA:" in status.stdout
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0  # KeepAlive {SuccessfulExit: false} leaves it stopped
    finally:
        if process.poll() is None:
            process.kill()
    log_dir = Path(str(document["StandardErrorPath"])).parent
    decisions = (
        home / ".local" / "state" / "claude-proxy" / "log" / "claude-proxy.log"
    ).read_text()
    assert "BLOCK CONNECT mozilla.org:443" in decisions  # in the service's own rotating log
    assert "BLOCK CONNECT" not in (log_dir / "launchd.stderr.log").read_text()  # not in launchd's


def test_agent_crash_exits_nonzero(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        rendered = run_cli(home, "plist", "--template", str(TEMPLATE), "--port", port,
                           "--socks-port", str(free_port()),
                           "--executable", str(DEV_EXE))  # fmt: skip
        document = plistlib.loads(rendered.stdout.encode())
        process = launch(document)
        code = process.wait(60)
    assert code != 0  # so KeepAlive restarts it
    assert "port is in use" in Path(str(document["StandardErrorPath"])).read_text()


# The scripts themselves


@pytest.mark.parametrize("script", ["install-agent.sh", "uninstall-agent.sh"])
def test_scripts_are_shellcheck_clean_and_bash_32(script: str) -> None:
    path = SCRIPTS / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    result = subprocess.run(
        ["shellcheck", "--shell=bash", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout
    text = "\n".join(line for line in path.read_text().splitlines()
                     if not line.lstrip().startswith("#"))  # fmt: skip
    for bash4 in (r"declare -A", r"\bmapfile\b", r"\breadarray\b", r"\$\{\w+,,\}", r"\$\{\w+\^\^\}",
                  r"\[\[ -v ", r"\[-1\]", r"\bcoproc\b", r"&>>", r"\|&"):  # fmt: skip
        assert not re.search(bash4, text), f"{script} uses a bash 4 feature: {bash4}"
    assert os.access(path, os.X_OK)


def test_keychain_trust_is_read_by_sha1(mac: Mac, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", mac.env["PATH"])
    monkeypatch.setenv("FAKE_STATE", str(mac.state))
    sha1 = "5F6932E7CBD2B7CF64A8C09E647A522041A0EE4D"
    assert agent.keychain_trusts(sha1) is False  # no trust settings at all
    mac.set("trusted-sha1", "0" * 40)
    assert agent.keychain_trusts(sha1) is False  # another certificate (another mitmproxy CA)
    mac.set("trusted-sha1", sha1)
    assert agent.keychain_trusts(sha1.lower()) is True


@pytest.mark.parametrize(
    ("answer", "ok", "detail"),
    [
        (
            b"HTTP/1.1 403 Forbidden\r\nX-Claude-Proxy: refused\r\n\r\n",
            True,
            "claude-proxy answers",
        ),
        (b"HTTP/1.1 403 Forbidden\r\nServer: other\r\n\r\n", False, "something else answers"),
        (b"HTTP/1.1 200 Connection established\r\n\r\n", False, "something else answers"),
        (b"", False, "something else answers"),
    ],
)
def test_status_probe_tells_claude_proxy_from_other_programs(
    answer: bytes, ok: bool, detail: str
) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def reply() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(answer)

        thread = threading.Thread(target=reply)
        thread.start()
        check = agent.probe("127.0.0.1", server.getsockname()[1])
        thread.join(5)
    assert check.ok is ok
    assert detail in check.detail
