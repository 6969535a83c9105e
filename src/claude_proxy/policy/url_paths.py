"""Request paths as path rules see them: one spelling per path, or none when servers disagree.

Pure Python, no mitmproxy. A rule `paths = ["/v1/"]` must not be dodged by `/v1/%2e%2e/admin`,
`/V1/`, `/v1//x` or `/admin;x`: a path is normalized (query dropped, escapes of unreserved
characters decoded, hex digits uppercased) and a path that servers read in different ways (dot
segments, empty segments, an encoded slash, backslash or control character, a `;` parameter) is
*ambiguous*: no allow-path matches it and every deny-path does, so it is refused wherever a path
rule applies.
"""

from __future__ import annotations

import re
import string
from typing import NamedTuple
from urllib.parse import unquote_to_bytes

# RFC 3986 §2.3: decoding these never changes what a URI means.
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEX = frozenset(string.hexdigits)
# Escapes that some servers decode before routing and others after: never matched.
# A path made of these alone (no escape, no `\`, `;` or `#`) needs no work but the segment checks.
_PLAIN = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,=:@/]*")
_AMBIGUOUS_ESCAPES = {0x2F: "an encoded slash (%2F)", 0x5C: "an encoded backslash (%5C)"}


class AmbiguousPath(ValueError):
    """The path has no single reading; the message says why."""


def normalize(target: str) -> str:
    """The path of a request target, normalized; AmbiguousPath when servers could disagree."""
    path = target.split("?", 1)[0]
    if _PLAIN.fullmatch(path) and "//" not in path and "/." not in path:
        return path  # nothing to decode, no dot or empty segment: already normal
    if not path.startswith("/"):
        raise AmbiguousPath("it is not an origin-form path (/…)")
    out: list[str] = []
    i = 0
    while i < len(path):
        c = path[i]
        if c == "%":
            digits = path[i + 1 : i + 3]
            if len(digits) != 2 or not set(digits) <= _HEX:
                raise AmbiguousPath("a malformed percent-escape")
            byte = int(digits, 16)
            if chr(byte) in _UNRESERVED:
                out.append(chr(byte))
            elif why := _AMBIGUOUS_ESCAPES.get(byte):
                raise AmbiguousPath(why)
            elif byte < 0x20 or byte == 0x7F:
                raise AmbiguousPath("an encoded control character")
            else:
                out.append("%" + digits.upper())
            i += 3
            continue
        if not "!" <= c <= "~":
            raise AmbiguousPath("a character outside visible ASCII")
        if c in "\\;#":
            raise AmbiguousPath(
                {"\\": "a backslash", ";": "a ';' (a parameter some servers strip)"}.get(
                    c, "a '#' (a fragment)"
                )
            )
        out.append(c)
        i += 1
    normalized = "".join(out)
    segments = normalized.split("/")[1:]
    for n, segment in enumerate(segments):
        if segment in (".", ".."):
            raise AmbiguousPath("a dot segment (. or ..)")
        if segment == "" and n < len(segments) - 1:
            raise AmbiguousPath("an empty segment (//)")
    try:
        unquote_to_bytes(normalized).decode("utf-8")
    except UnicodeDecodeError:
        raise AmbiguousPath("escapes that are not UTF-8") from None
    return normalized


class PathPattern(NamedTuple):
    """A path prefix (`/v1/`, segment by segment) or a glob (`*` in a segment, `**` across).

    A NamedTuple, not a dataclass: `check` and `env` start without importing dataclasses. The
    expressions follow from `text` and `glob`, so comparing them too changes no comparison."""

    text: str
    glob: bool
    exact: re.Pattern[str]
    folded: re.Pattern[str]

    def __repr__(self) -> str:
        return f"PathPattern({self.text!r}, glob={self.glob})"

    def matches(self, path: str, *, ignore_case: bool = False) -> bool:
        """Whether the normalized `path` matches; `ignore_case` for deny rules (fail closed)."""
        return (self.folded if ignore_case else self.exact).fullmatch(path) is not None

    def covers(self, other: PathPattern, *, ignore_case: bool) -> bool:
        """Whether every path `other` matches, this one matches too (`ignore_case`: as a deny)."""
        mine, theirs = self.text, other.text
        if ignore_case:
            mine, theirs = mine.lower(), theirs.lower()
        if self.glob:
            return mine == theirs
        if other.glob:  # all it matches starts with what comes before its first *
            return theirs.split("*", 1)[0].startswith(_under(mine))
        return theirs == mine or theirs.startswith(_under(mine))


def _under(prefix: str) -> str:
    return prefix if prefix.endswith("/") else prefix + "/"


def parse_pattern(text: str) -> PathPattern:
    """A path rule; ValueError (with the fix) when it is not one."""
    if not isinstance(text, str) or not text.startswith("/"):
        raise ValueError(f"path {text!r} must start with '/'")
    if "?" in text:
        raise ValueError(f"path {text!r} has a query: paths are matched without it")
    if "***" in text:
        raise ValueError(f"path {text!r}: use * within a segment or ** across segments")
    try:
        normalized = normalize(text)
    except AmbiguousPath as e:
        raise ValueError(f"path {text!r} has {e}: no request path could match it") from None
    glob = "*" in normalized
    if glob:
        pieces = re.split(r"(\*\*|\*)", normalized)
        body = "".join(".*" if p == "**" else "[^/]*" if p == "*" else re.escape(p) for p in pieces)
    else:
        body = re.escape(normalized) + ("" if normalized.endswith("/") else "(?:/.*)?")
        if normalized.endswith("/"):
            body += ".*"
    return PathPattern(
        normalized, glob, re.compile(body, re.DOTALL), re.compile(body, re.DOTALL | re.I)
    )
