"""The fence around the agent: the Claude Code settings that keep every command on claude-proxy
and every file tool away from claude-proxy's secrets and policy, and the settings that open it.

A model following a hostile prompt uses Claude Code's own tools: a Bash call that asks to leave
the sandbox, the Write tool (which the sandbox does not cover) on config.toml, the Read tool or
`cat` on the CA's key, a project-local settings file that outranks the user's. `rules()` is what
`setup claude-code` writes against each; `review()` judges the settings Claude Code will apply,
scope by scope, for `status` and `setup`. Pure: paths and documents in, settings and rows out.

Paths in Claude Code's settings: `//` starts an absolute path (a single `/` is relative to the
settings file's folder), in permission rules and in `sandbox.filesystem` alike.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from claude_proxy.cli.claude_settings import ABSENT, Document, Key, dotted, show
from claude_proxy.cli.diagnostics import Check
from claude_proxy.state import ca

# Where Claude Code reads the settings nothing else outranks (root-owned, one per machine).
MANAGED_SETTINGS = {
    "darwin": Path("/Library/Application Support/ClaudeCode/managed-settings.json"),
    "linux": Path("/etc/claude-code/managed-settings.json"),
}
# A path rule names these literally: a path holding one would be read as a pattern.
PATTERN_CHARACTERS = set("*?[]{}()\\!#")


def managed_path(platform: str = sys.platform) -> Path | None:
    return MANAGED_SETTINGS.get("linux" if platform.startswith("linux") else platform)


class FenceError(ValueError):
    """A path that no rule can name exactly; the message says which and what to do."""


@dataclass(frozen=True)
class Private:
    """claude-proxy's files the agent must not touch: `secret` ones it must not even read."""

    secret_files: tuple[Path, ...]  # the CA's key and its p12, config.toml
    secret_folders: tuple[Path, ...]  # the state folder: pin, organizations, key, audit log
    guarded_folders: tuple[Path, ...]  # written by nobody but the proxy and the user
    guarded_files: tuple[Path, ...] = ()  # the agent's plist: what launchd starts, with what

    @property
    def secrets(self) -> tuple[Path, ...]:
        return self.secret_files + self.secret_folders


def private(
    *,
    config_dirs: Sequence[Path],
    state_dir: Path,
    log_dir: Path,
    programs: Sequence[Path] = (),
    plist: Path | None = None,
) -> Private:
    """The CA's public certificate (and the bundle) stay readable: sandboxed tools trust them.

    `config_dirs`: this environment's and the installed agent's, where they differ. `programs`
    are the environments claude-proxy runs from when the user owns them (a `uv tool` install):
    whoever changes their code changes the policy.
    """
    files = tuple(
        dict.fromkeys(
            f for c in config_dirs for f in (ca.key_path(c), ca.p12_path(c), c / "config.toml")
        )
    )
    folders = outermost([*config_dirs, state_dir, log_dir, *programs])
    return Private(files, (state_dir,), folders, (plist,) if plist else ())


def outermost(folders: list[Path]) -> tuple[Path, ...]:
    """The folders without those inside another (the log folder is in the state folder on Linux)."""
    return tuple(
        f for f in dict.fromkeys(folders) if not any(o in f.parents for o in folders if o != f)
    )


def spelled(path: Path) -> list[Path]:
    """The path as given and as the file system resolves it: a rule must match either."""
    given = Path(os.path.abspath(path))
    real = Path(os.path.realpath(given))
    return [given] if real == given else [given, real]


def absolute(path: Path) -> str:
    """A path as Claude Code's settings name it from the root."""
    text = path.as_posix()
    if odd := sorted(set(text) & PATTERN_CHARACTERS):
        raise FenceError(
            f"{text} holds {' '.join(odd)}, which Claude Code's path rules read as a pattern: "
            "no rule can name it exactly; keep claude-proxy's folders on a path without them"
        )
    return "/" + text


@dataclass(frozen=True)
class Rules:
    """What `setup` writes: values that must hold, members every array must have, and values
    set only where the file has none."""

    wanted: dict[Key, Any]
    members: dict[Key, list[str]]
    defaults: dict[Key, Any] = field(default_factory=dict)


# What runs later, outside the sandbox, from a file the Write tool could change: Claude Code's own
# configuration in any folder (settings; agents and skills, whose front matter names hooks and MCP
# servers; commands, hooks, plugins, workflows), MCP server lists, git's hooks and config
# (core.hooksPath, core.fsmonitor). Plans and memory in .claude stay writable: they are text.
CLAUDE_CODE_CONFIG = (
    "settings.json", "settings.local.json", "agents/**", "skills/**", "commands/**", "hooks/**",
    "plugins/**", "output-styles/**", "workflows/**",
)  # fmt: skip
LATER_ANYWHERE = (
    *(f"//**/.claude/{name}" for name in CLAUDE_CODE_CONFIG),
    "//**/.mcp.json",
    "//**/.git/hooks/**",
    "//**/.git/config",
)
# A shell's startup files run every new terminal, outside any sandbox.
SHELL_STARTUP = (
    ".zshenv", ".zprofile", ".zshrc", ".zlogin", ".bashrc", ".bash_profile", ".bash_login",
    ".profile", ".config/fish",
)  # fmt: skip


def runs_later(home: Path, managed: Path | None) -> list[str]:
    """Files the file tools must not change: each is run, or read for what to run, later."""
    paths = list(LATER_ANYWHERE)
    paths += [absolute(p) for p in spelled(home / ".claude.json")]
    for name in SHELL_STARTUP:
        paths += [absolute(p) + ("/**" if "/" in name else "") for p in spelled(home / name)]
    if managed is not None:
        paths += [absolute(p) + "/**" for p in spelled(managed.parent)]
    return paths


def startup_files(home: Path) -> list[str]:
    """The shell startup files in the home folder, for the sandbox's denyWrite (no patterns)."""
    return [absolute(p) for name in SHELL_STARTUP for p in spelled(home / name)]


def denials(secret: Private) -> tuple[list[str], list[str], list[str]]:
    """denyRead, denyWrite and permission rules for `secret` (each spelling of each path)."""
    read_files = [absolute(p) for f in secret.secret_files for p in spelled(f)]
    read_folders = [absolute(p) for f in secret.secret_folders for p in spelled(f)]
    write_folders = [absolute(p) for f in secret.guarded_folders for p in spelled(f)]
    write_files = [absolute(p) for f in secret.guarded_files for p in spelled(f)]
    deny = [f"Read({p})" for p in read_files] + [f"Read({p}/**)" for p in read_folders]
    deny += [f"Edit({p}/**)" for p in write_folders] + [f"Edit({p})" for p in write_files]
    return read_files + read_folders, write_folders + write_files, deny


def claude_code(
    secret: Private, *, home: Path, http_port: int, socks_port: int, managed: bool
) -> Rules:
    deny_read, deny_write, deny = denials(secret)
    deny += [f"Edit({p})" for p in runs_later(home, managed_path())]
    deny_write += startup_files(home)  # a command run in the home folder could write them
    defaults: dict[Key, Any] = {}
    wanted: dict[Key, Any] = {
        ("sandbox", "enabled"): True,
        ("sandbox", "failIfUnavailable"): True,
        ("sandbox", "allowUnsandboxedCommands"): False,
        ("sandbox", "network", "httpProxyPort"): http_port,
        ("sandbox", "network", "socksProxyPort"): socks_port,
    }
    if managed:
        wanted[("allowManagedHooksOnly",)] = True  # no hook the agent plants runs
        wanted[("sandbox", "filesystem", "allowManagedReadPathsOnly")] = True
        # MCP servers run outside the sandbox, and a sandboxed command can plant a .mcp.json in
        # a folder below it: only the servers the managed file lists may start.
        wanted[("allowManagedMcpServersOnly",)] = True
        defaults[("allowedMcpServers",)] = []  # none until the user lists the ones they trust
    members = {
        ("sandbox", "filesystem", "denyRead"): deny_read,
        ("sandbox", "filesystem", "denyWrite"): deny_write,
        ("permissions", "deny"): deny,
    }
    return Rules(wanted, members, defaults)


def srt(secret: Private) -> dict[Key, list[str]]:
    """srt's own settings take plain absolute paths."""
    deny_read = [str(p) for f in secret.secrets for p in spelled(f)]
    guarded = secret.guarded_folders + secret.guarded_files
    deny_write = [str(p) for f in guarded for p in spelled(f)]
    return {("filesystem", "denyRead"): deny_read, ("filesystem", "denyWrite"): deny_write}


# Judging what Claude Code will apply


@dataclass(frozen=True)
class Scope:
    name: str  # managed, local, project, user: highest first
    path: Path
    document: Document  # {} when the file does not exist


def scope_paths(home: Path, project: Path) -> list[tuple[str, Path]]:
    found = [
        ("local", project / ".claude" / "settings.local.json"),
        ("project", project / ".claude" / "settings.json"),
        ("user", home / ".claude" / "settings.json"),
    ]
    if (managed := managed_path()) is not None:
        found.insert(0, ("managed", managed))
    if project.absolute() == home.absolute():
        found = [(n, p) for n, p in found if n != "project"]  # ~/.claude/settings.json is user
    return found


def lookup(document: Document, key: Key) -> Any:
    node: Any = document
    for name in key:
        if not isinstance(node, dict) or name not in node:
            return ABSENT
        node = node[name]
    return node


@dataclass(frozen=True)
class Found:
    value: Any
    scope: Scope | None  # None: no file sets it

    @property
    def where(self) -> str:
        return "not set" if self.scope is None else f"{self.scope.name}: {self.scope.path}"


def effective(scopes: list[Scope], key: Key) -> Found:
    """A value from the highest scope that sets it (arrays are merged instead: `members`)."""
    for scope in scopes:
        if (value := lookup(scope.document, key)) is not ABSENT:
            return Found(value, scope)
    return Found(ABSENT, None)


def members(scopes: list[Scope], key: Key) -> list[tuple[Any, Scope]]:
    """Claude Code merges these arrays across every scope."""
    out = []
    for scope in scopes:
        value = lookup(scope.document, key)
        if isinstance(value, list):
            out += [(member, scope) for member in value]
    return out


@dataclass(frozen=True)
class Opening:
    """A setting that lets a command around claude-proxy, or the agent at its secrets."""

    key: Key
    opens: str  # what it opens, said to the user
    weak: Callable[[Any], bool]
    array: bool = False  # merged across scopes: a higher scope cannot override it


def _true(value: Any) -> bool:
    return value is True


def _nonempty(value: Any) -> bool:
    return isinstance(value, list) and bool(value)


OPENINGS = (
    Opening(
        ("sandbox", "excludedCommands"),
        "the commands it names run outside the sandbox",
        _nonempty,
        array=True,
    ),
    Opening(
        ("sandbox", "network", "allowUnixSockets"),
        "a Unix socket reaches a service outside the sandbox (Docker's, an SSH agent)",
        _nonempty,
        array=True,
    ),
    Opening(
        ("sandbox", "network", "allowAllUnixSockets"),
        "every Unix socket reaches its service outside the sandbox",
        _true,
    ),
    Opening(
        ("sandbox", "network", "allowMachLookup"),
        "XPC services outside the sandbox act for sandboxed commands",
        _nonempty,
        array=True,
    ),
    Opening(
        ("sandbox", "enableWeakerNetworkIsolation"),
        "trustd becomes a way out of the sandbox (macOS)",
        _true,
    ),
    Opening(
        ("sandbox", "enableWeakerNestedSandbox"),
        "the host's /proc is readable from the sandbox",
        _true,
    ),
    Opening(
        ("sandbox", "allowNestedUserNamespaces"),
        "a sandboxed command can make its own namespaces and step over denyRead and denyWrite",
        _true,
    ),
    Opening(
        ("sandbox", "allowAppleEvents"),
        "a sandboxed command can start other programs outside the sandbox (macOS)",
        _true,
    ),
    Opening(
        ("sandbox", "filesystem", "disabled"),
        "sandboxed commands read and write every file, the CA's key included",
        _true,
    ),
)


def openings_in(document: Document) -> list[Opening]:
    """The whole-key openings a settings file holds (what `setup --yes` removes from its file)."""
    return [o for o in OPENINGS if o.weak(lookup(document, o.key))]


def _inside(path: str, folder: Path) -> bool:
    """Whether a settings path (`//abs`, `~/x`, `/abs` in srt) lies in or above `folder`."""
    text = path[1:] if path.startswith("//") else path
    if text.startswith("~/"):
        text = str(Path.home() / text[2:])
    text = text.rstrip("/*") or "/"
    if not text.startswith("/"):
        return False
    candidate, target = Path(os.path.normpath(text)), Path(os.path.normpath(folder))
    return candidate == target or target in candidate.parents or candidate in target.parents


def _fix(found: Found, key: Key, setup_command: str) -> str:
    if found.scope is None or found.scope.name == "managed":
        return f"`{setup_command}`" if found.scope is None else f"set it in {found.scope.path}"
    return (
        f"remove {dotted(key)} from {found.scope.path} (or `{setup_command}`; "
        "`sudo claude-proxy setup claude-code --managed` outranks every other file)"
    )


def review(
    scopes: list[Scope],
    *,
    secret: Private,
    home: Path,
    http_port: int,
    socks_port: int,
    setup_command: str = "claude-proxy setup claude-code",
) -> list[Check]:
    """What Claude Code will apply for this folder, one row per concern; a row fails where a
    command can get around claude-proxy or the agent can reach claude-proxy's secrets."""
    out: list[Check] = []
    rules = claude_code(
        secret, home=home, http_port=http_port, socks_port=socks_port, managed=False
    )
    for key, value in rules.wanted.items():
        found = effective(scopes, key)
        good = found.value is not ABSENT and type(found.value) is type(value)
        good = good and found.value == value
        detail = "not set" if found.scope is None else f"{show(found.value)} ({found.where})"
        if not good:
            detail += f": claude-proxy needs {show(value)}; {WHY[key]}"
        fix = "" if good else _fix(found, key, setup_command)
        out.append(Check(good, dotted(key), detail, fix))
    for opening in OPENINGS:
        found = effective(scopes, opening.key)
        if opening.array:
            merged = members(scopes, opening.key)
            if merged:
                files = list(dict.fromkeys(str(s.path) for _, s in merged))
                detail = f"{show([m for m, _ in merged])} ({', '.join(files)}): {opening.opens}"
                fix = f"remove {dotted(opening.key)} from {' and '.join(files)}"
                out.append(Check(False, dotted(opening.key), detail, fix))
        elif opening.weak(found.value):
            detail = f"{show(found.value)} ({found.where}): {opening.opens}"
            fix = _fix(found, opening.key, setup_command)
            out.append(Check(False, dotted(opening.key), detail, fix))
    out += _reopened(scopes, secret)
    out.append(_denied(scopes, rules))
    out.append(_hooks(scopes))
    managed = next((s for s in scopes if s.name == "managed"), None)
    if managed is not None and (check := managed_owner(managed.path)) is not None:
        out.append(check)
    return out


WHY: dict[Key, str] = {
    ("sandbox", "enabled"): "without the sandbox, commands reach the network directly",
    ("sandbox", "failIfUnavailable"): "where the sandbox cannot start, commands run without it",
    ("sandbox", "allowUnsandboxedCommands"): (
        "a Bash call with dangerouslyDisableSandbox runs outside the sandbox"
    ),
    ("sandbox", "network", "httpProxyPort"): "sandboxed HTTP traffic goes to another proxy",
    ("sandbox", "network", "socksProxyPort"): "sandboxed SOCKS traffic goes to another proxy",
}


def _reopened(scopes: list[Scope], secret: Private) -> Iterator[Check]:
    """allowRead re-opens reading inside denyRead; allowWrite re-opens writing."""
    for key, folders, what in (
        (("sandbox", "filesystem", "allowRead"), secret.secrets, "read"),
        (("sandbox", "filesystem", "allowWrite"), secret.guarded_folders, "change"),
    ):
        for member, scope in members(scopes, key):
            if isinstance(member, str) and any(_inside(member, f) for f in folders):
                yield Check(
                    False,
                    dotted(key),
                    f"{show(member)} ({scope.name}: {scope.path}): sandboxed commands can {what} "
                    "claude-proxy's private files",
                    f"remove {show(member)} from {dotted(key)} in {scope.path}",
                )


def _denied(scopes: list[Scope], rules: Rules) -> Check:
    missing = []
    for key, wanted in rules.members.items():
        have = {m for m, _ in members(scopes, key) if isinstance(m, str)}
        missing += [f"{dotted(key)} {m}" for m in wanted if m not in have]
    if not missing:
        return Check(True, "private files", "the agent can neither read nor change them")
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    return Check(
        False,
        "private files",
        f"missing {missing[0]}{more}: the agent's tools can reach claude-proxy's key, policy or "
        "state",
        "`claude-proxy setup claude-code` (or --managed)",
    )


def _hooks(scopes: list[Scope]) -> Check:
    only_managed = effective([s for s in scopes if s.name == "managed"], ("allowManagedHooksOnly",))
    if only_managed.value is True:
        return Check(True, "hooks", "only the managed settings' hooks run")
    places = [
        str(s.path)
        for s in scopes
        if s.name != "managed" and lookup(s.document, ("hooks",)) not in (ABSENT, {}, None)
    ]
    told = f"hooks in {', '.join(places)} run" if places else "hooks named in settings would run"
    return Check(
        True,
        "hooks",
        f"{told} outside the sandbox (yours to trust; the agent cannot add one: the file tools "
        "may not change settings files)",
    )


def managed_owner(path: Path) -> Check | None:
    """A managed file anyone but root can change is no lock at all."""
    for item in (path, path.parent):
        try:
            info = item.stat()
        except FileNotFoundError:
            continue
        except OSError as e:
            return Check(False, "managed settings", f"cannot read {item}: {e.strerror}")
        if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return Check(
                False,
                "managed settings",
                f"{item} is owned by uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}: "
                "someone other than root can rewrite the settings that outrank every other",
                f"sudo chown root {item} && sudo chmod go-w {item}",
            )
    return None
