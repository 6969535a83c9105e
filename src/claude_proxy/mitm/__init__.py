"""The one door to mitmproxy's internals, and the version of mitmproxy that door was built for.

claude-proxy replaces and subclasses private parts of mitmproxy (its HTTP/1 client, its HTTP
streams and servers, the SOCKS5 layer, the addon manager's dispatch). Those parts change without
notice between releases, and some changes would not fail loudly: a hook that reaches no addon, a
stream without its deadlines. So the proxy runs only on the mitmproxy its tests ran on: the exact
version pyproject.toml pins (and uv.lock records), read here from the installed package's own
metadata, so that the pin is written in one place.

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
