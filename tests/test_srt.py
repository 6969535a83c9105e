"""The real sandbox-runtime (`srt`, bubblewrap on Linux) aimed at claude-proxy: nothing goes around.

srt removes the command's network namespace and bridges only its proxy ports in; with
`httpProxyPort` and `socksProxyPort` naming claude-proxy, every byte a sandboxed command sends goes
through claude-proxy's checks. Proof: what the local upstream received.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ProxyFactory, ProxyProcess
from tests.programs import sandbox_program
from tests.upstream import Upstream


@pytest.fixture(scope="session")
def srt() -> Path:
    return sandbox_program("srt")


@pytest.fixture(scope="module")
def fenced(module_proxy: ProxyFactory) -> ProxyProcess:
    return module_proxy()


def sandboxed(
    srt: Path, proxy: ProxyProcess, tmp_path: Path, script: str
) -> subprocess.CompletedProcess[str]:
    """Run `script` with sh inside srt, whose proxy ports are claude-proxy's."""
    settings = tmp_path / "srt-settings.json"
    settings.write_text(
        json.dumps(
            {
                "network": {
                    "httpProxyPort": proxy.port,
                    "socksProxyPort": proxy.socks_port,
                    "allowedDomains": ["*.anthropic.com", "claude.ai"],
                    "deniedDomains": [],
                },
                "filesystem": {"denyRead": [], "allowWrite": [str(tmp_path)], "denyWrite": []},
            }
        )
    )
    return subprocess.run(
        [str(srt), "--settings", str(settings), "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )


def curl(proxy: ProxyProcess, *args: str) -> str:
    ca = proxy.ca_cert
    return " ".join(["curl", "-sS", "-m", "20", "--cacert", f"'{ca}'", *args])


def test_allowed_host_through_the_http_proxy(
    srt: Path, fenced: ProxyProcess, upstream: Upstream, tmp_path: Path
) -> None:
    result = sandboxed(srt, fenced, tmp_path, curl(fenced, "https://api.anthropic.com/in-sandbox"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from upstream\n"
    assert upstream.seen.requests == [("GET", "/in-sandbox", "api.anthropic.com")]


def test_allowed_host_through_socks(
    srt: Path, fenced: ProxyProcess, upstream: Upstream, tmp_path: Path
) -> None:
    """Inside the sandbox srt's SOCKS bridge listens on localhost:1080 and leads to ours."""
    script = curl(fenced, "--socks5-hostname", "localhost:1080", "https://claude.ai/via-socks")
    result = sandboxed(srt, fenced, tmp_path, script)
    assert result.returncode == 0, result.stderr
    assert upstream.seen.requests == [("GET", "/via-socks", "claude.ai")]
    assert "ALLOW SOCKS5 claude.ai:443" in fenced.log_text()


def test_refused_host_gets_claude_proxys_reason(
    srt: Path, fenced: ProxyProcess, upstream: Upstream, tmp_path: Path
) -> None:
    result = sandboxed(srt, fenced, tmp_path, curl(fenced, "-i", "https://mozilla.org/"))
    assert result.returncode != 0
    assert "x-claude-proxy: refused" in result.stdout.lower()
    assert "mozilla.org is not on the allowlist" in result.stdout
    assert upstream.seen.connections == 0


def test_refused_host_through_socks(
    srt: Path, fenced: ProxyProcess, upstream: Upstream, tmp_path: Path
) -> None:
    script = curl(fenced, "--socks5-hostname", "localhost:1080", "https://mozilla.org/")
    result = sandboxed(srt, fenced, tmp_path, script)
    assert result.returncode != 0
    assert upstream.seen.connections == 0
    assert 'BLOCK SOCKS5 mozilla.org:443 - - "mozilla.org is not on the allowlist"' in (
        fenced.log_text()
    )


@pytest.mark.parametrize(
    "script",
    [
        "curl -sS -m 10 --noproxy '*' https://api.anthropic.com/around",  # ignores the proxy
        "curl -sS -m 10 --noproxy '*' -k https://203.0.113.7/around",  # an address, no DNS
        "exec 3<>/dev/tcp/203.0.113.7/443",  # a raw TCP connect
        "exec 3<>/dev/tcp/127.0.0.1/PORT",  # the upstream itself, on the host's loopback
    ],
    ids=["noproxy-name", "noproxy-address", "raw-tcp", "host-loopback"],
)
def test_nothing_goes_around_the_proxy(
    srt: Path, fenced: ProxyProcess, upstream: Upstream, tmp_path: Path, script: str
) -> None:
    script = script.replace("PORT", str(upstream.port))
    result = sandboxed(srt, fenced, tmp_path, f"bash -c {json.dumps(script)}")
    assert result.returncode != 0, result.stdout
    upstream.wait_idle()
    assert upstream.seen.connections == 0
