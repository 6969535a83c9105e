"""The policy: rule parsing, host normalization and the allow/refuse decisions.

Pure Python, no mitmproxy. Every enforcement point asks `Policy.decide` (a destination: CONNECT,
SOCKS5, an upstream connection) or `Policy.decide_request` (a request to it). A deny rule wins over
every allow rule, whatever their order; what no allow rule names is refused.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from typing import NamedTuple

from claude_proxy.policy import url_paths
from claude_proxy.policy.addresses import embedded_ipv4
from claude_proxy.policy.url_paths import PathPattern

DEFAULT_PORT = 443
CLEARTEXT_PORT = 80
HTTPS = "https"
HTTP = "http"  # cleartext: only where a rule says http://
SCHEMES = frozenset({HTTPS, HTTP})
ALLOW, DENY = "allow", "deny"
NAME, WILDCARD, IP, CIDR = "name", "wildcard", "ip", "cidr"  # what a rule's destination is
DEFAULT_ORIGIN = "built-in default"
FLAG_ORIGIN = "--allow"
DEFAULTS_SOURCE = "the built-in defaults"

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
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Rule(NamedTuple):
    """One allow or deny rule: a destination, and optionally the requests it is about.

    The destination is an exact host name, `*.domain` (strict subdomains), an IP literal or a
    network; `ports` None means every port (deny rules only). `schemes` is how traffic may travel:
    "https" (a tunnel with TLS inside) or "http" (cleartext). A rule with `methods` or `paths`
    decides requests, not destinations. `inspect` False: a pass-through tunnel, never decrypted.
    """

    text: str  # how logs and `check` name it: the rule as written, or FILE:LINE
    host: str  # a canonical name, the domain of a wildcard, an IP or a network, as text
    kind: str = NAME
    ports: frozenset[int] | None = frozenset({DEFAULT_PORT})
    schemes: frozenset[str] = frozenset({HTTPS})
    action: str = ALLOW
    methods: frozenset[str] | None = None  # upper case
    paths: tuple[PathPattern, ...] | None = None
    inspect: bool = True
    origin: str = FLAG_ORIGIN  # where it was written: the defaults, --allow, or FILE:LINE
    # False: a Messages request to this destination may send Anthropic's servers anywhere
    check_server_fetch: bool = True
    comment: str = ""
    network: IPNetwork | None = None  # follows from `host`: comparing it changes nothing

    @property
    def wildcard(self) -> bool:
        return self.kind == WILDCARD

    @property
    def by_request(self) -> bool:
        """Whether the rule looks inside requests (methods, paths), not only at the destination."""
        return self.methods is not None or self.paths is not None

    def applies_to(self, port: int, scheme: str) -> bool:
        return (self.ports is None or port in self.ports) and scheme in self.schemes

    def matches_request(self, method: str, path: str | None) -> bool:
        """Whether a request to a destination this rule names is one it is about.

        `path` is normalized, or None when it is ambiguous. A deny matches every case spelling
        and every ambiguous path; an allow only the exact method and an unambiguous path.
        """
        deny = self.action == DENY
        if self.methods is not None and (method.upper() if deny else method) not in self.methods:
            return False
        if self.paths is not None:
            if path is None:
                return deny
            return any(p.matches(path, ignore_case=deny) for p in self.paths)
        return True

    def destination(self) -> str:
        """The destination as a user writes it: `*.example.com`, `[::1]`, `10.0.0.0/8`."""
        if self.kind == WILDCARD:
            return "*." + self.host
        if self.kind == IP and ":" in self.host:
            return f"[{self.host}]"
        return self.host

    def describe(self) -> str:
        """The whole rule on one line: `http://host:80,8080 GET,HEAD /v1/ pass-through`."""
        ports = "*" if self.ports is None else ",".join(map(str, sorted(self.ports)))
        scheme = "http://" if self.schemes == {HTTP} else ""
        words = [f"{scheme}{self.destination()}:{ports}"]
        if self.methods is not None:
            words.append(",".join(sorted(self.methods)))
        if self.paths is not None:
            words.extend(p.text for p in self.paths)
        if not self.inspect:
            words.append("pass-through")
        return " ".join(words)


class Decision(NamedTuple):
    allowed: bool
    reason: str
    rule: str | None = None  # the rule that decided, as logs name it
    inspect: bool = True  # False: an allowed pass-through tunnel
    origin: str | None = None  # where that rule was written


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


@functools.lru_cache(maxsize=4096)  # every decision asks; a tunnel asks about the same host often
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


@functools.lru_cache(maxsize=4096)
def normalize_host(host: str) -> str:
    """The canonical spelling of a host a client asked for: a lowercase A-label name or an IP.

    Non-ASCII input is refused rather than converted: clients send A-labels, and the decision must
    be made on exactly the name the proxy would connect to.
    """
    if ip := parse_ip(host):
        _no_scope(ip)
        return str(ip)
    if not host.isascii():
        raise ValueError("is not ASCII (clients send IDNA A-labels, e.g. xn--…)")
    return _canonical_name(host)


def _no_scope(ip: IPAddress) -> None:
    """An IPv6 scope id (`%eth0`, `%0`) names an interface of this machine, and makes the address
    compare unequal to the same address in a rule: refused wherever an address is read."""
    if getattr(ip, "scope_id", None) is not None:
        raise ValueError("has an IPv6 scope id (%…), which names an interface, not a destination")


def _to_a_labels(name: str) -> str:
    """`bücher.example` → `xn--bcher-kva.example`, and `faß.de` → `xn--fa-hia.de`: UTS-46 with
    IDNA 2008, non-transitional, as browsers and curl convert names (IDNA 2003 made it fass.de)."""
    import idna

    try:
        return idna.encode(name, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        raise ValueError("is not a valid host name (IDNA 2008)") from None


def parse_destination(text: str, *, what: str) -> tuple[str, str, IPNetwork | None]:
    """A rule's destination: (kind, canonical text, network). ValueError names `what`."""
    if "/" in text:
        try:
            network = ipaddress.ip_network(text.strip("[]"), strict=True)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        return CIDR, str(network), network
    if ip := parse_ip(text):
        try:
            _no_scope(ip)
        except ValueError as e:
            raise ValueError(f"{what}: {text} {e}") from None
        if ip.is_unspecified:
            raise ValueError(f"{what}: {ip} means every address of this machine, not a destination")
        return IP, str(ip), None
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
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
    return (WILDCARD if wildcard else NAME), canonical, None


def parse_rule(text: str, *, origin: str = FLAG_ORIGIN) -> Rule:
    """Parse one allow rule as `--allow` takes it: `host`, `*.domain` or an IP literal, with an
    optional `:port`. `http://` before it allows cleartext HTTP instead of HTTPS (default port 80).
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
    kind, canonical, _ = parse_destination(host, what=what)
    return Rule(
        text=raw,
        host=canonical,
        kind=kind,
        ports=frozenset({default_port if port is None else port}),
        schemes=frozenset({scheme}),
        origin=origin,
    )


def parse_rules(texts: Iterable[str], *, origin: str = FLAG_ORIGIN) -> tuple[Rule, ...]:
    return tuple(parse_rule(t, origin=origin) for t in texts)


def default_rules() -> tuple[Rule, ...]:
    return parse_rules(DEFAULT_RULES, origin=DEFAULT_ORIGIN)


class _Index:
    """Rules by destination, so that a decision looks only at the few that can match."""

    def __init__(self, rules: Iterable[Rule], *, embedded: bool) -> None:
        self.embedded = embedded  # an IPv6 address also stands for the IPv4 ones it carries
        self.names: dict[str, list[Rule]] = {}
        self.domains: dict[str, list[Rule]] = {}
        self.ips: dict[IPAddress, list[Rule]] = {}
        self.networks: list[Rule] = []
        for rule in rules:
            if rule.kind == NAME:
                self.names.setdefault(rule.host, []).append(rule)
            elif rule.kind == WILDCARD:
                self.domains.setdefault(rule.host, []).append(rule)
            elif rule.kind == IP:
                self.ips.setdefault(ipaddress.ip_address(rule.host), []).append(rule)
            else:
                self.networks.append(rule)

    def candidates(self, name: str, ip: IPAddress | None) -> list[Rule]:
        """Rules whose destination names `name`: exact first, then the nearest wildcard."""
        if ip is None:
            found = list(self.names.get(name, ()))
            if self.domains:
                # Walk the parent domains: a.b.example.com → b.example.com → example.com → com.
                parent = name
                while "." in parent:
                    parent = parent.split(".", 1)[1]
                    found += self.domains.get(parent, ())
            return found
        addresses: list[IPAddress] = [ip]
        if self.embedded and isinstance(ip, ipaddress.IPv6Address):
            addresses += embedded_ipv4(ip)
        found = []
        for address in addresses:
            found += self.ips.get(address, ())
            for rule in self.networks:
                assert rule.network is not None
                if address.version == rule.network.version and address in rule.network:
                    found.append(rule)
        return found


class Policy:
    """What the proxy lets through: the allow rules, less what a deny rule names."""

    def __init__(self, rules: Iterable[Rule], *, source: str = DEFAULTS_SOURCE) -> None:
        self.rules = tuple(rules)
        self.source = source  # where the rules come from, as a refusal names it
        self._allow = _Index((r for r in self.rules if r.action == ALLOW), embedded=False)
        # A deny names an address in every spelling: ::ffff:10.0.0.1 is 10.0.0.1.
        self._deny = _Index((r for r in self.rules if r.action == DENY), embedded=True)
        self._paths = any(r.paths is not None for r in self.rules)

    @classmethod
    def from_texts(
        cls, texts: Iterable[str], *, origin: str = FLAG_ORIGIN, source: str = DEFAULTS_SOURCE
    ) -> Policy:
        return cls(parse_rules(texts, origin=origin), source=source)

    def decide(self, host: str, port: int, scheme: str = HTTPS) -> Decision:
        """Whether `scheme` traffic to host:port may pass; HTTPS unless said otherwise.

        A rule with methods or paths allows the destination; each request is then decided by
        `decide_request`. When an inspecting and a pass-through rule both allow it, it is inspected.
        """
        try:
            name = normalize_host(host)
        except ValueError as e:
            return Decision(False, f"host {host!r} {e}")
        ip = parse_ip(name)
        denies = self._applying(self._deny, name, ip, port, scheme)
        for rule in denies:
            if not rule.by_request:
                return _denied(f"{_shown(name, port)} is", rule)
        allows = self._applying(self._allow, name, ip, port, scheme)
        if not allows:
            return Decision(False, self._why_not(name, ip, port, scheme))
        for rule in allows:
            if rule.inspect:
                return Decision(True, "allowed", rule.text, origin=rule.origin)
        passing = allows[0]
        if denies:  # a rule about requests cannot be enforced on what is never decrypted
            return Decision(
                False,
                f"the rule at {denies[0].text} checks requests to {name}, which the rule at "
                f"{passing.text} passes through uninspected",
                denies[0].text,
                origin=denies[0].origin,
            )
        return Decision(True, "allowed", passing.text, inspect=False, origin=passing.origin)

    def decides_requests(self, host: str, port: int, scheme: str) -> bool:
        """Whether a rule about methods or paths applies to host:port."""
        try:
            name = normalize_host(host)
        except ValueError:
            return True
        ip = parse_ip(name)
        rules = [
            *self._applying(self._deny, name, ip, port, scheme),
            *self._applying(self._allow, name, ip, port, scheme),
        ]
        return any(r.by_request for r in rules)

    def server_fetch_unchecked(self, host: str, port: int) -> Rule | None:
        """The allow rule, if any, that turns the server-fetch check off for host:port."""
        try:
            name = normalize_host(host)
        except ValueError:
            return None
        allows = self._applying(self._allow, name, parse_ip(name), port, HTTPS)
        return next((r for r in allows if not r.check_server_fetch), None)

    def decide_request(
        self, host: str, port: int, scheme: str, method: str, target: str
    ) -> Decision:
        """Whether a `method` request for `target` (path and query) to host:port may pass."""
        try:
            name = normalize_host(host)
        except ValueError as e:
            return Decision(False, f"host {host!r} {e}")
        ip = parse_ip(name)
        denies = self._applying(self._deny, name, ip, port, scheme)
        allows = [r for r in self._applying(self._allow, name, ip, port, scheme) if r.inspect]
        path: str | None = None
        ambiguity = None
        if self._paths and any(r.paths is not None for r in (*denies, *allows)):
            try:
                path = url_paths.normalize(target)
            except url_paths.AmbiguousPath as e:
                ambiguity = str(e)
        shown = path or target.split("?", 1)[0]
        for rule in denies:
            if rule.matches_request(method, path):
                what = f"{method} {shown} on {_shown(name, port)} is" if rule.by_request else None
                return _denied(what or f"{_shown(name, port)} is", rule)
        if not allows:
            decision = self.decide(host, port, scheme)
            if decision.allowed:  # only as a pass-through: its requests were never to be seen
                return Decision(
                    False,
                    f"{_shown(name, port)} is a pass-through destination now; "
                    "open a new connection",
                    decision.rule,
                    origin=decision.origin,
                )
            return decision
        for rule in allows:
            if rule.matches_request(method, path):
                return Decision(True, "allowed", rule.text, origin=rule.origin)
        if ambiguity is not None and any(r.paths is not None for r in allows):
            reason = f"the path has {ambiguity}: where a path rule applies, it is refused"
        else:
            reason = f"no rule allows {method} {shown} on {_shown(name, port)}"
        return Decision(False, reason)

    @staticmethod
    def _applying(
        index: _Index, name: str, ip: IPAddress | None, port: int, scheme: str
    ) -> list[Rule]:
        candidates = index.candidates(name, ip)
        return [r for r in candidates if r.applies_to(port, scheme)]

    def _why_not(self, name: str, ip: IPAddress | None, port: int, scheme: str) -> str:
        candidates = self._allow.candidates(name, ip)
        if scheme == HTTP:
            for rule in candidates:
                if rule.applies_to(port, HTTPS):
                    return (
                        f"cleartext HTTP to {name}:{port} is not allowed "
                        f"(rule {rule.text} allows HTTPS only)"
                    )
        other_ports = sorted(
            {p for r in candidates if scheme in r.schemes and r.ports for p in r.ports}
        )
        if other_ports:
            allowed = ", ".join(map(str, other_ports))
            return f"port {port} is not allowed for {name} (allowed: {allowed})"
        return f"{name} is not on the allowlist"


def _shown(name: str, port: int) -> str:
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


def _denied(what: str, rule: Rule) -> Decision:
    return Decision(
        False, f"{what} denied by the rule at {rule.text}", rule.text, origin=rule.origin
    )
