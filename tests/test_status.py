"""`claude-proxy status`: ok only when the path Claude Code takes works, end to end.

Its proxy checks open a tunnel to an allowed host and complete a TLS handshake that must verify
against our CA; anything else on the port (an imitator, another CA, a silent listener) fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from claude_proxy.cli import diagnostics, status_cmd
from claude_proxy.cli.main import main
from tests.conftest import EXECUTABLE, read_head, start_proxy
from tests.macos import Mac
from tests.mountns import MountNamespace
from tests.support.certs import sha1
from tests.support.cli import run, run_cli
from tests.support.ports import free_port
from tests.support.reload import config_file, wait_state, write_by_rename
from tests.upstream import Upstream


def lines(result: subprocess.CompletedProcess[str], prefix: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(prefix)]


def test_status_is_ok_on_the_real_path_and_reaches_nothing_upstream(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    proxy = start_proxy(home, upstream, upstream_ca_file)
    result = run_cli(home, "status", "--port", str(proxy.port),
                     "--socks-port", str(proxy.socks_port))  # fmt: skip
    assert lines(result, f"ok   proxy on 127.0.0.1:{proxy.port}: TLS to api.anthropic.com")
    assert lines(result, f"ok   SOCKS5 on 127.0.0.1:{proxy.socks_port}: TLS to api.anthropic")
    assert lines(result, "ok   CA:")
    assert result.returncode == 1  # Claude Code's settings are not fenced here: status says so
    assert lines(result, "ok   agent: not macOS: no launchd agent")
    assert upstream.seen.connections == 0  # the probes never leave the machine
    log = home / ".local" / "state" / "claude-proxy" / "log" / "claude-proxy.log"
    assert "api.anthropic.com" not in log.read_text()  # probes are not decision lines
    assert proxy.stop() == 0


@pytest.fixture
def imitator(tls_ca: trustme.CA) -> Iterator[Callable[[bytes, bool], int]]:
    """A program on a port that answers a CONNECT with `answer`, then (maybe) TLS of its own."""
    servers: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def serve(answer: bytes, tls: bool) -> int:
        server = socket.create_server(("127.0.0.1", 0))
        servers.append(server)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_ca.issue_cert("api.anthropic.com").configure_cert(context)

        def run() -> None:
            conn, _ = server.accept()
            with conn:
                read_head(conn)
                conn.sendall(answer)
                if tls:  # the client refuses the certificate: that is the point
                    with contextlib.suppress(ssl.SSLError, OSError):
                        context.wrap_socket(conn, server_side=True).close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return int(server.getsockname()[1])

    yield serve
    for server in servers:
        server.close()


@pytest.mark.parametrize(
    ("answer", "tls", "detail"),
    [
        # the header the old probe looked for proves nothing: anyone can send it
        (b"HTTP/1.1 403 Forbidden\r\nX-Claude-Proxy: refused\r\n\r\n", False, "refuses"),
        (b"HTTP/1.1 200 Connection established\r\n\r\n", True, "not from the CA"),
        (b"HTTP/1.1 200 OK\r\nX-Claude-Proxy: ok\r\n\r\n", False, "TLS handshake failed"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", False, "something else answers"),
        (b"", False, "closes the connection"),
    ],
)
def test_status_fails_for_a_program_that_imitates_claude_proxy(
    home: Path, imitator: Callable[[bytes, bool], int], answer: bytes, tls: bool, detail: str
) -> None:
    assert run_cli(home, "ca").returncode == 0
    port = imitator(answer, tls)
    result = run_cli(home, "status", "--port", str(port), "--socks-port", str(free_port()))
    [line] = lines(result, f"FAIL proxy on 127.0.0.1:{port}")
    assert detail in line
    assert result.returncode == 1


def test_status_fails_for_a_proxy_with_another_ca(
    home: Path, tmp_path: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    proxy = start_proxy(home, upstream, upstream_ca_file)
    other = tmp_path / "other"
    other.mkdir()
    assert run_cli(other, "ca").returncode == 0  # the CA this shell (and its keychain) trusts
    result = run_cli(other, "status", "--port", str(proxy.port),
                     "--socks-port", str(proxy.socks_port))  # fmt: skip
    for what in ("proxy on", "SOCKS5 on"):
        [line] = lines(result, f"FAIL {what} 127.0.0.1:")
        assert "not from the CA" in line and "runs with another CA" in line
    assert result.returncode == 1
    assert upstream.seen.connections == 0
    assert proxy.stop() == 0


def test_status_fails_for_a_silent_listener_and_does_not_hang(home: Path) -> None:
    assert run_cli(home, "ca").returncode == 0
    with (
        socket.create_server(("127.0.0.1", 0)) as silent,  # the kernel accepts; it never speaks
        socket.create_server(("127.0.0.1", 0)) as silent_socks,
    ):
        port, socks_port = silent.getsockname()[1], silent_socks.getsockname()[1]
        result = run_cli(home, "status", "--port", str(port), "--socks-port", str(socks_port))
    for what, where in (("proxy on", port), ("SOCKS5 on", socks_port)):
        [line] = lines(result, f"FAIL {what} 127.0.0.1:{where}")
        assert "does not answer within 3 s" in line
    assert result.returncode == 1


def test_status_when_nothing_listens(home: Path) -> None:
    port, socks_port = free_port(), free_port()
    result = run_cli(home, "status", "--port", str(port), "--socks-port", str(socks_port))
    [line] = lines(result, f"FAIL proxy on 127.0.0.1:{port}")
    assert "nothing listens" in line
    assert f"     fix: claude-proxy run --port {port}" in result.stdout
    assert lines(result, "FAIL CA: none in")


# The keychain (macOS): its trust decision, with the security stand-in


@pytest.fixture
def keychain(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> Mac:
    fake = Mac(tmp_path, home, built=Path("/nonexistent"))
    monkeypatch.setenv("PATH", f"{fake.bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_STATE", str(fake.state))
    monkeypatch.setenv("HOME", str(home))
    assert run_cli(home, "ca").returncode == 0
    return fake


def test_keychain_check_is_the_trust_decision(keychain: Mac, home: Path) -> None:
    cert = keychain.confdir / "mitmproxy-ca-cert.pem"
    fingerprint = sha1(cert)
    check = diagnostics.keychain(home, cert)
    assert not check.ok  # not there at all
    assert check.fix == (
        "security add-trusted-cert -r trustRoot -p ssl -p basic -k "
        f"'{home}/Library/Keychains/login.keychain-db' '{cert}'"
    )
    keychain.put_in_keychain("0" * 40, "trusted")  # another mitmproxy CA is trusted, not ours
    assert not diagnostics.keychain(home, cert).ok
    keychain.put_in_keychain(fingerprint, "never")  # there, but marked Never Trust
    check = diagnostics.keychain(home, cert)
    assert not check.ok and "CSSMERR_TP_NOT_TRUSTED" in check.detail
    keychain.put_in_keychain(fingerprint, "trusted")
    assert diagnostics.keychain(home, cert).ok


def test_status_on_macos_needs_the_keychain_to_trust_the_ca(
    keychain: Mac, home: Path, upstream: Upstream, upstream_ca_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    proxy = start_proxy(home, upstream, upstream_ca_file)
    monkeypatch.setattr(sys, "platform", "darwin")
    cert = keychain.confdir / "mitmproxy-ca-cert.pem"
    keychain.put_in_keychain(sha1(cert), "never")

    def checks() -> dict[str, bool]:
        found = status_cmd.status(home=home, host="127.0.0.1", port=proxy.port,
                                  socks_port=proxy.socks_port)  # fmt: skip
        return {c.what.split(" ")[0]: c.ok for c in found if not c.what.startswith("claude-code")}

    assert checks() == {"agent": False, "CA": True, "proxy": True, "SOCKS5": True,
                        "keychain": False, "organization": True, "config": True,
                        "log": True, "audit": True}  # fmt: skip
    keychain.put_in_keychain(sha1(cert), "trusted")
    assert checks()["keychain"] is True
    assert proxy.stop() == 0


def test_setup_asks_the_keychain_as_status_does(
    keychain: Mac, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One keychain check: what setup leaves to do on macOS is status's keychain row, with its
    fix, asked of local certificates only (-L)."""
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    cert = keychain.confdir / "mitmproxy-ca-cert.pem"
    keychain.put_in_keychain(sha1(cert), "never")
    ports = ["--port", str(free_port()), "--socks-port", str(free_port())]
    assert main(["setup", "srt", "--yes", *ports]) == 0
    check = diagnostics.keychain(home, cert)
    assert f"TODO keychain: {check.detail}; {check.fix}" in capsys.readouterr().out.splitlines()
    assert "CSSMERR_TP_NOT_TRUSTED" in check.detail
    verify = f"security verify-cert -c {cert} -p ssl -L".replace(str(home), "~")
    assert keychain.calls("security") == [verify, verify]  # setup's, then status's own
    keychain.put_in_keychain(sha1(cert), "trusted")
    assert main(["setup", "srt", "--yes", *ports]) == 0
    assert "ok   keychain: trusts the CA for SSL" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize(
    "args", [["check", "api.anthropic.com"], ["env"], ["status", "--port", "1"], ["paths"], ["ca"]]
)
def test_commands_that_run_no_proxy_do_not_import_mitmproxy(home: Path, args: list[str]) -> None:
    assert run_cli(home, "ca").returncode == 0  # making a CA needs mitmproxy; reading one does not
    code = (
        "import sys\nfrom claude_proxy.cli.main import main\nmain(sys.argv[1:])\n"
        "print([m for m in sys.modules if m.split('.')[0] == 'mitmproxy'])"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    result = subprocess.run([sys.executable, "-c", code, *args], env={**env, "HOME": str(home)},
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.stdout.splitlines()[-1] == "[]", result.stderr


# Claude Code's settings: what it will apply in a folder, scope by scope


@dataclass
class Scopes:
    home: Path
    project: Path
    port: int
    socks_port: int

    def file(self, scope: str) -> Path:
        return {
            "user": self.home / ".claude" / "settings.json",
            "project": self.project / ".claude" / "settings.json",
            "local": self.project / ".claude" / "settings.local.json",
        }[scope]

    def add(self, scope: str, document: dict[str, Any]) -> None:
        path = self.file(scope)
        path.parent.mkdir(parents=True, exist_ok=True)
        current = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps(merge(current, document)))

    def status(self, namespace: MountNamespace | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
        argv = [str(EXECUTABLE), "status", "--port", str(self.port), "--socks-port",
                str(self.socks_port), "--project", str(self.project)]  # fmt: skip
        return subprocess.run(
            namespace.command(argv, self.project) if namespace else argv,
            env={**env, "HOME": str(self.home)},
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    def setup(self, *args: str, namespace: MountNamespace | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
        argv = [str(EXECUTABLE), "setup", "claude-code", "--yes", "--port", str(self.port),
                "--socks-port", str(self.socks_port), *args]  # fmt: skip
        result = subprocess.run(
            namespace.command(argv, self.project) if namespace else argv,
            env={**env, "HOME": str(self.home)},
            cwd=self.project,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr


def merge(into: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    out = dict(into)
    for key, value in more.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if both else value
    return out


@pytest.fixture
def scopes(home: Path, tmp_path: Path) -> Scopes:
    project = tmp_path / "project"
    project.mkdir()
    return Scopes(home, project, free_port(), free_port())


def claude_code_rows(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [
        line
        for line in result.stdout.splitlines()
        if line[5:].startswith("claude-code ") or line.startswith("     fix")
    ]


def test_a_clean_setup_passes_every_claude_code_row(scopes: Scopes) -> None:
    before = scopes.status()
    assert lines(before, "FAIL claude-code sandbox.enabled: not set: claude-proxy needs true")
    scopes.setup()
    result = scopes.status()
    rows = [r for r in claude_code_rows(result) if not r.startswith("     fix")]
    assert len(rows) >= 7 and [r for r in rows if not r.startswith("ok   ")] == [], rows
    assert lines(result, "ok   claude-code private files: the agent can neither read nor change")
    user = scopes.file("user")
    assert lines(result, f"ok   claude-code sandbox.allowUnsandboxedCommands: false (user: {user})")


WEAK: dict[str, Any] = {
    "sandbox": {
        "excludedCommands": ["docker *"],
        "enableWeakerNetworkIsolation": True,
        "enableWeakerNestedSandbox": True,
        "allowNestedUserNamespaces": True,
        "allowAppleEvents": True,
        "filesystem": {"disabled": True},
        "network": {
            "allowUnixSockets": ["/var/run/docker.sock"],
            "allowAllUnixSockets": True,
            "allowMachLookup": ["com.example.*"],
        },
    }
}


@pytest.mark.parametrize("scope", ["user", "project", "local"])
def test_every_opening_is_named_with_its_file(scopes: Scopes, scope: str) -> None:
    scopes.setup()
    scopes.add(scope, WEAK)
    result = scopes.status()
    assert result.returncode == 1
    path = scopes.file(scope)
    named = {key: bool(lines(result, f"FAIL claude-code {key}: ")) for key in OPENING_KEYS}
    assert named == dict.fromkeys(OPENING_KEYS, True)
    for key in OPENING_KEYS:
        [line] = lines(result, f"FAIL claude-code {key}: ")
        assert str(path) in line


OPENING_KEYS = [
    "sandbox.excludedCommands",
    "sandbox.enableWeakerNetworkIsolation",
    "sandbox.enableWeakerNestedSandbox",
    "sandbox.allowNestedUserNamespaces",
    "sandbox.allowAppleEvents",
    "sandbox.filesystem.disabled",
    "sandbox.network.allowUnixSockets",
    "sandbox.network.allowAllUnixSockets",
    "sandbox.network.allowMachLookup",
]


@pytest.mark.parametrize(
    ("document", "row"),
    [
        ({"sandbox": {"enabled": False}}, "sandbox.enabled: false (local: {path})"),
        (
            {"sandbox": {"allowUnsandboxedCommands": True}},
            "sandbox.allowUnsandboxedCommands: true (local: {path}): claude-proxy needs false",
        ),
        (
            {"sandbox": {"network": {"httpProxyPort": 3128}}},
            "sandbox.network.httpProxyPort: 3128 (local: {path})",
        ),
        (
            {"sandbox": {"filesystem": {"allowRead": ["~/.local/state/claude-proxy"]}}},
            'sandbox.filesystem.allowRead: "~/.local/state/claude-proxy" (local: {path}): '
            "sandboxed commands can read claude-proxy's private files",
        ),
    ],
    ids=["sandbox-off", "unsandboxed-allowed", "another-proxy", "reads-reopened"],
)
def test_a_project_file_that_outranks_the_user_fails_status(
    scopes: Scopes, document: dict[str, Any], row: str
) -> None:
    scopes.setup()
    scopes.add("local", document)
    result = scopes.status()
    path = scopes.file("local")
    assert len(lines(result, "FAIL claude-code " + row.format(path=path))) == 1
    fix = lines(result, "     fix: ")
    assert any("claude-proxy setup claude-code --managed" in f or str(path) in f for f in fix)


def test_missing_deny_rules_fail_status(scopes: Scopes) -> None:
    scopes.setup()
    user = json.loads(scopes.file("user").read_text())
    del user["permissions"]
    scopes.file("user").write_text(json.dumps(user))
    result = scopes.status()
    [line] = lines(result, "FAIL claude-code private files: missing permissions.deny Read(")
    assert "the agent's tools can reach claude-proxy's key, policy or state" in line


def test_an_unparsable_settings_file_fails_status_with_its_place(scopes: Scopes) -> None:
    path = scopes.file("project")
    path.parent.mkdir()
    path.write_text('{"sandbox": }')
    result = scopes.status()
    assert lines(result, f"FAIL Claude Code settings: cannot parse {path}:1:13:")


def test_managed_settings_outrank_the_project_in_status(
    scopes: Scopes, managed_etc: MountNamespace
) -> None:
    scopes.add("local", {"sandbox": {"enabled": False, "allowUnsandboxedCommands": True}})
    scopes.setup("--managed", namespace=managed_etc)
    result = scopes.status(managed_etc)
    managed = "/etc/claude-code/managed-settings.json"
    assert lines(result, f"ok   claude-code sandbox.enabled: true (managed: {managed})")
    assert lines(result, "ok   claude-code hooks: only the managed settings' hooks run")
    assert lines(result, "ok   claude-code sandbox.allowUnsandboxedCommands: false (managed: ")
    assert not lines(result, "FAIL claude-code")
    os.chown(managed_etc.upper / "claude-code" / "managed-settings.json", 65534, 65534)
    result = scopes.status(managed_etc)
    [line] = lines(result, "FAIL claude-code managed settings: ")
    assert f"{managed} is owned by uid 65534" in line


def test_missing_sandbox_programs_fail_status_with_their_fix(home: Path, tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("bubblewrap and socat are what the sandbox needs on Linux")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    result = run(home, "status", "--port", str(free_port()), "--socks-port", str(free_port()),
                 env={"PATH": str(bin_dir)})  # fmt: skip
    assert result.returncode == 1
    rows = result.stdout.splitlines()
    [at] = [i for i, row in enumerate(rows) if row.startswith("FAIL sandbox programs: ")]
    assert rows[at] == (
        "FAIL sandbox programs: bwrap and socat not found: the sandbox cannot start, and with "
        "failIfUnavailable Claude Code refuses to run commands"
    )
    assert rows[at + 1] == (
        "     fix: install the package bubblewrap socat (apt-get install bubblewrap socat, "
        "dnf install bubblewrap socat)"
    )


def fail_and_fix(result: subprocess.CompletedProcess[str], what: str) -> tuple[str, str]:
    """The FAIL row of `what` and the line under it."""
    rows = result.stdout.splitlines()
    [at] = [i for i, row in enumerate(rows) if row.startswith(f"FAIL {what}: ")]
    return rows[at], rows[at + 1] if at + 1 < len(rows) else ""


def test_a_damaged_pin_fails_status_with_its_fix(home: Path) -> None:
    state = home / ".local" / "state" / "claude-proxy"
    state.mkdir(parents=True)
    (state / "pin.json").write_text("{not a pin")
    result = run(home, "status", "--port", str(free_port()), "--socks-port", str(free_port()))
    row, fix = fail_and_fix(result, "organization pin")
    assert "pin.json is damaged" in row
    assert fix == "     fix: claude-proxy pin ORG_UUID, or claude-proxy pin --off, rewrites it"


def test_an_invalid_config_fails_status_with_its_fix(home: Path) -> None:
    config_file(home).parent.mkdir(parents=True)
    config_file(home).write_text("[[allow]]\nhost = \n")
    result = run(home, "status", "--port", str(free_port()), "--socks-port", str(free_port()))
    row, fix = fail_and_fix(result, "config")
    assert "config.toml:2" in row
    assert fix == "     fix: claude-proxy config edit (it checks the file before it saves it)"


def test_a_config_the_proxy_refused_fails_status_with_its_fix(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> None:
    proxy = start_proxy(home, upstream, upstream_ca_file)
    write_by_rename(config_file(home), "[[allow]]\nhost = \n")
    wait_state(proxy, lambda s: s["error"] is not None)
    result = run(home, "status", "--port", str(proxy.port), "--socks-port", str(proxy.socks_port))
    row, fix = fail_and_fix(result, "config")
    assert row.endswith("the proxy keeps its previous policy")
    assert fix == "     fix: claude-proxy config edit (it checks the file before it saves it)"
    assert proxy.stop() == 0
