"""Test-only mitmproxy script: after the Enforcer allowed a request whose path starts with
/redirected, send it to another host (a bug in some later addon). The backstop must stop it."""

from mitmproxy import http


def requestheaders(flow: http.HTTPFlow) -> None:
    if flow.request.path.startswith("/redirected"):
        flow.request.host = "claude.ai"
