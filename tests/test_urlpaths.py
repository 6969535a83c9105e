"""Request paths as path rules see them: the tricky spellings, in a table."""

from __future__ import annotations

import re

import pytest

from claude_proxy.policy.url_paths import AmbiguousPath, normalize, parse_pattern


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/", "/"),
        ("/v1/messages", "/v1/messages"),
        ("/v1/messages?beta=true", "/v1/messages"),  # the query is not part of the path
        ("/v1/messages?x=/../admin", "/v1/messages"),
        ("/v1/messages/", "/v1/messages/"),  # a trailing slash is kept
        ("/V1/Messages", "/V1/Messages"),  # case is kept (deny rules ignore it)
        ("/v%31/messages", "/v1/messages"),  # an unreserved character, escaped
        ("/%7Euser/%61", "/~user/a"),
        ("/a%2db%5Fc%2E", "/a-b_c."),
        ("/a%20b", "/a%20b"),  # a reserved or other escape stays escaped
        ("/a%3fb", "/a%3Fb"),  # with upper-case hex
        ("/a%c3%a9", "/a%C3%A9"),  # UTF-8 é
        ("/a.b/c..d/.e", "/a.b/c..d/.e"),  # dots inside a segment are fine
        ("/*", "/*"),
    ],
)
def test_normalize(target: str, path: str) -> None:
    assert normalize(target) == path


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("//admin", "empty segment"),
        ("/v1//admin", "empty segment"),
        ("/./admin", "dot segment"),
        ("/v1/../admin", "dot segment"),
        ("/v1/..", "dot segment"),
        ("/v1/%2e%2e/admin", "dot segment"),  # %2e is "."
        ("/v1/%2E%2E/admin", "dot segment"),
        ("/v1/.%2e/admin", "dot segment"),
        ("/v1/%2e/admin", "dot segment"),
        ("/v1%2Fadmin", "encoded slash"),
        ("/v1%2fadmin", "encoded slash"),
        ("/v1%5Cadmin", "encoded backslash"),
        ("/v1\\admin", "backslash"),
        ("/v1%00", "control character"),
        ("/v1%0a", "control character"),
        ("/admin;jsessionid=1", "parameter"),
        ("/admin#x", "fragment"),
        ("/a%zz", "malformed percent-escape"),
        ("/a%4", "malformed percent-escape"),
        ("/a%c0%ae", "not UTF-8"),  # an overlong "."
        ("/a b", "outside visible ASCII"),
        ("/é", "outside visible ASCII"),
        ("*", "not an origin-form path"),
        ("http://x/a", "not an origin-form path"),
        ("", "not an origin-form path"),
    ],
)
def test_ambiguous_paths(target: str, why: str) -> None:
    with pytest.raises(AmbiguousPath, match=why):
        normalize(target)


@pytest.mark.parametrize(
    ("pattern", "path", "exact", "any_case"),
    [
        ("/v1", "/v1", True, True),
        ("/v1", "/v1/", True, True),
        ("/v1", "/v1/messages", True, True),
        ("/v1", "/v1x", False, False),  # a prefix is matched segment by segment
        ("/v1", "/v", False, False),
        ("/v1/", "/v1", False, False),  # a pattern ending in / needs the slash
        ("/v1/", "/v1/messages", True, True),
        ("/v1/messages", "/v1/messages/", True, True),  # trailing slash
        ("/v1", "/V1/messages", False, True),  # case: only a deny ignores it
        ("/", "/anything/at/all", True, True),
        ("/repos/*/issues", "/repos/a/issues", True, True),
        ("/repos/*/issues", "/repos/a/b/issues", False, False),  # * stays in one segment
        ("/repos/**", "/repos/a/b/c", True, True),
        ("/repos/**", "/repos/", True, True),
        ("/repos/**", "/repos", False, False),
        ("/repos/**/pulls", "/repos/a/b/pulls", True, True),
        ("/*.tgz", "/react.tgz", True, True),
        ("/*.tgz", "/a/react.tgz", False, False),
        ("/a%2db", "/a-b", True, True),  # the pattern is normalized too
    ],
)
def test_patterns(pattern: str, path: str, exact: bool, any_case: bool) -> None:
    parsed = parse_pattern(pattern)
    assert parsed.matches(path) is exact
    assert parsed.matches(path, ignore_case=True) is any_case


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("v1/", "must start with '/'"),
        ("/v1?x=1", "has a query"),
        ("/v1/../admin", "dot segment"),
        ("//v1", "empty segment"),
        ("/v1%2F", "encoded slash"),
        ("/a/***", "use * within a segment"),
    ],
)
def test_bad_patterns(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_pattern(pattern)


@pytest.mark.parametrize(
    ("outer", "inner", "ignore_case", "covers"),
    [
        ("/", "/v1", False, True),
        ("/v1", "/v1/messages", False, True),
        ("/v1", "/v1", False, True),
        ("/v1/", "/v1", False, False),
        ("/v1", "/v1x", False, False),
        ("/v1", "/v1/**", False, True),
        ("/v1", "/v1*", False, False),  # /v1* also matches /v1x
        ("/v1/**", "/v1/a", False, False),  # a glob covers only itself
        ("/v1/**", "/v1/**", False, True),
        ("/V1", "/v1/a", True, True),
        ("/V1", "/v1/a", False, False),
    ],
)
def test_pattern_covers(outer: str, inner: str, ignore_case: bool, covers: bool) -> None:
    assert parse_pattern(outer).covers(parse_pattern(inner), ignore_case=ignore_case) is covers
