"""Test-only mitmproxy script: the per-request name check raises (a bug past the CONNECT)."""

from claude_proxy.proxy import enforcer


def _broken(*args: object) -> str | None:
    raise RuntimeError("simulated bug in the request check")


enforcer.misnamed = _broken  # type: ignore[assignment]
