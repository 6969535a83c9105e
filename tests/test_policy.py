"""The allowlist as a decision table, and the rules it refuses to parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from claude_proxy.policy import config_file
from claude_proxy.policy.rules import (
    DEFAULT_RULES,
    DENY,
    WILDCARD,
    Policy,
    Rule,
    normalize_host,
    parse_rule,
)

DEFAULTS = Policy.from_texts(DEFAULT_RULES)
WITH_EXTRAS = Policy.from_texts(
    [
        *DEFAULT_RULES,
        "localhost:8443",
        "10.1.2.3:8080",
        "[::1]:9000",
        "bücher.example",
        "faß.de",
        "*.Internal.Example.",
    ]
)


@pytest.mark.parametrize(
    ("host", "port", "rule"),
    [
        # allowed by the defaults
        ("api.anthropic.com", 443, "*.anthropic.com"),
        ("anthropic.com", 443, "anthropic.com"),
        ("claude.ai", 443, "claude.ai"),
        ("downloads.claude.ai", 443, "*.claude.ai"),
        ("platform.claude.com", 443, "*.claude.com"),
        ("claude.com", 443, "claude.com"),
        ("console.anthropic.com", 443, "*.anthropic.com"),
        ("mcp-proxy.anthropic.com", 443, "*.anthropic.com"),
        ("statsig.anthropic.com", 443, "*.anthropic.com"),
        ("a.b.c.anthropic.com", 443, "*.anthropic.com"),  # any depth
        ("API.Anthropic.COM", 443, "*.anthropic.com"),  # case-insensitive
        ("api.anthropic.com.", 443, "*.anthropic.com"),  # trailing dot
        ("claude.ai.", 443, "claude.ai"),
        # refused by the defaults
        ("api.anthropic.com", 80, None),  # another port
        ("api.anthropic.com", 8443, None),
        ("claude.ai", 8080, None),
        ("example.com", 443, None),
        ("anthropic.com.evil.example", 443, None),  # contains an allowed name
        ("api.anthropic.com.evil.example", 443, None),
        ("evilanthropic.com", 443, None),  # ends like one
        ("evil-anthropic.com", 443, None),
        ("anthropic.co", 443, None),
        ("claude.aix", 443, None),
        ("xclaude.ai", 443, None),
        ("anthropic.com..", 443, None),  # two trailing dots
        (".anthropic.com", 443, None),  # empty label
        ("api..anthropic.com", 443, None),
        ("*.anthropic.com", 443, None),  # a wildcard is not a host
        ("user@api.anthropic.com", 443, None),  # userinfo
        ("api%2eanthropic.com", 443, None),  # percent-encoding
        ("api.anthropic.com/x", 443, None),
        ("api.anthropic.com:443", 443, None),  # a port is not part of a host
        ("\u0430pi.anthropic.com", 443, None),  # Cyrillic a: refused, not converted
        ("xn--pi-7kc.anthropic.com", 443, "*.anthropic.com"),  # its A-label is a real subdomain
        ("\uff41pi.anthropic.com", 443, None),  # fullwidth letters
        ("api.anthropic.com\x00.evil", 443, None),
        ("api.anthropic.com\r\nx", 443, None),
        ("", 443, None),
        ("-api.anthropic.com", 443, None),
        ("a" * 64 + ".anthropic.com", 443, None),  # label over 63 characters
        ("127.0.0.1", 443, None),  # IP literals never match names
        ("::1", 443, None),
        ("[::1]", 443, None),
        ("160.79.104.10", 443, None),  # an address of api.anthropic.com
        ("2130706433", 443, None),  # 127.0.0.1 as a number
        ("0x7f.1", 443, None),
        ("127.1", 443, None),
        ("1.1.1.1.anthropic.com", 443, "*.anthropic.com"),  # a name, not an address
        ("mitm.it", 443, None),
        ("localhost", 443, None),
    ],
)
def test_defaults(host: str, port: int, rule: str | None) -> None:
    decision = DEFAULTS.decide(host, port)
    assert decision.allowed is (rule is not None)
    assert decision.rule == rule
    if rule is None:
        assert decision.reason


@pytest.mark.parametrize(
    ("host", "port", "allowed"),
    [
        ("localhost", 8443, True),
        ("LOCALHOST.", 8443, True),
        ("localhost", 443, False),
        ("10.1.2.3", 8080, True),
        ("10.1.2.3", 443, False),
        ("10.1.2.4", 8080, False),
        ("::1", 9000, True),
        ("[::1]", 9000, True),
        ("0:0:0:0:0:0:0:1", 9000, True),  # the same address, spelt long
        ("xn--bcher-kva.example", 443, True),  # IDNA rule matches the A-label
        ("bücher.example", 443, False),  # the client must send the A-label
        ("xn--fa-hia.de", 443, True),  # faß.de as browsers and curl send it (UTS-46, IDNA 2008)
        ("fass.de", 443, False),  # what IDNA 2003 made of it: another domain
        ("a.internal.example", 443, True),
        ("internal.example", 443, False),  # *.domain never matches the domain itself
    ],
)
def test_extra_rules(host: str, port: int, allowed: bool) -> None:
    assert WITH_EXTRAS.decide(host, port).allowed is allowed


def test_refusal_reasons_say_what_is_wrong() -> None:
    assert DEFAULTS.decide("api.anthropic.com", 8443).reason == (
        "port 8443 is not allowed for api.anthropic.com (allowed: 443)"
    )
    assert DEFAULTS.decide("example.com", 443).reason == "example.com is not on the allowlist"
    assert "numeric address" in DEFAULTS.decide("2130706433", 443).reason
    assert "not ASCII" in DEFAULTS.decide("\u0430pi.anthropic.com", 443).reason


def test_empty_allowlist_refuses_everything() -> None:
    assert not Policy(()).decide("api.anthropic.com", 443).allowed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty rule"),
        ("   ", "empty rule"),
        ("*example.com", "'*' is allowed only as a whole first label"),
        ("*.com", "too broad"),
        ("*", "'*' is allowed only"),
        ("*.*.example.com", "'*' is allowed only"),
        ("api.*.example.com", "'*' is allowed only"),
        ("https://api.anthropic.com", "not a URL"),
        ("api.anthropic.com/v1", "not a URL"),
        ("user@example.com", "not a URL"),
        ("example.com:0", "bad port"),
        ("example.com:65536", "bad port"),
        ("example.com:https", "bad port"),
        ("example.com:", "bad port"),
        ("[::1", "unclosed"),
        ("[::1]x", "junk after"),
        ("exa mple.com", "not a URL"),
        ("-example.com", "not a valid host name"),
        ("example..com", "not a valid host name"),
        ("2130706433", "numeric address"),
    ],
)
def test_invalid_rules(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=None) as excinfo:
        parse_rule(text)
    assert message in str(excinfo.value)
    if text.strip():
        assert repr(text) in str(excinfo.value)  # the message names the rule


@pytest.mark.parametrize(
    ("text", "host", "port", "wildcard"),
    [
        ("api.anthropic.com", "api.anthropic.com", 443, False),
        ("*.Anthropic.com.", "anthropic.com", 443, True),
        ("localhost:8443", "localhost", 8443, False),
        ("[::1]:9000", "::1", 9000, False),
        ("::1", "::1", 443, False),
        ("bücher.example", "xn--bcher-kva.example", 443, False),
        ("faß.de", "xn--fa-hia.de", 443, False),
        (" claude.ai ", "claude.ai", 443, False),
    ],
)
def test_valid_rules(text: str, host: str, port: int, wildcard: bool) -> None:
    rule = parse_rule(text)
    assert (rule.host, rule.ports, rule.wildcard) == (host, frozenset({port}), wildcard)


def test_normalize_host() -> None:
    assert normalize_host("API.Anthropic.com.") == "api.anthropic.com"
    assert normalize_host("[0:0::1]") == "::1"
    with pytest.raises(ValueError):
        normalize_host("bücher.example")
    with pytest.raises(ValueError, match="scope id"):
        normalize_host("[2001:db8::5%0]")


@pytest.mark.parametrize("host", ["2001:db8::5", "2001:db8::5%0", "[2001:db8::5%eth0]"])
def test_a_scope_id_does_not_dodge_a_deny_under_an_allowed_network(host: str) -> None:
    text = b'[[allow]]\ncidr = "2001:db8::/32"\n[[deny]]\nip = "2001:db8::5"\n'
    policy = config_file.build_policy(config_file.parse(Path("/c/config.toml"), text))
    assert policy.decide("2001:db8::6", 443).allowed  # the network is allowed
    decision = policy.decide(host, 443)
    assert not decision.allowed
    assert "scope id" in decision.reason or "2001:db8::5" in decision.reason


def test_a_rule_with_a_scope_id_is_refused() -> None:
    with pytest.raises(config_file.ConfigError, match="scope id"):
        config_file.parse(Path("/c/config.toml"), b'[[deny]]\nip = "fe80::1%eth0"\n')


@pytest.mark.parametrize(
    ("rules", "host", "port", "scheme", "allowed"),
    [
        (DEFAULT_RULES, "api.anthropic.com", 443, "https", True),
        (DEFAULT_RULES, "api.anthropic.com", 443, "http", False),  # cleartext to a TLS port
        (DEFAULT_RULES, "api.anthropic.com", 80, "http", False),
        (("http://plain.example",), "plain.example", 80, "http", True),
        (("http://plain.example",), "plain.example", 80, "https", False),
        (("http://plain.example",), "plain.example", 443, "http", False),
        (("http://plain.example:8080",), "plain.example", 8080, "http", True),
        (("http://*.plain.example",), "a.plain.example", 80, "http", True),
        (("HTTP://10.0.0.5",), "10.0.0.5", 80, "http", True),
    ],
)
def test_scheme_must_match_the_rule(
    rules: tuple[str, ...], host: str, port: int, scheme: str, allowed: bool
) -> None:
    assert Policy.from_texts(rules).decide(host, port, scheme).allowed is allowed


def test_cleartext_refusal_names_the_rule() -> None:
    decision = DEFAULTS.decide("api.anthropic.com", 443, "http")
    assert decision.reason == (
        "cleartext HTTP to api.anthropic.com:443 is not allowed "
        "(rule *.anthropic.com allows HTTPS only)"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.0.0.0", "means every address of this machine"),
        ("[::]", "means every address of this machine"),
        ("http://0.0.0.0:80", "means every address of this machine"),
        ("https://x.example", "not a URL"),
        ("http://x.example/path", "not a URL"),
        ("http://", "not a valid host name"),
    ],
)
def test_rules_that_name_no_destination(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rule(text)


# The user's rules (config.toml): deny, ip/cidr, ports, methods, paths, pass-through.


def policy_from(toml: str, flags: tuple[str, ...] = ()) -> Policy:
    return config_file.build_policy(config_file.parse(Path("/c/config.toml"), toml.encode()), flags)


DENY_AND_ALLOW = (
    """
    [[allow]]
    host = "*.example.com"
    ports = [443, 8443]
    """,
    """
    [[deny]]
    host = "secret.example.com"
    """,
    """
    [[deny]]
    host = "*.internal.example.com"
    ports = [8443]
    """,
)


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 0, 2)])
@pytest.mark.parametrize(
    ("host", "port", "allowed", "rule"),
    [
        ("a.example.com", 443, True, "config.toml:2"),
        ("a.example.com", 8443, True, "config.toml:2"),
        ("a.example.com", 80, False, None),
        ("secret.example.com", 443, False, "deny"),  # deny wins over the wildcard
        ("secret.example.com", 8443, False, "deny"),  # a deny without ports: every port
        ("SECRET.example.com.", 443, False, "deny"),
        ("x.secret.example.com", 443, True, "config.toml:2"),  # an exact deny is exact
        ("a.internal.example.com", 8443, False, "deny"),
        ("a.internal.example.com", 443, True, "config.toml:2"),  # only the ports it names
        ("internal.example.com", 8443, True, "config.toml:2"),  # *.d never names d
    ],
)
def test_deny_wins_whatever_the_order(
    order: tuple[int, ...], host: str, port: int, allowed: bool, rule: str | None
) -> None:
    text = "defaults = false\n" + "".join(DENY_AND_ALLOW[i] for i in order)
    decision = policy_from(text).decide(host, port)
    assert decision.allowed is allowed
    if rule == "deny":
        assert "is denied by the rule at config.toml:" in decision.reason
        assert decision.origin is not None and decision.origin.startswith("/c/config.toml:")
    elif rule is not None:
        header = text[: text.index("[[allow]]")].count("\n") + 1
        assert decision.rule == f"config.toml:{header}"


@pytest.mark.parametrize(
    ("defaults", "host", "allowed"),
    [
        ("true", "api.anthropic.com", True),
        ("true", "claude.ai", True),
        ("true", "github.com", True),
        ("false", "api.anthropic.com", False),
        ("false", "claude.ai", False),
        ("false", "github.com", True),
    ],
)
def test_defaults_on_and_off(defaults: str, host: str, allowed: bool) -> None:
    chosen = policy_from(f'defaults = {defaults}\n[[allow]]\nhost = "github.com"\n')
    assert chosen.decide(host, 443).allowed is allowed


def test_a_deny_takes_away_part_of_the_defaults() -> None:
    chosen = policy_from('[[deny]]\nhost = "statsig.anthropic.com"\n')
    assert chosen.decide("api.anthropic.com", 443).allowed
    assert not chosen.decide("statsig.anthropic.com", 443).allowed


METHODS_AND_PATHS = policy_from(
    """
    defaults = false
    [[allow]]
    host = "registry.example"
    methods = ["GET", "head"]
    paths = ["/v1/", "/pkg/*/tarball", "/docs/**"]

    [[allow]]
    host = "api.example"

    [[deny]]
    host = "api.example"
    paths = ["/admin"]

    [[deny]]
    host = "api.example"
    methods = ["DELETE"]
    """
)


@pytest.mark.parametrize(
    ("host", "method", "target", "allowed"),
    [
        # an allow with methods and paths: exactly those
        ("registry.example", "GET", "/v1/x", True),
        ("registry.example", "HEAD", "/v1/x", True),  # methods are upper-cased in the rule
        ("registry.example", "POST", "/v1/x", False),
        ("registry.example", "get", "/v1/x", False),  # an allow names the method exactly
        ("registry.example", "GET", "/v1/x?q=/../admin", True),  # the query is not the path
        ("registry.example", "GET", "/v1/x/", True),  # trailing slash
        ("registry.example", "GET", "/v1/", True),
        ("registry.example", "GET", "/v1", False),  # the pattern ends in /
        ("registry.example", "GET", "/V1/x", False),  # an allow matches the case written
        ("registry.example", "GET", "/v%31/x", True),  # an escaped unreserved character
        ("registry.example", "GET", "/v1//x", False),  # an empty segment: ambiguous
        ("registry.example", "GET", "/v1/./x", False),
        ("registry.example", "GET", "/v1/../admin", False),
        ("registry.example", "GET", "/v1/%2e%2e/admin", False),
        ("registry.example", "GET", "/v1/%2E%2E/admin", False),
        ("registry.example", "GET", "/v1%2Fx", False),
        ("registry.example", "GET", "/pkg/react/tarball", True),
        ("registry.example", "GET", "/pkg/a/b/tarball", False),  # * stays in one segment
        ("registry.example", "GET", "/docs/a/b/c.html", True),
        ("registry.example", "GET", "/other", False),
        # an allowed host with deny rules about some requests
        ("api.example", "GET", "/public", True),
        ("api.example", "POST", "/public", True),
        ("api.example", "GET", "/admin", False),
        ("api.example", "GET", "/admin/users", False),
        ("api.example", "GET", "/admin/", False),
        ("api.example", "GET", "/ADMIN", False),  # a deny matches every case
        ("api.example", "GET", "/Admin/x", False),
        ("api.example", "GET", "/%61dmin", False),
        ("api.example", "GET", "/%41DMIN", False),
        ("api.example", "GET", "//admin", False),  # ambiguous: every path deny matches it
        ("api.example", "GET", "/x/../admin", False),
        ("api.example", "GET", "/x/%2e%2e/admin", False),
        ("api.example", "GET", "/admin;x=1", False),
        ("api.example", "GET", "/x%2Fadmin", False),
        ("api.example", "GET", "/administrator", True),  # prefixes are whole segments
        ("api.example", "GET", "/public?next=/admin", True),
        ("api.example", "DELETE", "/public", False),
        ("api.example", "delete", "/public", False),  # a deny matches every case
        ("api.example", "Delete", "/public", False),
    ],
)
def test_methods_and_paths(host: str, method: str, target: str, allowed: bool) -> None:
    assert METHODS_AND_PATHS.decide(host, 443).allowed  # the tunnel opens; requests decide
    decision = METHODS_AND_PATHS.decide_request(host, 443, "https", method, target)
    assert decision.allowed is allowed, decision.reason


def test_request_refusals_say_why() -> None:
    decide = METHODS_AND_PATHS.decide_request
    assert decide("registry.example", 443, "https", "POST", "/v1/x?k=secret").reason == (
        "no rule allows POST /v1/x on registry.example:443"
    )
    assert "dot segment" in decide("registry.example", 443, "https", "GET", "/v1/../x").reason
    denied = decide("api.example", 443, "https", "GET", "/admin")
    assert denied.reason == "GET /admin on api.example:443 is denied by the rule at config.toml:11"
    assert denied.origin == "/c/config.toml:11"
    assert not decide("other.example", 443, "https", "GET", "/").allowed


def test_requests_without_path_rules_ignore_the_path() -> None:
    """The defaults have no path rule: a path servers disagree about is the upstream's problem."""
    assert DEFAULTS.decide_request("api.anthropic.com", 443, "https", "GET", "/a//b/../c").allowed


ADDRESSES = policy_from(
    """
    defaults = false
    [[allow]]
    cidr = "10.0.0.0/8"
    ports = [8443]
    [[allow]]
    ip = "2001:db8::5"
    [[deny]]
    ip = "10.0.0.5"
    [[deny]]
    cidr = "10.9.0.0/16"
    """
)


@pytest.mark.parametrize(
    ("host", "port", "allowed"),
    [
        ("10.1.2.3", 8443, True),
        ("10.1.2.3", 443, False),
        ("[2001:db8::5]", 443, True),
        ("2001:db8:0:0:0:0:0:5", 443, True),
        ("10.0.0.5", 8443, False),  # denied
        ("10.9.1.1", 8443, False),
        ("::ffff:10.1.2.3", 8443, False),  # an allow names the address only as written
        ("::ffff:10.0.0.5", 8443, False),
        ("11.0.0.1", 8443, False),
        ("localhost", 8443, False),  # a name never matches an address rule
    ],
)
def test_ip_and_cidr(host: str, port: int, allowed: bool) -> None:
    assert ADDRESSES.decide(host, port).allowed is allowed


def test_a_deny_names_an_address_in_every_spelling() -> None:
    chosen = policy_from(
        """
        defaults = false
        [[allow]]
        cidr = "::/0"
        ports = [8443]
        [[deny]]
        cidr = "10.0.0.0/8"
        """
    )
    assert chosen.decide("2001:db8::1", 8443).allowed
    for spelling in ("::ffff:10.0.0.5", "::ffff:0:10.0.0.5", "64:ff9b::10.0.0.5", "::10.0.0.5"):
        assert not chosen.decide(spelling, 8443).allowed, spelling


@pytest.mark.parametrize(
    ("host", "port", "scheme", "allowed"),
    [
        ("plain.example", 80, "http", True),
        ("plain.example", 8080, "http", True),
        ("plain.example", 80, "https", False),
        ("both.example", 443, "https", True),
        ("both.example", 8443, "https", True),
        ("both.example", 80, "http", False),
    ],
)
def test_ports_and_schemes(host: str, port: int, scheme: str, allowed: bool) -> None:
    chosen = policy_from(
        """
        [[allow]]
        host = "plain.example"
        scheme = "http"
        ports = [80, 8080]
        [[allow]]
        host = "both.example"
        ports = [443, 8443]
        """
    )
    assert chosen.decide(host, port, scheme).allowed is allowed


PASS_THROUGH = """
defaults = false
[[allow]]
host = "*.pinned.example"
inspect = false
[[allow]]
host = "inspected.pinned.example"
"""


@pytest.mark.parametrize(
    ("host", "allowed", "inspect"),
    [
        ("a.pinned.example", True, False),
        ("inspected.pinned.example", True, True),  # an inspecting rule wins
        ("pinned.example", False, True),
    ],
)
def test_pass_through_or_inspect(host: str, allowed: bool, inspect: bool) -> None:
    decision = policy_from(PASS_THROUGH).decide(host, 443)
    assert (decision.allowed, decision.inspect) == (allowed, inspect)


def test_a_request_to_a_pass_through_destination_is_refused() -> None:
    """A tunnel opened while the host was inspected: its next request after the change."""
    decision = policy_from(PASS_THROUGH).decide_request(
        "a.pinned.example", 443, "https", "GET", "/"
    )
    assert not decision.allowed
    assert "is a pass-through destination now" in decision.reason


def test_a_pass_through_that_a_request_deny_names_is_refused() -> None:
    """What is never decrypted cannot be checked by method or path: fail closed."""
    passing = Rule(text="p", host="pinned.example", kind=WILDCARD, inspect=False)
    deny = Rule(
        text="d", host="a.pinned.example", action=DENY, ports=None, methods=frozenset({"POST"})
    )
    decision = Policy([passing, deny]).decide("a.pinned.example", 443)
    assert not decision.allowed
    assert "passes through uninspected" in decision.reason
    assert Policy([passing, deny]).decide("b.pinned.example", 443).inspect is False
