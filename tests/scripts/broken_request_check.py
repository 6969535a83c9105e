"""Test-only mitmproxy script: the per-request name check raises (a bug past the CONNECT)."""

from claude_proxy import addon


def _broken(*args: object) -> str | None:
    raise RuntimeError("simulated bug in the request check")


addon.misnamed = _broken  # type: ignore[assignment]
