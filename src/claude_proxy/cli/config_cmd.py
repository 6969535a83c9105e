"""`config path|edit|check|show` and `check HOST [METHOD PATH]`: the user's side of the policy.

No mitmproxy here. `edit` works like visudo: the editor gets a copy, and the copy replaces the
file (atomically, keeping its mode) only when it is valid.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, TextIO

from claude_proxy.errors import ExitCode, ProxyError
from claude_proxy.policy import config_file, rules
from claude_proxy.policy.config_file import Config, ConfigError, Diagnostic
from claude_proxy.state import files, run_state

DEFAULT_EDITOR = "vi"


def load(path: Path) -> Config:
    """The config, or every problem on stderr and exit 2."""
    try:
        return config_file.load(path)
    except ConfigError as e:
        report(e.errors, e.warnings, out=sys.stderr)
        raise ProxyError(
            f"{path} is not valid; fix it (`claude-proxy config edit`)", ExitCode.USAGE
        ) from None


def report(
    errors: Sequence[Diagnostic], warnings: Sequence[Diagnostic], *, out: TextIO | None = None
) -> None:
    for diagnostic in (*errors, *warnings):
        print(diagnostic, file=out or sys.stdout)


def policy_for(path: Path, flags: Sequence[str]) -> rules.Policy:
    try:
        return config_file.build_policy(load(path), flags)
    except ValueError as e:
        raise ProxyError(
            f"invalid --allow {e}; see --help for the rule syntax", ExitCode.USAGE
        ) from None


def cmd_path(path: Path) -> int:
    if config_file.ensure_file(path):
        print(f"claude-proxy: wrote {path}, an example that keeps the defaults", file=sys.stderr)
    print(path)
    return ExitCode.OK


def cmd_check(path: Path) -> int:
    try:
        loaded = config_file.load(path)
    except ConfigError as e:
        report(e.errors, e.warnings)
        print(f"{path}: {len(e.errors)} error(s); nothing was changed", file=sys.stderr)
        return ExitCode.USAGE
    report((), loaded.warnings)
    if not loaded.exists:
        print(f"{path} does not exist: the built-in defaults apply")
        return ExitCode.OK
    own = len(loaded.rules)
    defaults = " and the built-in defaults" if loaded.defaults else ""
    warnings = f" ({len(loaded.warnings)} warning(s))" if loaded.warnings else ""
    print(f"{path}: valid, {own} rule{'' if own == 1 else 's'} of its own{defaults}{warnings}")
    return ExitCode.OK


def cmd_show(path: Path, flags: Sequence[str], port: int | None, *, as_json: bool = False) -> int:
    import json

    from claude_proxy.cli import ports

    loaded = load(path)
    found = ports.resolve(port)
    running = found.running if found.running and found.running.port == found.port else None
    running = running or run_state.read(found.port)
    extra = [f for f in (running.flags if running else []) if f not in flags]
    built = policy_for(path, [*flags, *extra])
    in_force = running is not None and running.digest == loaded.digest

    def origin_of(rule: rules.Rule) -> str:
        if rule.origin == rules.FLAG_ORIGIN and rule.text in extra:
            return f"--allow (the proxy on port {found.port})"
        return rule.origin

    if as_json:
        document = {
            "source": built.source,
            "ports": found.to_json(),
            "running": None
            if running is None
            else {
                "pid": running.pid,
                "port": running.port,
                "in_force": in_force,
                "error": running.error,
            },
            "rules": [
                {
                    "action": rule.action,
                    "rule": rule.text,
                    "describe": rule.describe(),
                    "origin": origin_of(rule),
                    "comment": rule.comment or None,
                }
                for rule in built.rules
            ],
        }
        print(json.dumps(document, indent=2))
        return ExitCode.OK
    print(f"# the policy: {built.source}")
    if found.source != ports.DEFAULTS:
        print(f"# the proxy's ports: {found.describe()}")
    if running is not None:
        state = "in force" if in_force else "NOT the one in force"
        print(f"# the proxy on port {found.port} (pid {running.pid}): this file is {state}")
        if running.error:
            print(f"# its last reload failed: {running.error}")
    for rule in built.rules:
        comment = f"  # {rule.comment}" if rule.comment else ""
        print(f"{rule.action:<6}{rule.describe():<48} {origin_of(rule)}{comment}")
    if not built.rules:
        print("(no rule: everything is refused)")
    return ExitCode.OK


USAGE = "HOST[:PORT], HOST[:PORT] METHOD PATH, or [METHOD] URL"


class Question(NamedTuple):
    """What `check` is asked: a destination, and perhaps one request to it."""

    host: str
    port: int
    scheme: str
    request: tuple[str, str] | None  # (METHOD, PATH with query)

    def where(self, *, with_request: bool) -> str:
        prefix = "http://" if self.scheme == rules.HTTP else ""
        where = (
            f"{prefix}{self.host}:{self.port}"
            if ":" not in self.host
            else (f"{prefix}[{self.host}]:{self.port}")
        )
        if self.request and with_request:
            method, target = self.request
            where += f" {method} {target.split('?', 1)[0]}"
        return where


def usage(message: str) -> ProxyError:
    return ProxyError(f"check: {message}", ExitCode.USAGE)


def question(words: Sequence[str]) -> Question:
    """Read `check`'s words: HOST[:PORT] [METHOD PATH], or [METHOD] URL."""
    if not words:
        return_usage = "say what to check: " + USAGE
        raise usage(
            f"{return_usage}, e.g. `claude-proxy check https://api.anthropic.com/v1/messages`"
        )
    urls = [w for w in words if "://" in w]
    if urls:
        if len(words) > 2 or words[-1] != urls[0]:
            raise usage("give [METHOD] URL, e.g. POST https://api.anthropic.com/v1/messages")
        method = words[0].upper() if len(words) == 2 else "GET"
        return from_url(urls[0], method)
    if len(words) not in (1, 3):
        raise usage("give METHOD and PATH together, e.g. GET /v1/models")
    try:
        host, port_or_none = rules.split_host_port(words[0], what="destination")
    except ValueError as e:
        raise usage(f"{e}; write HOST or HOST:PORT") from None
    port = rules.DEFAULT_PORT if port_or_none is None else port_or_none
    request = (words[1].upper(), words[2]) if len(words) == 3 else None
    return Question(valid_host(host), port, rules.HTTPS, request)


def from_url(url: str, method: str) -> Question:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise usage(f"{url!r} is not a URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in (rules.HTTPS, rules.HTTP) or not parts.hostname:
        raise usage(f"{url!r} is not an https:// or http:// URL with a host")
    default = rules.DEFAULT_PORT if scheme == rules.HTTPS else rules.CLEARTEXT_PORT
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Question(valid_host(parts.hostname), port or default, scheme, (method, target))


def valid_host(host: str) -> str:
    if "*" in host:
        raise usage(
            f"{host!r} is a rule, not a host: check asks about one host, e.g. "
            "api.anthropic.com (`claude-proxy config show` lists the rules)"
        )
    try:
        rules.normalize_host(host)
    except ValueError as e:
        raise usage(f"{host!r} is not a host name or IP address ({e})") from None
    return host


def cmd_decide(path: Path, flags: Sequence[str], words: Sequence[str], as_json: bool) -> int:
    """`check`: what the proxy would do, and which rule says so."""
    import json

    asked = question(words)
    built = policy_for(path, flags)
    decision = built.decide(asked.host, asked.port, asked.scheme)
    by_request = asked.request is not None and (not decision.allowed or decision.inspect)
    if by_request and asked.request is not None:
        method, target = asked.request
        decision = built.decide_request(asked.host, asked.port, asked.scheme, method, target)
    rule = next((r for r in built.rules if r.text == decision.rule), None)
    code = ExitCode.OK if decision.allowed else ExitCode.FAILURE
    if as_json:
        document = {
            "allowed": decision.allowed,
            "host": asked.host,
            "port": asked.port,
            "scheme": asked.scheme,
            "request": None
            if asked.request is None
            else {"method": asked.request[0], "path": asked.request[1].split("?", 1)[0]},
            "inspect": decision.inspect if decision.allowed else None,
            "rule": decision.rule,
            "reason": None if decision.allowed else decision.reason,
            "origin": rule.origin if rule is not None else None,
        }
        print(json.dumps(document, indent=2))
        return code
    where = asked.where(with_request=by_request)
    if decision.allowed:
        note = "" if decision.inspect else ": passed through as it is, never decrypted"
        if asked.request and not decision.inspect:
            note += " (its requests are not seen)"
        print(f"allow {where} (rule {decision.rule}){note}")
        if rule is not None:
            print(f"  {rule.action} {rule.describe()}  ({rule.origin})")
            if rule.by_request and not asked.request:
                print("  each request is checked too: add METHOD PATH to check one")
        return code
    print(f"refuse {where}: {decision.reason}")
    if rule is not None:
        print(f"  {rule.action} {rule.describe()}  ({rule.origin})")
    return code


def editor_command() -> list[str]:
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or DEFAULT_EDITOR
    return shlex.split(editor)


def editor_missing(e: OSError) -> ProxyError:
    variable = next((v for v in ("VISUAL", "EDITOR") if os.environ.get(v)), None)
    named = (
        f"${variable} is {os.environ[variable]!r}"
        if variable
        else f"no $EDITOR is set ({DEFAULT_EDITOR})"
    )
    return ProxyError(
        f"cannot start the editor: {named} ({e.strerror or e}); set $EDITOR to an editor you "
        "have, e.g. EDITOR=nano claude-proxy config edit; the file is unchanged"
    )


def cmd_edit(path: Path) -> int:
    """Edit a copy; install it only if it is valid. Asks what to do about an invalid one when
    there is a terminal; without one, an invalid edit is discarded (exit 2)."""
    import subprocess
    import tempfile

    if path.is_dir():
        aside = shlex.quote(str(path) + ".folder")
        raise ProxyError(
            f"{path} is a folder, where config.toml must be a file: move the folder aside "
            f"(mv {shlex.quote(str(path))} {aside}), then edit again",
            ExitCode.USAGE,
        )
    config_file.ensure_file(path)
    original = path.read_bytes()
    mode = files.mode_of(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.edit-", suffix=".toml")
    copy = Path(name)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(original)
        while True:
            try:
                result = subprocess.run([*editor_command(), str(copy)], check=False)
            except OSError as e:
                raise editor_missing(e) from None
            if result.returncode != 0:
                print(
                    f"claude-proxy: the editor exited with {result.returncode}; "
                    f"{path} is unchanged",
                    file=sys.stderr,
                )
                return ExitCode.FAILURE
            edited = copy.read_bytes()
            if edited == original:
                print(f"no change; {path} is unchanged", file=sys.stderr)
                return ExitCode.OK
            try:
                loaded = config_file.parse(path, edited)
            except ConfigError as e:
                report(e.errors, e.warnings, out=sys.stderr)
                if sys.stdin.isatty() and ask_again():
                    continue
                print(f"claude-proxy: the edit is not valid; {path} is unchanged", file=sys.stderr)
                return ExitCode.USAGE
            if path.read_bytes() != original:
                keep = path.with_name(f"{path.name}.rejected-edit")
                copy.replace(keep)
                raise ProxyError(
                    f"{path} changed while you edited it; your edit is in {keep}",
                    ExitCode.FAILURE,
                )
            files.write_atomically(path, edited, mode)
            report((), loaded.warnings, out=sys.stderr)
            print(f"installed {path}; a running claude-proxy applies it now", file=sys.stderr)
            return ExitCode.OK
    finally:
        copy.unlink(missing_ok=True)


def ask_again() -> bool:
    while True:
        try:
            answer = input("What now? (e)dit again, or (q)uit without saving: ").strip().lower()
        except EOFError:
            return False
        if answer in ("e", "edit"):
            return True
        if answer in ("q", "quit", "x"):
            return False
