"""Test-only mitmproxy script: the policy raises on every decision (a bug in the policy)."""

from typing import Any

from claude_proxy import policy


def _broken(self: policy.Policy, *args: Any) -> policy.Decision:
    raise RuntimeError("simulated bug in the policy")


policy.Policy.decide = _broken  # type: ignore[method-assign]
policy.Policy.decide_request = _broken  # type: ignore[method-assign]
