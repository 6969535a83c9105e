"""The real sandbox-runtime (`srt`, bubblewrap on Linux) aimed at claude-proxy: nothing goes around.

srt removes the command's network namespace and bridges only its proxy ports in; with
`httpProxyPort` and `socksProxyPort` naming claude-proxy, every byte a sandboxed command sends goes
through claude-proxy's checks. Proof: what the local upstream received.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import EXECUTABLE, ProxyFactory, ProxyProcess
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


SECRETS_SCRIPT = """
conf="$HOME/.config/claude-proxy"; state="$HOME/.local/state/claude-proxy"
for f in "$conf/mitmproxy-ca.pem" "$conf/mitmproxy-ca.p12" "$conf/config.toml" \\
    "$state/fingerprint.key"; do
  cat "$f" >/dev/null 2>&1 && echo "read $(basename "$f")"
done
echo "# appended" >> "$conf/config.toml" 2>/dev/null && echo "wrote config.toml"
cat "$conf/mitmproxy-ca-cert.pem" >/dev/null && echo "read the certificate"
"""


@pytest.mark.parametrize("fenced_settings", [False, True], ids=["lists-empty", "setup-srt"])
def test_setup_srt_keeps_the_proxys_secrets_out_of_reach(
    srt: Path, fenced: ProxyProcess, tmp_path: Path, fenced_settings: bool
) -> None:
    """What `setup srt` writes denies reading the CA's key, the policy and the state folder, and
    writing the policy even where the user allows writing; the certificate stays readable. With
    empty lists, all of it is open."""
    home = fenced.home
    settings = home / ".srt-settings.json"
    config = home / ".config" / "claude-proxy" / "config.toml"
    before = config.read_bytes()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env["HOME"] = str(home)
    ports = ["--port", str(fenced.port), "--socks-port", str(fenced.socks_port)]
    setup = subprocess.run(
        [str(EXECUTABLE), "setup", "srt", "--yes", *ports], env=env, capture_output=True, text=True
    )
    assert setup.returncode == 0, setup.stderr
    written = json.loads(settings.read_text())
    written["filesystem"]["allowWrite"] = [str(home)]  # the user lets commands write at home
    if not fenced_settings:
        written["filesystem"].update(denyRead=[], denyWrite=[])
    settings.write_text(json.dumps(written))
    try:
        result = subprocess.run(
            [str(srt), "-c", SECRETS_SCRIPT],
            env=env,
            cwd=home,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        said = result.stdout.splitlines()
        if fenced_settings:
            assert said == ["read the certificate"], result.stderr
            assert config.read_bytes() == before
        else:
            assert said == [
                "read mitmproxy-ca.pem",
                "read mitmproxy-ca.p12",
                "read config.toml",
                "read fingerprint.key",
                "wrote config.toml",
                "read the certificate",
            ], result.stderr
    finally:
        config.write_bytes(before)
        settings.unlink()
