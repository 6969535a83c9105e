"""Test-only mitmproxy script: the allowlist raises on every decision (a bug in the policy)."""

from claude_proxy import policy


def _broken(self: policy.Allowlist, host: str, port: int) -> policy.Decision:
    raise RuntimeError("simulated bug in the policy")


policy.Allowlist.decide = _broken  # type: ignore[method-assign]
