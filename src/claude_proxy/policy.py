"""The allowlist: rule parsing, host normalization and the allow/refuse decision.

Pure Python, no mitmproxy: every enforcement point in the proxy asks `Allowlist.decide`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_PORT = 443
CLEARTEXT_PORT = 80
HTTPS = "https"
HTTP = "http"  # cleartext: only where a rule says http://

DEFAULT_RULES: tuple[str, ...] = (
    "anthropic.com",
    "*.anthropic.com",
    "claude.ai",
    "*.claude.ai",
    "claude.com",
    "*.claude.com",
)

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_PORT_SUFFIX = re.compile(r"^(?P<host>.*):(?P<port>[^:\]]*)$")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Rule:
    """One allowlist entry: an exact host (or IP literal), or `*.domain` (strict subdomains).

    `scheme` is how traffic to it may travel: "https" (a tunnel with TLS inside, the default) or
    "http" (cleartext, only for a rule written http://HOST).
    """

    text: str
    host: str
    port: int
    wildcard: bool
    scheme: str = HTTPS

    def matches(self, host: str, port: int) -> bool:
        if port != self.port:
            return False
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    rule: str | None = None


def split_host_port(text: str, *, what: str = "authority") -> tuple[str, int | None]:
    """Split `host:port`, `[v6]:port`, `[v6]` or a bare host; the port is None when absent."""
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise ValueError(f"{what} has an unclosed '['")
        host, rest = text[1:end], text[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"{what} has junk after ']'")
        return host, _parse_port(rest[1:], what=what)
    if text.count(":") > 1:
        return text, None  # a bare IPv6 literal
    m = _PORT_SUFFIX.match(text)
    if m is None:
        return text, None
    return m["host"], _parse_port(m["port"], what=what)


def _parse_port(text: str, *, what: str) -> int:
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{what} has a bad port {text!r} (expected 1-65535)")
    return int(text)


def parse_ip(host: str) -> IPAddress | None:
    """The IP address `host` spells, if it is an IP literal (brackets allowed around IPv6)."""
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


def _canonical_name(name: str) -> str:
    """Lowercase, one trailing dot dropped, each label a valid A-label; else ValueError."""
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253:
        raise ValueError("is not a valid host name")
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise ValueError("is not a valid host name")
    if labels[-1].isdigit() or labels[-1].startswith("0x"):
        # Resolvers read these as IPv4 numbers ("2130706433", "127.1", "0x7f.1"): never a name.
        raise ValueError("is a numeric address, not a host name")
    return name


def normalize_host(host: str) -> str:
    """The canonical spelling of a host a client asked for: a lowercase A-label name or an IP.

    Non-ASCII input is refused rather than converted: clients send A-labels, and the decision must
    be made on exactly the name the proxy would connect to.
    """
    if ip := parse_ip(host):
        return str(ip)
    if not host.isascii():
        raise ValueError("is not ASCII (clients send IDNA A-labels, e.g. xn--…)")
    return _canonical_name(host)


def _to_a_labels(name: str) -> str:
    """`bücher.example` → `xn--bcher-kva.example` (IDNA 2003, as Python's codec does it)."""
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError("is not a valid host name") from None


def parse_rule(text: str) -> Rule:
    """Parse one allowlist rule: `host`, `*.domain` or an IP literal, with an optional `:port`.

    `http://` before it allows cleartext HTTP instead of HTTPS (default port 80).
    """
    raw = text.strip()
    what = f"rule {text!r}"
    if not raw:
        raise ValueError("empty rule")
    scheme, default_port, bare = HTTPS, DEFAULT_PORT, raw
    if raw.lower().startswith("http://"):
        scheme, default_port, bare = HTTP, CLEARTEXT_PORT, raw[len("http://") :]
    if "://" in bare or any(c in bare for c in "/@?#% \t"):
        raise ValueError(
            f"{what} must be a host or *.domain with an optional :port, not a URL "
            "(HTTPS is the default; http://HOST allows cleartext)"
        )
    host, port = split_host_port(bare, what=what)
    port = default_port if port is None else port
    if ip := parse_ip(host):
        if ip.is_unspecified:
            raise ValueError(f"{what}: {ip} means every address of this machine, not a destination")
        return Rule(text=raw, host=str(ip), port=port, wildcard=False, scheme=scheme)
    wildcard = host.startswith("*.")
    name = host[2:] if wildcard else host
    if "*" in name:
        raise ValueError(f"{what}: '*' is allowed only as a whole first label, as in *.example.com")
    try:
        canonical = _canonical_name(name if name.isascii() else _to_a_labels(name))
    except ValueError as e:
        raise ValueError(f"{what}: {name!r} {e}") from None
    if wildcard and "." not in canonical:
        raise ValueError(
            f"{what} is too broad: a wildcard needs a domain with a dot (*.example.com)"
        )
    return Rule(text=raw, host=canonical, port=port, wildcard=wildcard, scheme=scheme)


def parse_rules(texts: Iterable[str]) -> tuple[Rule, ...]:
    return tuple(parse_rule(t) for t in texts)


class Allowlist:
    """The set of destinations the proxy lets through; everything else is refused."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = tuple(rules)
        self._exact: dict[tuple[str, int, str], Rule] = {}
        self._wildcard: dict[tuple[str, int, str], Rule] = {}
        for rule in self.rules:
            table = self._wildcard if rule.wildcard else self._exact
            table.setdefault((rule.host, rule.port, rule.scheme), rule)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> Allowlist:
        return cls(parse_rules(texts))

    def decide(self, host: str, port: int, scheme: str = HTTPS) -> Decision:
        """Whether `scheme` traffic to host:port may pass; HTTPS unless said otherwise."""
        try:
            name = normalize_host(host)
        except ValueError as e:
            return Decision(False, f"host {host!r} {e}")
        if rule := self._match(name, port, scheme):
            return Decision(True, "allowed", rule.text)
        if scheme == HTTP and (rule := self._match(name, port, HTTPS)):
            return Decision(
                False,
                f"cleartext HTTP to {name}:{port} is not allowed "
                f"(rule {rule.text} allows HTTPS only)",
            )
        other_ports = sorted(
            {r.port for r in self.rules if r.scheme == scheme and r.matches(name, r.port)}
        )
        if other_ports:
            allowed = ", ".join(map(str, other_ports))
            return Decision(False, f"port {port} is not allowed for {name} (allowed: {allowed})")
        return Decision(False, f"{name} is not on the allowlist")

    def _match(self, name: str, port: int, scheme: str) -> Rule | None:
        if rule := self._exact.get((name, port, scheme)):
            return rule
        if parse_ip(name) is None:
            # Walk the parent domains: a.b.example.com → b.example.com → example.com → com.
            parent = name
            while "." in parent:
                parent = parent.split(".", 1)[1]
                if rule := self._wildcard.get((parent, port, scheme)):
                    return rule
        return None
