"""config.toml: what is valid, and every error with FILE:LINE and the fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from claude_proxy.policy import config_file, rules
from claude_proxy.policy.config_file import ConfigError

PATH = Path("/home/u/.config/claude-proxy/config.toml")


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        config_file.parse(PATH, text.encode())
    return [str(e) for e in excinfo.value.errors]


def warnings(text: str) -> list[str]:
    return [str(w) for w in config_file.parse(PATH, text.encode()).warnings]


def test_the_example_written_when_missing_is_the_default_policy(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "config.toml"
    assert config_file.ensure_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = config_file.load(path)
    assert loaded.exists and loaded.defaults and loaded.rules == () and loaded.warnings == ()
    built = config_file.build_policy(loaded)
    assert [r.text for r in built.rules] == list(rules.DEFAULT_RULES)
    path.write_text("defaults = false\n")
    assert not config_file.ensure_file(path)  # the user's file is never rewritten
    assert path.read_text() == "defaults = false\n"


def test_the_example_is_a_working_example() -> None:
    """Every commented rule in the example, uncommented, is valid."""
    example = re.compile(r"^# (\[|[a-z_]+ = )")
    lines = [line[2:] for line in config_file.TEMPLATE.splitlines() if example.match(line)]
    loaded = config_file.parse(PATH, "\n".join(lines).encode())
    assert len(loaded.rules) == 5
    assert loaded.listen == config_file.Listen(("127.0.0.1", "::1"), 9051, 9052)


def test_a_missing_file_is_the_default_policy(tmp_path: Path) -> None:
    loaded = config_file.load(tmp_path / "none.toml")
    assert not loaded.exists
    assert config_file.build_policy(loaded).decide("api.anthropic.com", 443).allowed


def test_rules_carry_their_line_and_comment() -> None:
    loaded = config_file.parse(
        PATH,
        b"""# a comment
defaults = false

[[allow]]
host = "github.com"
comment = "git"

[[deny]]
host = "gist.github.com"
""",
    )
    allow, deny = loaded.rules
    assert (allow.text, allow.origin, allow.comment) == ("config.toml:4", f"{PATH}:4", "git")
    assert (deny.text, deny.action, deny.ports, deny.schemes) == (
        "config.toml:8",
        "deny",
        None,  # a deny without ports names every port
        frozenset({"https", "http"}),
    )
    built = config_file.build_policy(loaded, ["localhost:8443"])
    assert built.source == f"{PATH} and the --allow flags of the running claude-proxy"
    assert [r.origin for r in built.rules] == [f"{PATH}:4", f"{PATH}:8", "--allow"]


def test_headers_inside_a_multiline_string_are_not_rules() -> None:
    loaded = config_file.parse(
        PATH,
        b'''[[allow]]
host = "a.example"
comment = """
[[allow]]
"""
[[allow]]
host = "b.example"
''',
    )
    assert [r.text for r in loaded.rules] == ["config.toml:1", "config.toml:6"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("defaults = true\nallow = 3\n", f"{PATH}:2: allow must be tables"),
        ("default = false\n", f"{PATH}:1: unknown key 'default'; did you mean 'defaults'?"),
        ("defaults = 'no'\n", f"{PATH}:1: defaults must be true or false"),
        ("log_level = 'loud'\n", f'{PATH}:1: log_level must be "info" or "debug"'),
        (
            "[[allow]]\nhost = 'github.com'\nport = 443\n",
            f"{PATH}:3: [[allow]] has an unknown key 'port'; did you mean 'ports'?",
        ),
        (
            "[[allow]]\nhost = 'github.com'\nports = 443\n",
            f"{PATH}:3: ports must be a list of port numbers 1-65535, e.g. ports = [443]",
        ),
        ("[[allow]]\nhost = 'a.example'\nports = [0]\n", f"{PATH}:3: ports must be a list"),
        ("[[allow]]\nhost = 'a.example'\nports = [true]\n", f"{PATH}:3: ports must be a list"),
        ("[[allow]]\nhost = 'a.example'\nports = []\n", f"{PATH}:3: ports must be a list"),
        ("[[allow]]\nports = [443]\n", f"{PATH}:1: [[allow]] needs exactly one of host, ip"),
        (
            "[[allow]]\nhost = 'a.example'\nip = '10.0.0.1'\n",
            f"{PATH}:1: [[allow]] needs exactly one of host, ip or cidr (it has host and ip)",
        ),
        ("[[allow]]\nhost = 42\n", f"{PATH}:2: host must be a non-empty string"),
        ("[[allow]]\nhost = '*.com'\n", f"{PATH}:2: host '*.com' is too broad"),
        ("[[allow]]\nhost = '*example.com'\n", "'*' is allowed only as a whole first label"),
        ("[[allow]]\nhost = 'exa mple.com'\n", "must be a host name or *.domain"),
        ("[[allow]]\nhost = 'github.com:443'\n", "has a port: write ports = [PORT]"),
        ("[[allow]]\nhost = 'https://github.com'\n", "is a URL: write the host alone"),
        ("[[allow]]\nhost = '10.0.0.1'\n", "is an address: write ip = '10.0.0.1'"),
        ("[[allow]]\nhost = '2130706433'\n", "numeric address"),
        ("[[allow]]\nip = 'github.com'\n", "ip 'github.com' is not an IP address"),
        ("[[allow]]\nip = '0.0.0.0'\n", "means every address of this machine"),
        ("[[allow]]\ncidr = '10.0.0.1/8'\n", "has host bits set"),
        ("[[allow]]\ncidr = '10.0.0.1'\n", "needs a prefix length"),
        ("[[allow]]\nhost = 'a.example'\nscheme = 'ftp'\n", f'{PATH}:3: scheme must be "https"'),
        ("[[allow]]\nhost = 'a.example'\nmethods = 'GET'\n", f"{PATH}:3: methods must be a list"),
        ("[[allow]]\nhost = 'a.example'\nmethods = ['G ET']\n", "methods must be a list"),
        ("[[allow]]\nhost = 'a.example'\nmethods = ['CONNECT']\n", "CONNECT is decided by"),
        ("[[allow]]\nhost = 'a.example'\npaths = ['v1']\n", f"{PATH}:3: path 'v1' must start"),
        ("[[allow]]\nhost = 'a.example'\npaths = ['/a/../b']\n", "dot segment"),
        ("[[allow]]\nhost = 'a.example'\npaths = ['/a?b=1']\n", "has a query"),
        ("[[allow]]\nhost = 'a.example'\ninspect = 'no'\n", f"{PATH}:3: inspect must be true"),
        ("[[allow]]\nhost = 'a.example'\ncomment = 1\n", f"{PATH}:3: comment must be a string"),
        ("[[deny]]\nhost = 'a.example'\ninspect = false\n", "inspect applies to [[allow]] only"),
        (
            "[[allow]]\nhost = 'a.example'\ncheck_server_fetch = 'no'\n",
            f"{PATH}:3: check_server_fetch must be true or false",
        ),
        (
            "[[deny]]\nhost = 'a.example'\ncheck_server_fetch = false\n",
            "check_server_fetch applies to [[allow]] only",
        ),
        (
            "[[allow]]\nhost = 'a.example'\ninspect = false\nmethods = ['GET']\n",
            f"{PATH}:3: a pass-through (inspect = false) is never decrypted",
        ),
        ("[[allow]]\nip = '10.0.0.1'\ninspect = false\n", "a pass-through needs a host name"),
        ("[[allow]]\nhost = 'a.example'\nscheme = 'http'\ninspect = false\n", "carries TLS"),
        ("[listen]\nport = 'x'\n", f"{PATH}:2: port must be a port number"),
        ("[listen]\nhosts = ['everywhere']\n", f"{PATH}:2: hosts must be a list of IP"),
        ("[listen]\nprot = 1\n", f"{PATH}:2: [listen] has an unknown key 'prot'; did you mean"),
        ("[[allow]]\nhost = 'a.example'\n[[allow]]\nhosts = 'b'\n", f"{PATH}:4: [[allow]] has"),
        # TOML syntax: tomllib's own line and column
        ("[[allow]]\nhost = \n", f"{PATH}:2:8: Invalid value (TOML syntax)"),
        ("[[allow]]\nhost = 'a'\nhost = 'b'\n", f"{PATH}:3:"),
        ("a = '\xff'".encode("latin-1").decode("latin-1"), f"{PATH}:1"),
    ],
)
def test_errors_name_the_line_and_the_fix(text: str, expected: str) -> None:
    found = errors(text)
    assert any(e.startswith(expected) or expected in e for e in found), found


def test_bytes_that_are_not_utf8() -> None:
    with pytest.raises(ConfigError, match=r"config.toml:2: is not UTF-8"):
        config_file.parse(PATH, b"defaults = true\n# \xff\n")


def test_every_error_is_reported_at_once() -> None:
    found = errors("default = 1\n[[allow]]\nhost = '*.com'\n[[allow]]\nports = [70000]\n")
    assert [e.split(": ", 1)[0] for e in found] == [f"{PATH}:1", f"{PATH}:3", f"{PATH}:4"]


def test_inline_tables_are_found_by_their_key() -> None:
    found = errors("defaults = false\nallow = [{host = '*.com'}]\n")
    assert found == [
        f"{PATH}:2: host '*.com' is too broad: a wildcard needs a domain with a dot (*.example.com)"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (  # an exact deny covers the exact allow
            "[[allow]]\nhost = 'a.example'\n[[deny]]\nhost = 'a.example'\n",
            f"{PATH}:1: this [[allow]] never applies: the [[deny]] at line 3 covers all of it",
        ),
        (  # a wildcard deny covers a wildcard below it, on every port
            "[[allow]]\nhost = '*.b.x.example'\nports = [443, 8443]\n"
            "[[deny]]\nhost = '*.x.example'\n",
            f"{PATH}:1: this [[allow]] never applies",
        ),
        (  # the order does not matter
            "[[deny]]\nhost = 'a.example'\n[[allow]]\nhost = 'a.example'\nmethods = ['GET']\n",
            f"{PATH}:3: this [[allow]] never applies: the [[deny]] at line 1",
        ),
        (  # a deny on a path prefix covers an allow below it
            "[[allow]]\nhost = 'a.example'\npaths = ['/admin/users']\n"
            "[[deny]]\nhost = 'a.example'\npaths = ['/Admin']\n",
            f"{PATH}:1: this [[allow]] never applies",
        ),
        (
            "[[allow]]\ncidr = '10.1.0.0/16'\n[[deny]]\ncidr = '10.0.0.0/8'\n",
            f"{PATH}:1: this [[allow]] never applies",
        ),
        (  # the defaults inspect api.anthropic.com: a pass-through there would never apply
            "[[allow]]\nhost = 'api.anthropic.com'\ninspect = false\n",
            f"{PATH}:1: this pass-through never applies: the built-in rule *.anthropic.com "
            "inspects the same destinations, and inspection wins; remove one (or set defaults",
        ),
        (
            "[[allow]]\nhost = '*.p.example'\ninspect = false\n"
            "[[deny]]\nhost = 'a.p.example'\nmethods = ['POST']\n",
            f"{PATH}:1: the [[deny]] at line 4 checks requests this pass-through never decrypts",
        ),
    ],
)
def test_rules_that_can_never_apply_are_errors(text: str, expected: str) -> None:
    assert any(e.startswith(expected) for e in errors(text)), errors(text)


@pytest.mark.parametrize(
    "text",
    [
        # a deny that covers only part of an allow is the normal use of a deny
        "[[allow]]\nhost = '*.x.example'\n[[deny]]\nhost = 'a.x.example'\n",
        "[[allow]]\nhost = 'a.example'\nports = [443, 8443]\n[[deny]]\nhost = 'a.example'\n"
        "ports = [8443]\n",
        "[[allow]]\nhost = 'a.example'\n[[deny]]\nhost = 'a.example'\nmethods = ['DELETE']\n",
        "[[allow]]\nhost = 'a.example'\npaths = ['/v1']\n[[deny]]\nhost = 'a.example'\n"
        "paths = ['/v1/admin']\n",
        "[[allow]]\nhost = 'a.example'\npaths = ['/v1*']\n[[deny]]\nhost = 'a.example'\n"
        "paths = ['/v1']\n",
        # an inspecting rule for part of a pass-through wildcard
        "[[allow]]\nhost = '*.p.example'\ninspect = false\n[[allow]]\nhost = 'a.p.example'\n",
    ],
)
def test_partial_overlaps_are_fine(text: str) -> None:
    assert config_file.parse(PATH, text.encode()).warnings == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[[allow]]\nhost = 'a.example'\n[[allow]]\nhost = 'a.example'\n",
            f"{PATH}:3: warning: this [[allow]] repeats line 1, which allows all of it",
        ),
        (
            "[[allow]]\nhost = '*.x.example'\n[[allow]]\nhost = 'a.x.example'\nmethods = ['GET']\n",
            f"{PATH}:3: warning: this [[allow]] repeats line 1",
        ),
        (
            "[[allow]]\nhost = 'api.anthropic.com'\n",
            f"{PATH}:1: warning: this [[allow]] repeats the built-in rule *.anthropic.com",
        ),
        (
            "[[deny]]\nhost = '*.x.example'\n[[deny]]\nhost = 'a.x.example'\nports = [80]\n",
            f"{PATH}:3: warning: this [[deny]] repeats the one at line 1",
        ),
    ],
)
def test_duplicates_are_warnings(text: str, expected: str) -> None:
    assert any(w.startswith(expected) for w in warnings(text)), warnings(text)


def test_allow_paths_differing_in_case_are_not_duplicates() -> None:
    text = "[[allow]]\nhost = 'a.example'\npaths = ['/V1']\n[[allow]]\nhost = 'a.example'\n"
    text += "paths = ['/v1']\n"
    assert warnings(text) == []


def test_listen_and_log_level() -> None:
    loaded = config_file.parse(
        PATH, b"log_level = 'debug'\n[listen]\nhosts = ['127.0.0.1']\nport = 0\nsocks_port = 9\n"
    )
    assert loaded.listen == config_file.Listen(("127.0.0.1",), 0, 9)
    assert loaded.log_level == "debug"
