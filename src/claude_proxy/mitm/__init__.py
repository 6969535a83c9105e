"""The one door to mitmproxy's internals, and the version of mitmproxy that door was built for.

claude-proxy replaces and subclasses private parts of mitmproxy, and of asyncio, h11 and h2
beneath it, and does so only in this package (tests/test_mitm_door.py fails when a module outside
it does):

- framing: HTTP/2 bodies framed for an HTTP/1.1 upstream (the HTTP/1 client, replaced by name);
- bounded_http: the HTTP/1 and HTTP/2 servers, with a bounded head and deadlines;
- timed_http: the HTTP layer and streams, with bounded waits on the upstream;
- client_tls, tls_config: the client's TLS handshake (one ClientHello story, the ALPN chosen once);
- socks5: the SOCKS5 layer, deciding the target before it answers;
- accept: asyncio's accept loop, accepting only what there are descriptors for;
- closing, wakeups, crash_guard: the connection handler's leaks and crashes;
- hook_cache: the addon manager's dispatch;
- connections: the proxy server's connections and listeners, for the addons.

Each module's docstring names the limit it works around, the tests that fail without it, and the
upstream issue; tests/test_mitm_internals.py checks that every private name and signature it
relies on is still there. Those parts change without notice between releases, and some changes
would not fail loudly: a hook that reaches no addon, a stream without its deadlines. So the proxy
runs only on the mitmproxy its tests ran on: the exact version pyproject.toml pins (and uv.lock
records), read here from the installed package's own metadata, so that the pin is written in one
place.

Nothing here imports mitmproxy: the check runs before anything that would.
"""

from __future__ import annotations

import re
from importlib import metadata

from claude_proxy.errors import ExitCode, ProxyError

DISTRIBUTION = "claude-proxy"
PIN = re.compile(r"^mitmproxy\s*==\s*([^\s;,]+)\s*(;.*)?$")


def tested_version() -> str:
    """The mitmproxy version pyproject.toml pins, as the installed claude-proxy declares it."""
    for requirement in metadata.requires(DISTRIBUTION) or ():
        if match := PIN.match(requirement):
            return match[1]
    raise ProxyError(
        f"cannot start: the installed {DISTRIBUTION} pins no exact mitmproxy version; "
        "reinstall it from its checkout (scripts/install-agent.sh, or uv tool install .)",
        ExitCode.MITMPROXY,
    )


def check_version() -> None:
    """Refuse to run on any mitmproxy but the tested one, with one line that names both."""
    tested = tested_version()
    try:
        installed = metadata.version("mitmproxy")
    except metadata.PackageNotFoundError:
        installed = None
    if installed == tested:
        return
    found = f"mitmproxy {installed} is installed" if installed else "mitmproxy is not installed"
    raise ProxyError(
        f"cannot start: {found}, but claude-proxy runs only on mitmproxy {tested}, the version "
        "its tests ran on (it patches mitmproxy's internals); reinstall it from its checkout: "
        "scripts/install-agent.sh, or uv tool install --reinstall .",
        ExitCode.MITMPROXY,
    )
