"""`ca --bundle` and `env --tools`: real tools trust the proxy through the bundle alone."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import certifi
import pytest
import trustme

from claude_proxy.state import bundle
from tests.conftest import ProxyProcess, read_head, send_connect
from tests.support.cli import run, run_cli
from tests.support.files import mode
from tests.upstream import Upstream

TOOL_VARIABLES = ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO"]


def bundle_path(home: Path) -> Path:
    return home / ".config" / "claude-proxy" / "ca-bundle.pem"


def der(pem_file: Path) -> list[bytes]:
    return bundle.certificates(pem_file.read_bytes())


def test_bundle_alone_verifies_the_proxy(proxy: ProxyProcess, upstream: Upstream) -> None:
    result = run(proxy.home, "ca", "--bundle")
    assert result.returncode == 0, result.stderr
    path = bundle_path(proxy.home)
    assert f"bundle:       {path}" in result.stdout
    assert "system roots: " in result.stdout and ", from " in result.stdout
    assert mode(path) == 0o644
    context = ssl.create_default_context(cafile=str(path))  # only the bundle
    trusted = context.get_ca_certs(binary_form=True)
    [ours] = der(proxy.ca_cert)
    assert ours in trusted and len(trusted) > 1
    context.set_alpn_protocols(["http/1.1"])
    sock = send_connect(proxy, b"api.anthropic.com:443")
    assert read_head(sock).startswith(b"HTTP/1.1 200")
    with context.wrap_socket(sock, server_hostname="api.anthropic.com") as tls:
        tls.sendall(b"GET /bundle HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\n\r\n")
        assert read_head(tls).startswith(b"HTTP/1.1 200")
    assert upstream.seen.requests == [("GET", "/bundle", "api.anthropic.com")]


def test_bundle_roots_come_from_ssl_cert_file(home: Path, tmp_path: Path) -> None:
    roots = tmp_path / "roots.pem"
    trustme.CA().cert_pem.write_to_path(str(roots))
    target = tmp_path / "out" / "tools.pem"
    target.parent.mkdir()
    result = run(home, "ca", "--bundle", str(target), env={"SSL_CERT_FILE": str(roots)})
    assert result.returncode == 0, result.stderr
    assert f"system roots: 1, from {roots}" in result.stdout
    ca_cert = home / ".config" / "claude-proxy" / "mitmproxy-ca-cert.pem"
    assert der(target) == [*der(roots), *der(ca_cert)]
    # once SSL_CERT_FILE names the bundle, the bundle is not its own source
    again = run(home, "ca", "--bundle", str(target), env={"SSL_CERT_FILE": str(target)})
    assert again.returncode == 0, again.stderr
    assert str(target) not in again.stdout.split(", from ", 1)[1]


def test_bundle_falls_back_to_certifi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    nowhere = str(tmp_path / "none")
    paths = ssl.DefaultVerifyPaths(nowhere, nowhere, "X", nowhere, "Y", nowhere)
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: paths)
    monkeypatch.setattr(sys, "platform", "linux")
    roots, source = bundle.system_roots(exclude=tmp_path / "bundle.pem")
    assert source.startswith(f"certifi ({certifi.where()})")
    assert roots == list(dict.fromkeys(der(Path(certifi.where()))))


@pytest.mark.parametrize("shell", ["sh", "fish"])
def test_env_tools_lines_run_in_their_shell(home: Path, shell: str) -> None:
    program = shutil.which(shell)
    if program is None:
        pytest.skip(f"{shell} is not installed")
    assert run(home, "ca", "--bundle").returncode == 0
    result = run(home, "env", "--tools", "--shell", shell, "--port", "9999")
    assert result.returncode == 0 and result.stderr == ""
    names = ["HTTPS_PROXY", "NODE_EXTRA_CA_CERTS", *TOOL_VARIABLES]
    show = "".join(f"echo ${name}\n" for name in names)
    out = subprocess.run(
        [program, "-c", result.stdout + show], capture_output=True, text=True, check=True
    ).stdout
    confdir = home / ".config" / "claude-proxy"
    expected = ["http://127.0.0.1:9999", str(confdir / "mitmproxy-ca-cert.pem")]
    assert out.splitlines() == expected + [str(bundle_path(home))] * len(TOOL_VARIABLES)


def test_env_tools_never_names_a_bundle_that_is_not_there(home: Path) -> None:
    result = run(home, "env", "--tools", "--shell", "sh")  # no CA yet: no bundle can be made
    assert result.returncode == 4 and result.stdout == ""
    assert "run `claude-proxy ca`" in result.stderr
    assert not bundle_path(home).exists()
    assert run(home, "ca").returncode == 0
    result = run(home, "env", "--tools", "--shell", "sh")  # the CA is there: the bundle is made
    assert result.returncode == 0
    assert f"wrote the CA bundle {bundle_path(home)}" in result.stderr
    assert f"export CURL_CA_BUNDLE='{bundle_path(home)}'" in result.stdout.splitlines()
    assert bundle_path(home).exists()
    without = run(home, "env", "--shell", "sh")
    assert "CURL_CA_BUNDLE" not in without.stdout and "bundle" not in without.stderr


TOOLS = {
    "curl": "curl -sS -o /dev/null https://api.anthropic.com/tool-curl",  # CURL_CA_BUNDLE
    "git": "git ls-remote https://api.anthropic.com/tool-git.git",  # GIT_SSL_CAINFO
    "httpx": f"{sys.executable} -c \"import httpx; httpx.get('https://api.anthropic.com/tool-httpx')\"",
}


@pytest.mark.parametrize("tool", TOOLS)
def test_tools_reach_the_proxy_with_the_env_lines(
    proxy: ProxyProcess, upstream: Upstream, tool: str
) -> None:
    if shutil.which(tool if tool != "httpx" else "sh") is None:
        pytest.skip(f"{tool} is not installed")
    assert run(proxy.home, "ca", "--bundle").returncode == 0
    lines = run(proxy.home, "env", "--tools", "--shell", "sh", "--port", str(proxy.port)).stdout
    # The environment's own CA variables (and proxies) would hide a line that is missing.
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HOME=str(proxy.home), GIT_TERMINAL_PROMPT="0")
    ran = subprocess.run(
        ["sh", "-c", lines + TOOLS[tool]], env=env, capture_output=True, text=True, timeout=60
    )
    paths = [path for _, path, host in upstream.seen.requests if host == "api.anthropic.com"]
    assert any(path.startswith(f"/tool-{tool}") for path in paths), ran.stderr


@pytest.mark.parametrize("what", ["a-file-of-the-users", "the-ca-key", "a-folder", "a-link"])
def test_ca_bundle_never_replaces_what_is_not_a_bundle(home: Path, what: str) -> None:
    """`ca --bundle PATH` writes a new file, or replaces a bundle it wrote before; anything else
    at PATH is refused with one line and left as it was."""
    assert run_cli(home, "ca").returncode == 0
    confdir = home / ".config" / "claude-proxy"
    key = confdir / "mitmproxy-ca.pem"
    target = {
        "a-file-of-the-users": home / "notes.txt",
        "the-ca-key": key,
        "a-folder": home / "folder",
        "a-link": home / "link.pem",
    }[what]
    if what == "a-file-of-the-users":
        target.write_text("my notes\n")
    elif what == "a-folder":
        target.mkdir()
    elif what == "a-link":
        (home / "elsewhere.txt").write_text("not a bundle\n")
        target.symlink_to(home / "elsewhere.txt")
    before = {
        p: p.read_bytes() for p in (key, home / "notes.txt", home / "elsewhere.txt") if p.exists()
    }
    result = run_cli(home, "ca", "--bundle", str(target))
    assert result.returncode != 0
    [line] = result.stderr.splitlines()
    assert str(target) in line and "bundle" in line
    assert {p: p.read_bytes() for p in before} == before
    assert run_cli(home, "ca").returncode == 0  # the CA is as it was


def test_ca_bundle_replaces_a_bundle_it_wrote(home: Path, tmp_path: Path) -> None:
    target = tmp_path / "bundle.pem"
    assert run_cli(home, "ca", "--bundle", str(target)).returncode == 0
    first = target.read_bytes()
    target.write_bytes(first.replace(b"system roots", b"system roots (old)", 1))
    assert run_cli(home, "ca", "--bundle", str(target)).returncode == 0
    assert target.read_bytes() == first
