"""The user's config.toml: reading and validating it, and turning it into a policy.

Pure Python, no mitmproxy. tomllib gives no line numbers for values, so each `[[allow]]` or
`[[deny]]` table is found by scanning the text for its header (the n-th `[[allow]]` header is the
n-th allow table; see `Lines`), and a key by scanning that table's lines. Every problem is
reported, each with FILE:LINE and what to write instead; warnings (duplicates) do not block.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from claude_proxy.policy import overlaps
from claude_proxy.policy import rules as policy_rules
from claude_proxy.policy.rules import ALLOW, DENY, HTTP, HTTPS, NAME, WILDCARD, Policy, Rule
from claude_proxy.policy.url_paths import parse_pattern
from claude_proxy.state import files

TOP_KEYS = ("defaults", "log_level", "listen", "allow", "deny")
RULE_KEYS = (
    "host", "ip", "cidr", "ports", "scheme", "methods", "paths", "inspect", "check_server_fetch",
    "comment",
)  # fmt: skip
LISTEN_KEYS = ("hosts", "port", "socks_port")
LOG_LEVELS = ("info", "debug")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOML_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)$")
_HEADER = re.compile(r"^\s*\[\[\s*(allow|deny)\s*\]\]")
_TABLE = re.compile(r"^\s*\[")

TEMPLATE = """\
# claude-proxy's policy: what Claude Code (and what runs under its sandbox) may reach.
# `claude-proxy config check` validates this file; a running claude-proxy applies it within a
# second of saving (or at once on `kill -HUP`). An invalid file changes nothing.
#
# The built-in rules allow HTTPS on port 443 to anthropic.com, claude.ai, claude.com and every
# subdomain of each. Set `defaults = false` to start from nothing instead.
defaults = true
# log_level = "info"                 # or "debug" (as -v)

# One table per rule. A destination is `host` (exact, or *.domain for every subdomain but not
# the domain itself), `ip` or `cidr`; `ports` defaults to [443]. HTTPS only, unless
# `scheme = "http"` (then port 80 by default). A [[deny]] wins over every [[allow]]; without
# `ports` it names every port.
#
# [[allow]]
# host = "github.com"
# comment = "git over HTTPS"
#
# [[allow]]                          # only these requests: methods and path prefixes or globs
# host = "registry.npmjs.org"        # (* within a segment, ** across), query not included
# methods = ["GET", "HEAD"]
# paths = ["/@anthropic-ai/", "/react/**"]
#
# [[allow]]                          # a Messages request to it may send Anthropic's servers to
# host = "api.anthropic.com"         # any MCP server or web_fetch domain, allowed here or not
# check_server_fetch = false
#
# [[allow]]                          # tunnelled as it is, never decrypted (pinned certificates,
# host = "pinned.example.com"        # client certificates): nothing inside it is checked
# inspect = false
#
# [[deny]]
# host = "gist.github.com"
#
# [listen]                           # read at start; --host, --port, --socks-port override it
# hosts = ["127.0.0.1", "::1"]
# port = 9051
# socks_port = 9052
"""


class Diagnostic(NamedTuple):
    path: Path
    line: int | None
    message: str
    warning: bool = False
    column: int | None = None

    def __str__(self) -> str:
        where = str(self.path)
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {'warning: ' if self.warning else ''}{self.message}"


class ConfigError(ValueError):
    """The file is not a valid policy; every problem is in `errors`, first one in the message."""

    def __init__(self, errors: Sequence[Diagnostic], warnings: Sequence[Diagnostic] = ()) -> None:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"{errors[0]}{more}")
        self.errors = tuple(errors)
        self.warnings = tuple(warnings)


class Listen(NamedTuple):
    hosts: tuple[str, ...] | None = None
    port: int | None = None
    socks_port: int | None = None


class Config(NamedTuple):
    path: Path
    exists: bool = False
    defaults: bool = True
    rules: tuple[Rule, ...] = ()
    listen: Listen = Listen()
    log_level: str | None = None
    warnings: tuple[Diagnostic, ...] = ()
    digest: str = ""  # SHA-256 of the bytes read; "" when there is no file


def load(path: Path) -> Config:
    """The config in `path`; a missing file is the built-in policy. ConfigError if invalid."""
    try:
        data = files.read_regular(path)
    except FileNotFoundError:
        return Config(path)
    except OSError as e:
        raise ConfigError([Diagnostic(path, None, f"cannot read it: {e.strerror}")]) from None
    return parse(path, data)


def parse(path: Path, data: bytes) -> Config:
    # Imported here: `check` with no config.toml (and every command that reads none) skips them.
    import hashlib
    import tomllib

    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError([Diagnostic(path, line, "is not UTF-8 text")]) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        at: int | None = None
        column: int | None = None
        if found := _TOML_POSITION.search(message):
            at, column = int(found[1]), int(found[2])
            message = message[: found.start()].rstrip()
        syntax = Diagnostic(path, at, f"{message} (TOML syntax)", column=column)
        raise ConfigError([syntax]) from None
    return _Validator(path, text).config(document, digest)


def build_policy(config: Config, flags: Sequence[str] = ()) -> Policy:
    """The policy the proxy enforces: the defaults (unless off), the file's rules, the flags.

    ValueError for a flag that is not a rule.
    """
    rules = policy_rules.default_rules() if config.defaults else ()
    parts = [str(config.path)] if config.exists else []
    if config.defaults:
        parts.append(policy_rules.DEFAULTS_SOURCE)
    if flags:
        parts.append("the --allow flags of the running claude-proxy")
    source = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else "".join(parts)
    return Policy(
        (*rules, *config.rules, *policy_rules.parse_rules(flags)), source=source or "no rule at all"
    )


def ensure_file(path: Path) -> bool:
    """Write the commented example where no file is; True if it did. Never touches one that is.

    The example is a convenience: where it cannot be written (a read-only config folder), no
    file means the defaults, and the proxy starts all the same.
    """
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    except OSError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(TEMPLATE)
    return True


class Lines:
    """Where things are in the text: `[[allow]]`/`[[deny]]` headers in order, and keys.

    Lines inside multi-line strings are skipped. Tables written inline (`allow = [{…}]`) have no
    header: their line is the one with `allow =`.
    """

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers: dict[str, list[int]] = {ALLOW: [], DENY: []}
        self.tables: list[int] = []  # every table header, for where a table ends
        in_string: str | None = None
        for number, line in enumerate(self.lines, 1):
            if in_string is None:
                if found := _HEADER.match(line):
                    self.headers[found[1]].append(number)
                if _TABLE.match(line):
                    self.tables.append(number)
                for delimiter in ('"""', "'''"):
                    if line.count(delimiter) % 2:
                        in_string = delimiter
                        break
            elif line.count(in_string) % 2:
                in_string = None

    def table(self, name: str, index: int, count: int) -> int | None:
        """The line of the `index`-th of `count` [[name]] tables."""
        headers = self.headers.get(name, [])
        if len(headers) == count:
            return headers[index]
        return self.key(None, name)

    def key(self, start: int | None, key: str) -> int | None:
        """The line where `key` is set in the table that starts at `start` (None: top level)."""
        first = 1 if start is None else start + 1
        after = [t for t in self.tables if t >= first]
        end = after[0] if after else len(self.lines) + 1
        pattern = re.compile(
            rf"""^\s*(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')\s*="""
        )
        for number in range(first, end):
            if pattern.match(self.lines[number - 1]):
                return number
        return start


def _suggest(key: str, known: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"


class _Validator:
    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = Lines(text)
        self.errors: list[Diagnostic] = []
        self.warnings: list[Diagnostic] = []

    def error(self, line: int | None, message: str) -> None:
        self.errors.append(Diagnostic(self.path, line, message))

    def warn(self, line: int | None, message: str) -> None:
        self.warnings.append(Diagnostic(self.path, line, message, warning=True))

    def config(self, document: dict[str, Any], digest: str) -> Config:
        for key in document:
            if key not in TOP_KEYS:
                self.error(
                    self.lines.key(None, key), f"unknown key {key!r}{_suggest(key, TOP_KEYS)}"
                )
        defaults = document.get("defaults", True)
        if not isinstance(defaults, bool):
            self.error(self.lines.key(None, "defaults"), "defaults must be true or false")
            defaults = True
        log_level = document.get("log_level")
        if log_level is not None and log_level not in LOG_LEVELS:
            self.error(self.lines.key(None, "log_level"), 'log_level must be "info" or "debug"')
        listen = self.listen(document.get("listen", {}))
        rules: list[Rule] = []
        for action in (ALLOW, DENY):
            tables = document.get(action, [])
            if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
                self.error(
                    self.lines.key(None, action),
                    f"{action} must be tables: write each rule as a [[{action}]] table",
                )
                continue
            for index, table in enumerate(tables):
                line = self.lines.table(action, index, len(tables))
                if rule := self.rule(action, table, line):
                    rules.append(rule)
        if not self.errors:
            self.relations(rules, defaults)
        if self.errors:
            raise ConfigError(self.errors, self.warnings)
        return Config(
            self.path,
            exists=True,
            defaults=defaults,
            rules=tuple(rules),
            listen=listen,
            log_level=log_level,
            warnings=tuple(self.warnings),
            digest=digest,
        )

    def listen(self, table: object) -> Listen:
        start = self._table_line("listen")
        if not isinstance(table, dict):
            self.error(self.lines.key(None, "listen"), "listen must be a table: [listen]")
            return Listen()
        for key in table:
            if key not in LISTEN_KEYS:
                self.error(
                    self.lines.key(start, key),
                    f"[listen] has an unknown key {key!r}" + _suggest(key, LISTEN_KEYS),
                )
        hosts = table.get("hosts")
        if hosts is not None and (
            not isinstance(hosts, list)
            or not hosts
            or not all(
                isinstance(h, str) and (h == "localhost" or policy_rules.parse_ip(h)) for h in hosts
            )
        ):
            self.error(
                self.lines.key(start, "hosts"),
                'hosts must be a list of IP addresses, e.g. hosts = ["127.0.0.1", "::1"]',
            )
            hosts = None
        ports = {}
        for key in ("port", "socks_port"):
            value = table.get(key)
            if value is not None and (type(value) is not int or not 0 <= value <= 65535):
                self.error(self.lines.key(start, key), f"{key} must be a port number, 0-65535")
                value = None
            ports[key] = value
        if ports["port"] and ports["port"] == ports["socks_port"]:
            self.error(
                self.lines.key(start, "socks_port"),
                f"socks_port must differ from port (both are {ports['port']})",
            )
        return Listen(tuple(hosts) if hosts else None, ports["port"], ports["socks_port"])

    def _table_line(self, name: str) -> int | None:
        pattern = re.compile(rf"^\s*\[\s*{name}\s*\]")
        for number, line in enumerate(self.lines.lines, 1):
            if pattern.match(line):
                return number
        return self.lines.key(None, name)

    def rule(self, action: str, table: dict[str, Any], line: int | None) -> Rule | None:
        count = len(self.errors)
        where = f"[[{action}]]"

        def at(key: str) -> int | None:
            return self.lines.key(line, key) if line is not None else None

        for key in table:
            if key not in RULE_KEYS:
                self.error(at(key), f"{where} has an unknown key {key!r}{_suggest(key, RULE_KEYS)}")
        for only_allow in ("inspect", "check_server_fetch"):
            if action == DENY and only_allow in table:
                self.error(at(only_allow), f"{only_allow} applies to [[allow]] only: remove it")
        named = [k for k in ("host", "ip", "cidr") if k in table]
        if len(named) != 1:
            found = f" (it has {' and '.join(named)})" if named else ""
            self.error(line, f"{where} needs exactly one of host, ip or cidr{found}")
            return None
        key = named[0]
        kind, host, network = self.destination(key, table[key], at(key))
        scheme = table.get("scheme")
        if scheme is not None and scheme not in (HTTPS, HTTP):
            self.error(at("scheme"), 'scheme must be "https" (the default) or "http" (cleartext)')
        schemes = frozenset({scheme}) if scheme in (HTTPS, HTTP) else None
        if schemes is None:
            schemes = frozenset({HTTPS}) if action == ALLOW else policy_rules.SCHEMES
        ports = self.ports(table.get("ports"), at("ports"))
        if ports is None and action == ALLOW:
            ports = frozenset(
                {policy_rules.CLEARTEXT_PORT if scheme == HTTP else policy_rules.DEFAULT_PORT}
            )
        methods = self.methods(table.get("methods"), at("methods"))
        paths = self.paths(table.get("paths"), at("paths"))
        inspect = table.get("inspect", True)
        if not isinstance(inspect, bool):
            self.error(at("inspect"), "inspect must be true or false")
            inspect = True
        check_server_fetch = table.get("check_server_fetch", True)
        if not isinstance(check_server_fetch, bool):
            self.error(at("check_server_fetch"), "check_server_fetch must be true or false")
            check_server_fetch = True
        comment = table.get("comment", "")
        if not isinstance(comment, str):
            self.error(at("comment"), "comment must be a string")
            comment = ""
        if not inspect:
            if methods is not None or paths is not None:
                self.error(
                    at("inspect"),
                    "a pass-through (inspect = false) is never decrypted, so methods and paths "
                    "cannot be checked: remove them, or inspect",
                )
            if kind not in (NAME, WILDCARD):
                self.error(
                    at(key),
                    "a pass-through needs a host name: the TLS server name (SNI) is checked "
                    "against it, and clients send none for an IP address",
                )
            if scheme == HTTP:
                self.error(at("scheme"), "a pass-through carries TLS: remove scheme")
        if len(self.errors) > count or kind is None:
            return None
        return Rule(
            text=f"{self.path.name}:{line}" if line else f"{self.path.name}[{where}]",
            host=host,
            kind=kind,
            ports=ports,
            schemes=schemes,
            action=action,
            methods=methods,
            paths=paths,
            inspect=inspect,
            check_server_fetch=check_server_fetch,
            origin=f"{self.path}:{line}" if line else str(self.path),
            comment=comment,
            network=network,
        )

    def destination(
        self, key: str, value: object, line: int | None
    ) -> tuple[str | None, str, policy_rules.IPNetwork | None]:
        if not isinstance(value, str) or not value.strip():
            self.error(line, f"{key} must be a non-empty string")
            return None, "", None
        try:
            if key == "host":
                if "://" in value:
                    raise ValueError(
                        f"host {value!r} is a URL: write the host alone "
                        '(and scheme = "http" for cleartext)'
                    )
                if policy_rules.parse_ip(value) or "/" in value:
                    raise ValueError(
                        f"host {value!r} is an address: write ip = {value!r} "
                        "(or cidr = … for a network)"
                    )
                if ":" in value:
                    raise ValueError(f"host {value!r} has a port: write ports = [PORT]")
                if any(c in value for c in "/@?#% \t"):
                    raise ValueError(f"host {value!r} must be a host name or *.domain")
                kind, host, network = policy_rules.parse_destination(value, what=f"host {value!r}")
            elif key == "ip":
                if policy_rules.parse_ip(value) is None:
                    raise ValueError(f"ip {value!r} is not an IP address (a name goes in host)")
                kind, host, network = policy_rules.parse_destination(value, what=f"ip {value!r}")
            else:
                if "/" not in value:
                    raise ValueError(f"cidr {value!r} needs a prefix length, e.g. 10.0.0.0/8")
                kind, host, network = policy_rules.parse_destination(value, what=f"cidr {value!r}")
        except ValueError as e:
            self.error(line, str(e))
            return None, "", None
        return kind, host, network

    def ports(self, value: object, line: int | None) -> frozenset[int] | None:
        if value is None:
            return None
        if (
            not isinstance(value, list)
            or not value
            or not all(type(p) is int and 0 < p < 65536 for p in value)
        ):
            self.error(line, "ports must be a list of port numbers 1-65535, e.g. ports = [443]")
            return None
        return frozenset(value)

    def methods(self, value: object, line: int | None) -> frozenset[str] | None:
        if value is None:
            return None
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(m, str) and _TOKEN.fullmatch(m) for m in value)
        ):
            self.error(line, 'methods must be a list of HTTP methods, e.g. methods = ["GET"]')
            return None
        methods = frozenset(m.upper() for m in value)
        if "CONNECT" in methods:
            self.error(line, "CONNECT is decided by the destination: remove it from methods")
        return methods

    def paths(self, value: object, line: int | None) -> tuple[Any, ...] | None:
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            self.error(line, 'paths must be a list of paths, e.g. paths = ["/v1/"]')
            return None
        patterns = []
        for text in value:
            try:
                patterns.append(parse_pattern(text))
            except ValueError as e:
                self.error(line, str(e))
        return tuple(patterns)

    def relations(self, rules: list[Rule], defaults: bool) -> None:
        """Rules that can never apply (errors), and duplicates (warnings)."""
        everything = [*(policy_rules.default_rules() if defaults else ()), *rules]
        denies = [r for r in rules if r.action == DENY]
        for rule in rules:
            line = _line_of(rule)
            if rule.action == DENY:
                for earlier in denies[: denies.index(rule)]:
                    if overlaps.covers(earlier, rule):
                        self.warn(line, f"this [[deny]] repeats the one at {_where(earlier)}")
                        break
                continue
            if deny := next((d for d in denies if overlaps.covers(d, rule)), None):
                self.error(
                    line,
                    f"this [[allow]] never applies: the [[deny]] at {_where(deny)} covers all of "
                    "it; remove one of them",
                )
                continue
            if not rule.inspect:
                self.passthrough(rule, everything, denies)
            for other in everything[: everything.index(rule)]:
                if (
                    other.action == ALLOW
                    and other.inspect == rule.inspect
                    and overlaps.covers(other, rule)
                ):
                    self.warn(
                        line, f"this [[allow]] repeats {_where(other)}, which allows all of it"
                    )
                    break

    def passthrough(self, rule: Rule, everything: list[Rule], denies: list[Rule]) -> None:
        line = _line_of(rule)
        for other in everything:
            if (
                other.action == ALLOW
                and other.inspect
                and overlaps.destination_covers(other, rule)
                and overlaps.ports_cover(other, rule)
            ):
                self.error(
                    line,
                    f"this pass-through never applies: {_where(other)} inspects the same "
                    "destinations, and inspection wins; remove one"
                    + (
                        " (or set defaults = false)"
                        if other.origin == policy_rules.DEFAULT_ORIGIN
                        else ""
                    ),
                )
                return
        for deny in denies:
            if deny.by_request and overlaps.meets(deny, rule):
                self.error(
                    line,
                    f"the [[deny]] at {_where(deny)} checks requests this pass-through never "
                    "decrypts, so those destinations would be refused: narrow one of them",
                )
                return


def _line_of(rule: Rule) -> int | None:
    _, _, line = rule.origin.rpartition(":")
    return int(line) if line.isdigit() else None


def _where(rule: Rule) -> str:
    if rule.origin == policy_rules.DEFAULT_ORIGIN:
        return f"the built-in rule {rule.text}"
    line = _line_of(rule)
    return f"line {line}" if line else rule.origin
