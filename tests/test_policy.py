"""The allowlist as a decision table, and the rules it refuses to parse."""

from __future__ import annotations

import pytest

from claude_proxy.policy import DEFAULT_RULES, Policy, normalize_host, parse_rule

DEFAULTS = Policy.from_texts(DEFAULT_RULES)
WITH_EXTRAS = Policy.from_texts(
    [
        *DEFAULT_RULES,
        "localhost:8443",
        "10.1.2.3:8080",
        "[::1]:9000",
        "bücher.example",
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
