"""The always-on agent: the plist, `paths`, the install/uninstall scripts, the agent launchd runs.

The scripts run for real under bash on a Mac (tests/macos.py): here with the stand-ins of
tests/standins.py, whose launchctl starts the agent from the plist the script rendered, so
"serving" means the installed agent serves. Each test that states what must be true on a Mac
(`mac`) also runs against the real launchctl, security and plutil on macOS with
CLAUDE_PROXY_REAL_MACOS=1 (`-m real_macos`; .github/workflows/macos.yml), and is skipped, with
the reason, anywhere else. Tests marked `standins` check the stand-ins' own call logs, or make
them fail on purpose: they use `fake` and run on the stand-ins only.
"""

from __future__ import annotations

import hashlib
import json
import os
import plistlib
import re
import shlex
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from claude_proxy.cli.log_cmd import alive
from claude_proxy.macos import agent
from claude_proxy.state import paths
from tests import standins
from tests.conftest import EXECUTABLE as DEV_EXE
from tests.conftest import ProxyProcess, curl, read_head
from tests.macos import (
    REAL_MACOS_MARKER,
    REAL_MACOS_VARIABLE,
    ROOT,
    SCRIPTS,
    AnyMac,
    Mac,
    RealMac,
    build_tool,
    real_macos_skip_reason,
)
from tests.support.certs import sha1
from tests.support.cli import run_cli
from tests.support.ports import free_port
from tests.support.shared import built_once

TEMPLATE = paths.PLIST_TEMPLATE

GOLDEN = {
    "Label": "local.claude-proxy",
    "ProgramArguments": [
        "/Users/a & b/.local/bin/claude-proxy",
        "run",
        "--port",
        "9051",
        "--socks-port",
        "9052",
        "--config-dir",
        "/Users/a & b/.config/claude-proxy",
        "--quiet",
    ],
    "RunAtLoad": True,
    "KeepAlive": {"SuccessfulExit": False},
    "ThrottleInterval": 60,
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
        config_dir=Path(home) / ".config" / "claude-proxy",
        port=port,
        socks_port=9052,
    )


def test_template_is_itself_a_valid_plist_inside_the_package() -> None:
    assert TEMPLATE.parent == Path(agent.__file__).parent
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
    paths_in = [document["WorkingDirectory"], document["StandardOutPath"],
                document["StandardErrorPath"], document["ProgramArguments"][0]]  # fmt: skip
    assert all(p.startswith("/") for p in paths_in)


def test_render_refuses_a_relative_executable() -> None:
    with pytest.raises(agent.ProxyError, match="absolute path"):
        agent.render_plist(
            TEMPLATE.read_bytes(),
            executable=Path("claude-proxy"),
            home=Path("/Users/a"),
            log_dir=Path("/Users/a/Library/Logs/claude-proxy"),
            config_dir=Path("/Users/a/.config/claude-proxy"),
            port=9051,
            socks_port=9052,
        )


def test_plist_command_writes_0644(home: Path) -> None:
    out = home / "agent.plist"
    result = run_cli(home, "plist", "--port", "9123", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    document = plistlib.loads(out.read_bytes())
    assert document["ProgramArguments"][3] == "9123"
    assert document["EnvironmentVariables"]["HOME"] == str(home)


def test_the_installed_tool_renders_from_the_template_in_launchd(
    built_tool: Path, home: Path
) -> None:
    """launchd/ holds the one template; the wheel carries its bytes (a file, not a link), and
    the installed tool renders exactly what the checkout's template renders."""
    source = Path(__file__).resolve().parent.parent / "launchd" / "local.claude-proxy.plist"
    [installed] = built_tool.parent.parent.glob(
        "tools/claude-proxy/lib/*/site-packages/claude_proxy/macos/local.claude-proxy.plist"
    )
    assert not installed.is_symlink() and installed.read_bytes() == source.read_bytes()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    args = ["plist", "--port", "9123", "--socks-port", "9124"]
    result = subprocess.run(
        [str(built_tool), *args], env={**env, "HOME": str(home)}, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    rendered = plistlib.loads(result.stdout)
    expected = agent.render_plist(
        source.read_bytes(),
        executable=Path(rendered["ProgramArguments"][0]),  # where the tool found itself
        home=home,
        log_dir=Path(rendered["StandardOutPath"]).parent,  # where platformdirs put it here
        config_dir=home / ".config" / "claude-proxy",
        port=9123,
        socks_port=9124,
    )
    assert result.stdout == expected


def test_the_installed_tool_is_compiled_so_the_agent_compiles_nothing_at_start(
    built_tool: Path,
) -> None:
    """install-agent.sh compiles at install: every module of the tool has its bytecode, so
    neither the agent nor a command compiles its imports each time it starts (a fresh tool
    folder otherwise has none, and under PYTHONDONTWRITEBYTECODE never gets any). All of them,
    not those one run imported: an agent started earlier in the session writes its own."""
    python = built_tool.resolve().parent / "python"
    code = (
        "import importlib.util, os, pathlib, claude_proxy\n"
        "site = pathlib.Path(claude_proxy.__file__).parent.parent\n"
        "files = list(site.rglob('*.py'))\n"
        "print(len(files))\n"
        "for f in files:\n"
        "    if not os.path.exists(importlib.util.cache_from_source(str(f))):\n"
        "        print(f)\n"
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([str(python), "-c", code], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    count, *uncompiled = result.stdout.splitlines()
    assert int(count) > 1000  # claude_proxy, mitmproxy, cryptography, …
    assert uncompiled == []


def test_plist_names_the_installed_command_even_from_python_m(home: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    result = subprocess.run(
        [sys.executable, "-m", "claude_proxy", "plist"],
        env={**env, "HOME": str(home)},
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    program = plistlib.loads(result.stdout)["ProgramArguments"][0]
    assert program == str(DEV_EXE)  # the console script beside this Python, not __main__.py


@pytest.mark.parametrize("flag", ["--port", "--socks-port"])
@pytest.mark.parametrize("value", ["0", "65536"])
def test_plist_refuses_a_port_that_is_not_one(home: Path, flag: str, value: str) -> None:
    result = run_cli(home, "plist", flag, value)
    assert result.returncode == 2
    assert not result.stdout


def test_plist_carries_the_config_folder(home: Path, tmp_path: Path) -> None:
    xdg = tmp_path / "xdg config"
    result = subprocess.run(
        [str(DEV_EXE), "plist"],
        env={**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(xdg)},
        capture_output=True,
        timeout=60,
    )
    arguments = plistlib.loads(result.stdout)["ProgramArguments"]
    assert arguments[arguments.index("--config-dir") + 1] == str(xdg / "claude-proxy")


def shell_values(text: str) -> dict[str, str]:
    """What bash makes of `eval "$(claude-proxy paths)"`."""
    names = re.findall(r"^([A-Z_]+)=", text, flags=re.M)
    script = 'eval "$1"; for n in ' + " ".join(names) + '; do printf "%s=%s\\0" "$n" "${!n}"; done'
    out = subprocess.run(["bash", "-c", script, "bash", text], capture_output=True, check=True)
    return dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if item)


def test_paths_are_what_the_cli_and_the_agent_use(home: Path, tmp_path: Path) -> None:
    xdg = tmp_path / "it's & xdg"
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(xdg)}

    def cli(*args: str) -> str:
        result = subprocess.run([str(DEV_EXE), *args], env=env, capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout

    values = shell_values(cli("paths"))
    assert values["CONFIG_DIR"] == str(xdg / "claude-proxy")
    assert f"certificate: {values['CA_CERT']}" in cli("ca")
    assert values["PLIST"] == str(home / "Library/LaunchAgents/local.claude-proxy.plist")
    assert (values["LABEL"], values["PORT"], values["SOCKS_PORT"]) == (
        "local.claude-proxy", "9051", "9052",
    )  # fmt: skip
    assert values["KEYCHAIN"] == str(home / "Library/Keychains/login.keychain-db")
    plist = Path(values["PLIST"])
    plist.parent.mkdir(parents=True)
    cli("plist", "--port", "9311", "--socks-port", "9312", "--output", str(plist))
    del env["XDG_CONFIG_HOME"]  # a shell without it: the installed agent's values still win
    installed = shell_values(cli("paths", "--installed"))
    assert (installed["CONFIG_DIR"], installed["PORT"], installed["SOCKS_PORT"]) == (
        str(xdg / "claude-proxy"), "9311", "9312",
    )  # fmt: skip
    assert shell_values(cli("paths"))["CONFIG_DIR"] == str(home / ".config" / "claude-proxy")


# The scripts, on a Mac: the stand-ins here, this Mac's own programs in the real macOS run

REAL_SKIP = real_macos_skip_reason()
STANDINS_ONLY = pytest.mark.standins  # the stand-ins' call logs, or failures made on purpose


@pytest.fixture(scope="session")
def built_tool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tool, installed once per session by the real `uv tool install` (the slow part)."""
    return built_once(tmp_path_factory, "built-tool", build_tool)


REAL_MARKS = [getattr(pytest.mark, REAL_MACOS_MARKER),
              pytest.mark.skipif(bool(REAL_SKIP), reason=REAL_SKIP or "")]  # fmt: skip


@pytest.fixture(params=["standins", pytest.param("real", marks=REAL_MARKS)])
def mac(request: pytest.FixtureRequest, tmp_path: Path, home: Path) -> Iterator[AnyMac]:
    """Each test that states what must be true on a Mac runs twice: on the stand-ins, and on this
    Mac's own launchctl, security and plutil (skipped unless CLAUDE_PROXY_REAL_MACOS=1 on macOS)."""
    host: AnyMac
    if request.param == "real":
        host = RealMac(tmp_path, home)
    else:
        host = Mac(tmp_path, home, request.getfixturevalue("built_tool"))
    yield host
    host.cleanup()


@pytest.fixture
def fake(tmp_path: Path, home: Path, built_tool: Path) -> Iterator[Mac]:
    """The stand-ins only: for the tests marked STANDINS_ONLY."""
    host = Mac(tmp_path, home, built_tool)
    yield host
    host.cleanup()


def test_the_macos_workflow_runs_the_real_variants_of_these_tests() -> None:
    """.github/workflows/macos.yml and this file cannot drift apart: the workflow runs on a hosted
    Mac, sets the variable and selects the marker that make the real variants run, and lets the
    user's trust settings change unattended (else the keychain steps wait for a dialog)."""
    from ruamel.yaml import YAML  # mitmproxy's own dependency

    workflow = YAML(typ="safe").load((ROOT / ".github" / "workflows" / "macos.yml").read_text())
    [job] = workflow["jobs"].values()
    assert job["runs-on"].startswith("macos-")
    assert job["env"][REAL_MACOS_VARIABLE] == "1"
    assert any(step.get("uses", "").startswith("astral-sh/setup-uv@") for step in job["steps"])
    commands = [step["run"] for step in job["steps"] if "run" in step]
    assert "uv sync --locked" in commands
    grant = "sudo security authorizationdb write com.apple.trust-settings.user allow"
    assert commands.index(grant) < len(commands) - 1
    argv = shlex.split(commands[-1])
    assert argv[:4] == ["uv", "run", "pytest", "tests/test_agent.py"]
    assert argv[argv.index("-m") + 1] == REAL_MACOS_MARKER
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    assert any(m.startswith(f"{REAL_MACOS_MARKER}:") for m in markers["ini_options"]["markers"])


def test_the_real_variants_skip_off_macos_with_the_reason() -> None:
    reason = real_macos_skip_reason()
    if sys.platform != "darwin":
        assert reason is not None and "needs macOS's launchctl, security and plutil" in reason
    elif os.environ.get(REAL_MACOS_VARIABLE) != "1":
        assert reason is not None and f"set {REAL_MACOS_VARIABLE}=1" in reason
    else:
        assert reason is None


def ports() -> list[str]:
    return ["--port", str(free_port()), "--socks-port", str(free_port())]


def ca_cert(mac: AnyMac) -> Path:
    return mac.confdir / "mitmproxy-ca-cert.pem"


def handshake_through(port: int, cafile: Path) -> None:
    """CONNECT to an allowed host through the proxy, then TLS verified against `cafile` only."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n")
        assert read_head(sock).startswith(b"HTTP/1.1 200")
        context = ssl.create_default_context(cafile=str(cafile))
        context.set_alpn_protocols(["http/1.1"])
        with context.wrap_socket(sock, server_hostname="api.anthropic.com"):
            pass


def install_calls(mac: Mac, *, trust: bool = True) -> list[str]:
    domain = f"gui/{mac.uid}"
    cert = "~/.config/claude-proxy"
    verify = f"security verify-cert -c {cert}/mitmproxy-ca-cert.pem -p ssl -L"
    calls = [
        "uname -s",
        "plutil -lint ~/Library/LaunchAgents/local.claude-proxy.plist",
        f"launchctl bootout {domain}/local.claude-proxy",
        f"launchctl enable {domain}/local.claude-proxy",
        f"launchctl bootstrap {domain} ~/Library/LaunchAgents/local.claude-proxy.plist",
        verify,
    ]
    if trust:
        calls += [
            "security add-trusted-cert -r trustRoot -p ssl -p basic -k "
            f"~/Library/Keychains/login.keychain-db {cert}/mitmproxy-ca-cert.pem",
            verify,
        ]
    return calls


def uninstall_keychain_calls(mac: Mac, sha1: str, *, trust: str = "removed") -> list[str]:
    cert = "~/.config/claude-proxy/mitmproxy-ca-cert.pem"
    calls = [f"security remove-trusted-cert {cert}"]
    if trust != "removed":
        calls.append("security trust-settings-export <tmp>")
    calls.append("security find-certificate -a -Z ~/Library/Keychains/login.keychain-db")
    calls.append(f"security delete-certificate -Z {sha1} ~/Library/Keychains/login.keychain-db")
    return calls


def test_install(mac: AnyMac) -> None:
    result = mac.run("install-agent.sh", *ports())
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(mac.plist.stat().st_mode) == 0o644
    assert mac.plist_valid(mac.plist)
    document = plistlib.loads(mac.plist.read_bytes())
    port = int(document["ProgramArguments"][3])
    assert Path(document["ProgramArguments"][0]).resolve() == mac.exe.resolve()  # the tool's
    assert document["ProgramArguments"][1:] == [
        "run", "--port", str(port), "--socks-port", document["ProgramArguments"][5],
        "--config-dir", str(mac.confdir), "--quiet",
    ]  # fmt: skip
    assert mac.loaded()
    assert mac.runs() == 1  # started once: by the bootstrap (RunAtLoad), not again
    cert = ca_cert(mac)
    assert mac.trust_settings() == {sha1(cert)} and mac.trusts(cert)
    assert mac.certificates() == {sha1(cert)}  # in the login keychain the script named
    handshake_through(port, cert)  # the agent launchd started serves with the trusted CA
    assert stat.S_IMODE(mac.logdir.stat().st_mode) == 0o700
    assert "export HTTPS_PROXY='http://127.0.0.1:" in result.stdout
    assert "NODE_EXTRA_CA_CERTS" in result.stdout


def test_install_with_xdg_config_home_makes_one_ca_the_agent_serves(
    mac: AnyMac, tmp_path: Path
) -> None:
    xdg = tmp_path / "xdg & config"
    result = mac.run("install-agent.sh", *ports(), XDG_CONFIG_HOME=str(xdg))
    assert result.returncode == 0, result.stderr
    cert = xdg / "claude-proxy" / "mitmproxy-ca-cert.pem"
    cas = [p for p in [*mac.home.rglob("mitmproxy-ca.pem"), *xdg.rglob("mitmproxy-ca.pem")]]
    assert cas == [xdg / "claude-proxy" / "mitmproxy-ca.pem"]  # one CA, none in ~/.config
    assert mac.trust_settings() == {sha1(cert)} and mac.trusts(cert)
    document = plistlib.loads(mac.plist.read_bytes())
    assert "XDG_CONFIG_HOME" not in document["EnvironmentVariables"]
    handshake_through(int(document["ProgramArguments"][3]), cert)


def test_second_install_with_everything_in_place(mac: AnyMac) -> None:
    args = ports()
    assert mac.run("install-agent.sh", *args).returncode == 0
    first = mac.agent_pid()
    result = mac.run("install-agent.sh", *args)
    assert result.returncode == 0, result.stderr
    assert "already trusts this CA" in result.stderr
    second = mac.agent_pid()
    assert first is not None and second is not None and second != first
    assert not alive(first)  # the old agent stopped
    assert mac.runs() == 1  # and one new one started, once
    assert mac.trust_settings() == {sha1(ca_cert(mac))} and mac.trusts(ca_cert(mac))


def test_install_trusts_a_certificate_marked_never_trust(mac: AnyMac) -> None:
    assert run_cli(mac.home, "ca").returncode == 0
    cert = ca_cert(mac)
    mac.mark_never_trust(cert)  # present, but the user chose "Never Trust"
    assert not mac.trusts(cert)
    result = mac.run("install-agent.sh", *ports())
    assert result.returncode == 0, result.stderr
    assert "already trusts this CA" not in result.stderr
    assert mac.trust_settings() == {sha1(cert)} and mac.trusts(cert)


@STANDINS_ONLY
def test_the_calls_the_scripts_make(fake: Mac) -> None:
    """The exact calls to launchctl, security, plutil, uname and uv, in order, through a life:
    an uninstall with nothing there, a fresh install, a dry run and a second install with
    everything in place, an install over a "Never Trust" entry, a dry run of the uninstall, and
    the uninstall. What each leaves behind the shared tests check, here and on a real Mac."""
    nothing = fake.run("uninstall-agent.sh")
    assert nothing.returncode == 0, nothing.stderr
    assert fake.calls() == ["uname -s", f"launchctl bootout gui/{fake.uid}/local.claude-proxy"]
    args = ports()
    result = fake.run("install-agent.sh", *args)
    assert result.returncode == 0, result.stderr
    assert fake.calls() == install_calls(fake)
    assert fake.calls("uv") == [
        "uv tool dir --bin",
        "uv export --quiet --frozen --no-dev --no-hashes --no-emit-project --no-header "
        "--project <repo> --output-file <tmp>",
        "uv tool install --reinstall --compile-bytecode --constraints <tmp> <repo>",
    ]
    first = fake.agent_pid()
    assert fake.starts() == [first]
    dry = fake.run("install-agent.sh", "--dry-run", *args)
    assert dry.returncode == 0, dry.stderr
    assert fake.calls() == ["uname -s"]
    assert "uv tool install" not in " ".join(fake.calls("uv"))
    again = fake.run("install-agent.sh", *args)
    assert again.returncode == 0, again.stderr
    assert fake.calls() == install_calls(fake, trust=False)
    assert fake.starts() == [first, fake.agent_pid()]  # the old agent stopped, one new one
    fingerprint = sha1(ca_cert(fake))
    fake.mark_never_trust(ca_cert(fake))
    over = fake.run("install-agent.sh", *args)
    assert over.returncode == 0, over.stderr
    assert fake.calls() == install_calls(fake)
    dry = fake.run("uninstall-agent.sh", "--purge", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert not any(c.startswith(("launchctl", "security remove", "security delete"))
                   for c in fake.calls())  # fmt: skip
    result = fake.run("uninstall-agent.sh")
    assert result.returncode == 0, result.stderr
    assert fake.calls() == [
        "uname -s",
        f"launchctl bootout gui/{fake.uid}/local.claude-proxy",
        *uninstall_keychain_calls(fake, fingerprint),
    ]


@STANDINS_ONLY
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
    fake: Mac, bootout: tuple[int, ...], bootstrap: tuple[int, ...], bootouts: int, bootstraps: int,
) -> None:  # fmt: skip
    fake.answer("launchctl", "bootout", *bootout)
    fake.answer("launchctl", "bootstrap", *bootstrap)
    result = fake.run("install-agent.sh", *ports(), "--no-keychain")
    assert result.returncode == 0, result.stderr
    calls = fake.calls()
    assert sum(c.startswith("launchctl bootout") for c in calls) == bootouts
    assert sum(c.startswith("launchctl bootstrap") for c in calls) == bootstraps
    assert calls[-1].startswith("launchctl bootstrap")  # no kickstart: RunAtLoad started it
    assert len(fake.starts()) == 1


@STANDINS_ONLY
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
    fake: Mac, bootstrap: tuple[int, ...], message: str
) -> None:
    fake.answer("launchctl", "bootstrap", *bootstrap)
    result = fake.run("install-agent.sh", "--no-keychain", *ports())
    assert result.returncode == 1
    assert message in result.stderr.strip().splitlines()[-1]
    assert fake.starts() == []


def test_install_over_ssh_skips_the_keychain_with_instructions(mac: AnyMac) -> None:
    result = mac.run("install-agent.sh", *ports(), SSH_CONNECTION="10.0.0.1 5000 10.0.0.2 22")
    assert result.returncode == 0, result.stderr
    assert mac.trust_settings() == set() and not mac.trusts(ca_cert(mac))  # never asked
    assert mac.certificates() == set()
    assert "security add-trusted-cert -r trustRoot -p ssl -p basic -k" in result.stderr


@STANDINS_ONLY
def test_install_keychain_refusal_is_reported(fake: Mac) -> None:
    fake.answer("security", "add-trusted-cert", 1)
    result = fake.run("install-agent.sh", *ports())
    assert result.returncode == 1
    assert "the CA is not trusted yet" in result.stderr
    assert "export HTTPS_PROXY=" in result.stdout  # the rest was done


def test_install_reports_an_agent_that_does_not_answer(mac: AnyMac) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # another program holds the port: the agent cannot listen
        port = str(taken.getsockname()[1])
        result = mac.run("install-agent.sh", "--port", port, "--socks-port", str(free_port()),
                         "--no-keychain", CLAUDE_PROXY_WAIT_SECONDS="2")  # fmt: skip
    assert result.returncode == 1
    assert "the port is in use" in result.stderr  # the agent's own words, from its log
    assert "the agent did not start" in result.stderr


@STANDINS_ONLY
def test_install_clears_proxy_variables_for_its_own_network_steps(fake: Mac) -> None:
    """A shell set up with `claude-proxy env`: uv must not go through the proxy."""
    proxy = "http://127.0.0.1:9"
    result = fake.run("install-agent.sh", *ports(), "--no-keychain", HTTPS_PROXY=proxy,
                      HTTP_PROXY=proxy, https_proxy=proxy, ALL_PROXY=proxy)  # fmt: skip
    assert result.returncode == 0, result.stderr
    install = "uv tool install --reinstall --compile-bytecode --constraints <tmp> <repo>"
    assert install in fake.calls("uv")


def tree_hashes(*roots: Path) -> dict[str, str]:
    """Every file, folder and link under `roots`, with its content (or target) and mode."""
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            if path.is_symlink():
                found[str(path)] = "link " + os.readlink(path)
            elif path.is_dir():
                found[str(path)] = f"dir {stat.S_IMODE(path.stat().st_mode):o}"
            elif path.exists():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                found[str(path)] = f"{digest} {stat.S_IMODE(path.stat().st_mode):o}"
    return found


def install_before_dry_run(mac: AnyMac, before: str, built_tool: Path, args: list[str]) -> None:
    if before == "the tool":
        mac.exe.parent.mkdir(parents=True)
        mac.exe.symlink_to(built_tool)
    elif before == "everything":
        assert mac.run("install-agent.sh", *args).returncode == 0


@pytest.mark.parametrize("before", ["nothing", "the tool", "everything"])
def test_install_dry_run_changes_nothing(mac: AnyMac, before: str, built_tool: Path) -> None:
    args = ports()
    install_before_dry_run(mac, before, built_tool, args)
    roots = (mac.home, mac.tools, built_tool.parent.parent)
    hashes = tree_hashes(*roots)
    pid, runs = mac.agent_pid(), mac.runs()
    assert (pid is not None, runs) == ((True, 1) if before == "everything" else (False, 0))
    result = mac.run("install-agent.sh", "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    assert tree_hashes(*roots) == hashes
    assert (mac.agent_pid(), mac.runs()) == (pid, runs)  # launchd neither stopped nor started it
    install = " ".join(["uv", *standins.INSTALL])  # the very command a real run makes
    for step in (install, "launchctl bootout", "launchctl bootstrap", "add-trusted-cert",
                 "plist --port"):  # fmt: skip
        assert f"would run: {step}" in result.stderr or step in result.stderr
    if before != "everything":
        assert "would run: " in result.stderr and " ca (makes the CA in" in result.stderr


@STANDINS_ONLY
@pytest.mark.parametrize("before", ["nothing", "the tool"])  # "everything": the calls test above
def test_install_dry_run_calls_only_uname(fake: Mac, before: str, built_tool: Path) -> None:
    args = ports()
    install_before_dry_run(fake, before, built_tool, args)
    result = fake.run("install-agent.sh", "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    assert fake.calls() == ["uname -s"]
    assert "uv tool install" not in " ".join(fake.calls("uv"))


@STANDINS_ONLY
def test_install_refuses_other_systems_and_bad_options(fake: Mac) -> None:
    fake.say("uname", "Linux")
    result = fake.run("install-agent.sh")
    assert result.returncode == 1 and "for macOS" in result.stderr
    fake.say("uname", "Darwin")
    for args in (["--port", "http"], ["--port", "70000"], ["--port", "0"],
                 ["--socks-port", "0"], ["--frobnicate"]):  # fmt: skip
        result = fake.run("install-agent.sh", *args)
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert fake.calls("uv") == []


def test_uninstall_after_install(mac: AnyMac) -> None:
    assert mac.run("install-agent.sh", *ports()).returncode == 0
    pid = mac.agent_pid()
    result = mac.run("uninstall-agent.sh")
    assert result.returncode == 0, result.stderr
    assert not mac.loaded()
    assert pid is not None and not alive(pid)  # the agent stopped
    assert mac.trust_settings() == set() and not mac.trusts(ca_cert(mac))
    assert mac.certificates() == set()
    assert not mac.plist.exists()
    assert not mac.exe.exists()
    assert (mac.confdir / "mitmproxy-ca.pem").exists()  # kept without --purge
    assert mac.logdir.exists()


def test_uninstall_finds_the_installed_agents_ca(mac: AnyMac, tmp_path: Path) -> None:
    """Installed with XDG_CONFIG_HOME, uninstalled from a shell without it: the same CA."""
    xdg = tmp_path / "xdg"
    assert mac.run("install-agent.sh", *ports(), XDG_CONFIG_HOME=str(xdg)).returncode == 0
    result = mac.run("uninstall-agent.sh", "--purge-config")
    assert result.returncode == 0, result.stderr
    assert mac.trust_settings() == set() and mac.certificates() == set()
    assert not (xdg / "claude-proxy").exists()
    assert not mac.confdir.exists()  # and no second CA was made on the way


def test_uninstall_with_nothing_installed(mac: AnyMac) -> None:
    result = mac.run("uninstall-agent.sh")
    assert result.returncode == 0, result.stderr
    assert not mac.loaded()
    assert "the agent was not loaded" in result.stderr
    assert "uninstalled" in result.stderr


def partial_install(mac: AnyMac) -> None:
    """A plist and a CA, but no tool and no keychain entry."""
    mac.plist.parent.mkdir(parents=True)
    mac.plist.write_bytes(render(str(mac.home)))
    assert run_cli(mac.home, "ca").returncode == 0


def test_uninstall_after_partial_install(mac: AnyMac) -> None:
    """Each step copes."""
    partial_install(mac)
    result = mac.run("uninstall-agent.sh")
    assert result.returncode == 0, result.stderr
    assert not mac.plist.exists()
    assert "the CA had no trust settings" in result.stderr
    assert "holds no certificate with SHA-1" in result.stderr


@STANDINS_ONLY
def test_uninstall_after_partial_install_deletes_nothing(fake: Mac) -> None:
    partial_install(fake)
    result = fake.run("uninstall-agent.sh")
    assert result.returncode == 0, result.stderr
    assert not any("delete-certificate" in c for c in fake.calls())


@STANDINS_ONLY
def test_uninstall_carries_on_past_failures(fake: Mac) -> None:
    partial_install(fake)
    fake.put_in_keychain(sha1(ca_cert(fake)), None)
    fake.answer("launchctl", "bootout", 5)
    fake.answer("security", "delete-certificate", 1)
    result = fake.run("uninstall-agent.sh", "--purge")
    assert result.returncode == 1
    assert "launchctl bootout" in result.stderr and "delete-certificate" in result.stderr
    assert "2 step(s) failed" in result.stderr
    assert not fake.plist.exists()  # the later steps still ran
    assert not fake.confdir.exists()


@STANDINS_ONLY
def test_uninstall_failed_trust_removal_is_a_failure_and_keeps_the_ca(fake: Mac) -> None:
    assert fake.run("install-agent.sh", *ports()).returncode == 0
    cert = ca_cert(fake)
    fake.answer("security", "remove-trusted-cert", 1)  # say, the password prompt was cancelled
    result = fake.run("uninstall-agent.sh", "--purge")
    assert result.returncode == 1
    assert "failed: security remove-trusted-cert" in result.stderr
    assert "had no trust settings" not in result.stderr
    assert fake.keychain_state()["trust"] == {sha1(cert): "trusted"}
    assert cert.exists()  # needed to remove the trust later: --purge kept it, and says why
    assert f"kept {fake.confdir}" in result.stderr
    assert not fake.logdir.exists()


def test_uninstall_purge_and_dry_run(mac: AnyMac) -> None:
    assert run_cli(mac.home, "ca").returncode == 0
    mac.logdir.mkdir(parents=True)
    before = tree_hashes(mac.home)
    dry = mac.run("uninstall-agent.sh", "--purge", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert tree_hashes(mac.home) == before
    assert f"would run: rm -rf {mac.confdir / 'mitmproxy-ca.pem'}" in dry.stderr
    assert f"would run: rmdir {mac.confdir}" in dry.stderr
    result = mac.run("uninstall-agent.sh", "--purge")
    assert result.returncode == 0, result.stderr
    assert not mac.confdir.exists() and not mac.logdir.exists()


@STANDINS_ONLY
def test_uninstall_dry_run_calls_nothing_that_changes(fake: Mac) -> None:
    assert run_cli(fake.home, "ca").returncode == 0
    dry = fake.run("uninstall-agent.sh", "--purge", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert not any(c.startswith(("launchctl", "security remove", "security delete"))
                   for c in fake.calls())  # fmt: skip


@pytest.mark.parametrize("flag", ["--purge", "--purge-config"])
def test_uninstall_purge_keeps_the_policy_unless_asked(mac: AnyMac, flag: str) -> None:
    assert run_cli(mac.home, "ca").returncode == 0
    policy = mac.confdir / "config.toml"
    policy.write_text('[[allow]]\nhost = "pypi.org"\n')
    (mac.confdir / ".new-ca").mkdir()  # a CA creation cut short
    result = mac.run("uninstall-agent.sh", flag)
    assert result.returncode == 0, result.stderr
    if flag == "--purge":
        assert [p.name for p in mac.confdir.iterdir()] == ["config.toml"]
        assert f"kept {policy} (your policy); --purge-config removes it too" in result.stderr
    else:
        assert not mac.confdir.exists()


def test_uninstall_takes_back_what_setup_wrote(mac: AnyMac) -> None:
    assert mac.run("install-agent.sh", *ports()).returncode == 0
    user = mac.home / ".claude" / "settings.json"
    user.parent.mkdir()
    user.write_text('{"model": "opus"}\n')
    for target in ("claude-code", "srt"):
        assert run_cli(mac.home, "setup", target, "--yes").returncode == 0
    assert "httpProxyPort" in user.read_text()
    result = mac.run("uninstall-agent.sh")
    assert result.returncode == 0, result.stderr
    assert json.loads(user.read_text()) == {"model": "opus"}
    assert not (mac.home / ".srt-settings.json").exists()
    assert "removed" in result.stderr and "(setup had created it)" in result.stderr
    assert not mac.exe.exists()


def test_uninstall_keeps_the_tool_when_settings_cannot_be_taken_back(mac: AnyMac) -> None:
    assert mac.run("install-agent.sh", *ports()).returncode == 0
    record = mac.statedir / "setup-record.json"
    record.write_text("{damaged")
    result = mac.run("uninstall-agent.sh")
    assert result.returncode == 1
    assert f"cannot read setup's record {record}" in result.stderr
    assert "kept the claude-proxy tool" in result.stderr
    assert mac.exe.exists() and not mac.plist.exists()  # the other steps ran


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


def wait_serving(home: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        if "ok   proxy on" in run_cli(home, "status").stdout:
            return
    raise AssertionError(f"the agent did not serve (exit {process.poll()})")


def test_agent_as_launchd_runs_it(home: Path) -> None:
    port, socks_port = free_port(), free_port()
    rendered = run_cli(home, "plist", "--port", str(port), "--socks-port", str(socks_port),
                       "--executable", str(DEV_EXE))  # fmt: skip
    document = plistlib.loads(rendered.stdout.encode())
    status = run_cli(home, "status", "--port", str(port), "--socks-port", str(socks_port))
    assert status.returncode == 1
    assert "ok   agent: not macOS: no launchd agent" in status.stdout
    assert "FAIL proxy on 127.0.0.1" in status.stdout
    installed = paths.plist_path(home)
    installed.parent.mkdir(parents=True)
    installed.write_text(rendered.stdout)
    process = launch(document)
    try:
        wait_serving(home, process)  # `status` without --port: the installed plist's
        proxy = ProxyProcess.__new__(ProxyProcess)
        proxy.home, proxy.port = home, port
        refused = curl(proxy, "-i", "https://mozilla.org/")
        assert "x-claude-proxy: refused" in refused.stdout.lower()
        unfenced = run_cli(home, "status", "--project", str(home))
        assert unfenced.returncode == 1
        assert "FAIL claude-code sandbox.enabled: not set" in unfenced.stdout
        ports = ("--port", str(port), "--socks-port", str(socks_port))
        assert run_cli(home, "setup", "claude-code", "--yes", *ports).returncode == 0
        status = run_cli(home, "status", "--project", str(home))
        assert status.returncode == 0, status.stdout  # on Linux there is no keychain to check
        assert "ok   agent:" in status.stdout
        assert f"ok   SOCKS5 on 127.0.0.1:{socks_port}" in status.stdout
        assert f"ok   proxy on 127.0.0.1:{port}" in status.stdout and "ok   CA:" in status.stdout
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0  # KeepAlive {SuccessfulExit: false} leaves it stopped
    finally:
        if process.poll() is None:
            process.kill()
    log_dir = Path(str(document["StandardErrorPath"])).parent
    decisions = (log_dir / "claude-proxy.log").read_text()
    assert "BLOCK CONNECT mozilla.org:443" in decisions  # in the service's own rotating log
    assert "api.anthropic.com" not in decisions  # status's probes are not decisions
    assert "BLOCK CONNECT" not in (log_dir / "launchd.stderr.log").read_text()  # not in launchd's


def test_agent_crash_exits_nonzero(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        rendered = run_cli(home, "plist", "--port", port, "--socks-port", str(free_port()),
                           "--executable", str(DEV_EXE))  # fmt: skip
        document = plistlib.loads(rendered.stdout.encode())
        process = launch(document)
        code = process.wait(60)
    assert code != 0  # so KeepAlive restarts it
    assert "port is in use" in Path(str(document["StandardErrorPath"])).read_text()


# The scripts themselves


@pytest.mark.parametrize("script", ["install-agent.sh", "uninstall-agent.sh", "lib.sh"])
def test_scripts_are_shellcheck_clean_and_bash_32(script: str) -> None:
    path = SCRIPTS / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    result = subprocess.run(
        ["shellcheck", "--shell=bash", "--external-sources", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout
    text = "\n".join(line for line in path.read_text().splitlines()
                     if not line.lstrip().startswith("#"))  # fmt: skip
    for bash4 in (r"declare -A", r"\bmapfile\b", r"\breadarray\b", r"\$\{\w+,,\}", r"\$\{\w+\^\^\}",
                  r"\[\[ -v ", r"\[-1\]", r"\bcoproc\b", r"&>>", r"\|&"):  # fmt: skip
        assert not re.search(bash4, text), f"{script} uses a bash 4 feature: {bash4}"
    assert os.access(path, os.X_OK) == (script != "lib.sh")  # sourced, never run


def test_scripts_compute_no_path_themselves() -> None:
    """Every shared name and path comes from `claude-proxy paths`: none is spelt in a script."""
    for script in ("install-agent.sh", "uninstall-agent.sh", "lib.sh"):
        text = "\n".join(line for line in (SCRIPTS / script).read_text().splitlines()
                         if not line.lstrip().startswith("#"))  # fmt: skip
        code = re.sub(r"(?s)cat <<EOF.*?\nEOF", "", text)  # the usage text may name them
        for spelt in ("XDG_CONFIG_HOME", ".config", "Library/", "mitmproxy-ca", "9051", "9052",
                      "local.claude-proxy"):  # fmt: skip
            assert spelt not in code, f"{script} computes {spelt} itself"
