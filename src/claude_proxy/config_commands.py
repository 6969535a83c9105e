"""`config path|edit|check|show` and `check HOST [METHOD PATH]`: the user's side of the policy.

No mitmproxy here. `edit` works like visudo: the editor gets a copy, and the copy replaces the
file (atomically, keeping its mode) only when it is valid.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from claude_proxy import config, files, policy, runstate
from claude_proxy.config import Config, ConfigError, Diagnostic
from claude_proxy.errors import ExitCode, ProxyError

DEFAULT_EDITOR = "vi"


def load(path: Path) -> Config:
    """The config, or every problem on stderr and exit 2."""
    try:
        return config.load(path)
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


def policy_for(path: Path, flags: Sequence[str]) -> policy.Policy:
    try:
        return config.build_policy(load(path), flags)
    except ValueError as e:
        raise ProxyError(
            f"invalid --allow {e}; see --help for the rule syntax", ExitCode.USAGE
        ) from None


def cmd_path(path: Path) -> int:
    if config.ensure_file(path):
        print(f"claude-proxy: wrote {path}, an example that keeps the defaults", file=sys.stderr)
    print(path)
    return ExitCode.OK


def cmd_check(path: Path) -> int:
    try:
        loaded = config.load(path)
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


def cmd_show(path: Path, flags: Sequence[str], port: int) -> int:
    loaded = load(path)
    running = runstate.read(port)
    extra = [f for f in (running.flags if running else []) if f not in flags]
    built = policy_for(path, [*flags, *extra])
    print(f"# the policy: {built.source}")
    if running is not None:
        state = "in force" if running.digest == loaded.digest else "NOT the one in force"
        print(f"# the proxy on port {port} (pid {running.pid}): this file is {state}")
        if running.error:
            print(f"# its last reload failed: {running.error}")
    for rule in built.rules:
        origin = rule.origin
        if rule.origin == policy.FLAG_ORIGIN and rule.text in extra:
            origin = f"--allow (the proxy on port {port})"
        comment = f"  # {rule.comment}" if rule.comment else ""
        print(f"{rule.action:<6}{rule.describe():<48} {origin}{comment}")
    if not built.rules:
        print("(no rule: everything is refused)")
    return ExitCode.OK


def cmd_decide(path: Path, flags: Sequence[str], destination: str, request: Sequence[str]) -> int:
    """`check HOST[:PORT] [METHOD PATH]`: what the proxy would do, and which rule says so."""
    if len(request) not in (0, 2):
        raise ProxyError("give METHOD and PATH together, e.g. GET /v1/models", ExitCode.USAGE)
    built = policy_for(path, flags)
    try:
        host, port_or_none = policy.split_host_port(destination, what="destination")
    except ValueError as e:
        raise ProxyError(f"{e}; write HOST or HOST:PORT", ExitCode.USAGE) from None
    port = policy.DEFAULT_PORT if port_or_none is None else port_or_none
    where = f"{host}:{port}"
    decision = built.decide(host, port)
    if request and (not decision.allowed or decision.inspect):
        method, target = request
        decision = built.decide_request(host, port, policy.HTTPS, method, target)
        where += f" {method} {target.split('?', 1)[0]}"
    rule = next((r for r in built.rules if r.text == decision.rule), None)
    if decision.allowed:
        note = "" if decision.inspect else ": passed through as it is, never decrypted"
        if request and not decision.inspect:
            note += " (its requests are not seen)"
        print(f"allow {where} (rule {decision.rule}){note}")
        if rule is not None:
            print(f"  {rule.action} {rule.describe()}  ({rule.origin})")
            if rule.by_request and not request:
                print("  each request is checked too: add METHOD PATH to check one")
        return ExitCode.OK
    print(f"refuse {where}: {decision.reason}")
    if rule is not None:
        print(f"  {rule.action} {rule.describe()}  ({rule.origin})")
    return ExitCode.FAILURE


def editor_command() -> list[str]:
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or DEFAULT_EDITOR
    return shlex.split(editor)


def cmd_edit(path: Path) -> int:
    """Edit a copy; install it only if it is valid. Asks what to do about an invalid one when
    there is a terminal; without one, an invalid edit is discarded (exit 2)."""
    config.ensure_file(path)
    original = path.read_bytes()
    mode = files.mode_of(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.edit-", suffix=".toml")
    copy = Path(name)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(original)
        while True:
            result = subprocess.run([*editor_command(), str(copy)], check=False)
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
                loaded = config.parse(path, edited)
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
