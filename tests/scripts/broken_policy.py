"""Test-only mitmproxy script: the policy raises on every decision (a bug in the policy)."""

from typing import Any

from claude_proxy.policy import rules


def _broken(self: rules.Policy, *args: Any) -> rules.Decision:
    raise RuntimeError("simulated bug in the policy")


rules.Policy.decide = _broken  # type: ignore[method-assign]
rules.Policy.decide_request = _broken  # type: ignore[method-assign]
