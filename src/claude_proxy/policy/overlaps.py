"""How two rules relate: does one cover everything the other names, or do they share anything?

Pure Python. `config check` uses these to find an allow that a deny makes useless (an error), a
pass-through that an inspecting rule always wins over (an error), and duplicates (warnings).
They err on the side of saying no: a missed report is harmless, a false one is not.
"""

from __future__ import annotations

import ipaddress

from claude_proxy.policy.rules import CIDR, DENY, IP, NAME, WILDCARD, Rule


def _under(name: str, domain: str) -> bool:
    return name.endswith("." + domain)


def destination_covers(outer: Rule, inner: Rule) -> bool:
    """Whether every destination `inner` names, `outer` names too (ports and schemes aside)."""
    if outer.kind == NAME:
        return inner.kind == NAME and inner.host == outer.host
    if outer.kind == WILDCARD:
        if inner.kind == WILDCARD and inner.host == outer.host:
            return True
        return inner.kind in (NAME, WILDCARD) and _under(inner.host, outer.host)
    if outer.kind == IP:
        return inner.kind == IP and inner.host == outer.host
    network = outer.network
    if network is None:
        return False
    if inner.kind == IP:
        ip = ipaddress.ip_address(inner.host)
        return ip.version == network.version and ip in network
    if inner.kind == CIDR and inner.network is not None:
        subnet = inner.network
        return subnet.version == network.version and subnet.subnet_of(network)  # type: ignore[arg-type]
    return False


def destinations_meet(a: Rule, b: Rule) -> bool:
    """Whether some destination is named by both rules."""
    if destination_covers(a, b) or destination_covers(b, a):
        return True
    if a.kind == WILDCARD and b.kind == WILDCARD:
        return _under(a.host, b.host) or _under(b.host, a.host)
    return False


def ports_cover(outer: Rule, inner: Rule) -> bool:
    if outer.ports is None:
        return True
    return inner.ports is not None and inner.ports <= outer.ports


def ports_meet(a: Rule, b: Rule) -> bool:
    return a.ports is None or b.ports is None or bool(a.ports & b.ports)


def covers(outer: Rule, inner: Rule) -> bool:
    """Whether every request `inner` is about, `outer` is about too.

    A deny's paths match in any case; an allow's only in the case written.
    """
    if not (
        destination_covers(outer, inner)
        and ports_cover(outer, inner)
        and inner.schemes <= outer.schemes
    ):
        return False
    if outer.methods is not None and (inner.methods is None or not inner.methods <= outer.methods):
        return False
    if outer.paths is None:
        return True
    if inner.paths is None:
        return False
    fold = outer.action == DENY
    return all(any(o.covers(i, ignore_case=fold) for o in outer.paths) for i in inner.paths)


def meets(a: Rule, b: Rule) -> bool:
    """Whether some destination, port and scheme are named by both rules."""
    return destinations_meet(a, b) and ports_meet(a, b) and bool(a.schemes & b.schemes)
