"""`claude-proxy setup`: point Claude Code's sandbox, or srt, at claude-proxy; and take it back.

Each run shows the change as a diff, asks, keeps a backup, writes atomically, and records what it
changed (in the state folder), so that `--undo` takes back exactly that and nothing the user did.
"""

from __future__ import annotations

import difflib
import json
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from claude_proxy import files, paths, policy, readiness, settings
from claude_proxy.errors import ExitCode, ProxyError
from claude_proxy.settings import Change, Document, Key

RECORD_FILE = "setup-record.json"
NOTHING_WRITTEN = "nothing was written"


@dataclass(frozen=True)
class Target:
    name: str  # the setup subcommand: claude-code or srt
    path: Path  # the settings file, as the user knows it
    wanted: dict[Key, Any]
    defaults: dict[Key, Any] = field(default_factory=dict)  # set only where missing
    http_port: int = 0
    socks_port: int = 0


def claude_code(*, home: Path, project: Path | None, http_port: int, socks_port: int) -> Target:
    if project is not None and not project.is_dir():
        raise ProxyError(f"--project {project} is not a folder", ExitCode.USAGE)
    base = home if project is None else project.absolute()
    wanted: dict[Key, Any] = {
        ("sandbox", "enabled"): True,
        ("sandbox", "network", "httpProxyPort"): http_port,
        ("sandbox", "network", "socksProxyPort"): socks_port,
    }
    return Target(
        "claude-code", base / ".claude" / "settings.json", wanted, {}, http_port, socks_port
    )


def srt(*, home: Path, http_port: int, socks_port: int) -> Target:
    wanted: dict[Key, Any] = {
        ("network", "httpProxyPort"): http_port,
        ("network", "socksProxyPort"): socks_port,
    }
    # srt rejects a file without these (and may run with its own proxy); and up to 0.0.21 it used
    # no proxy at all for an empty allowedDomains. With the ports set, claude-proxy filters.
    required: dict[Key, Any] = {
        ("network", "allowedDomains"): list(policy.DEFAULT_RULES),
        ("network", "deniedDomains"): [],
        ("filesystem", "denyRead"): [],
        ("filesystem", "allowWrite"): [],
        ("filesystem", "denyWrite"): [],
    }
    return Target("srt", home / ".srt-settings.json", wanted, required, http_port, socks_port)


def apply(target: Target, *, dry_run: bool, yes: bool, say: Callable[[str], None] = print) -> int:
    real = Path(os.path.realpath(target.path))  # a linked settings file stays linked
    before, document = read(target.path, real)
    try:
        after, changes, created = settings.merge(
            document, wanted=target.wanted, defaults=target.defaults
        )
    except settings.SettingsError as e:
        message = f"{target.path}: {e}; fix it by hand: {NOTHING_WRITTEN}"
        raise ProxyError(message, ExitCode.USAGE) from None
    if not changes:
        say(f"{target.path} already has these settings: nothing to change")
    else:
        text = settings.render(after, before or "")
        say(diff(target.path, before, text).rstrip("\n"))
        if dry_run:
            say(f"dry run: {NOTHING_WRITTEN}")
            return ExitCode.OK
        if not write(target.path, real, before, text, yes=yes, say=say):
            return ExitCode.FAILURE
        records = load_records()
        key = str(target.path.absolute())
        records[key] = merged_record(
            records.get(key), target, before is None, changes, created, document
        )
        save_records(records, target.path)
    if not dry_run:
        say("")
        say("What remains yours to do:")
        found = readiness.steps(target.name, target.http_port, target.socks_port)
        for line in readiness.report(target.name, found):
            say(line)
    return ExitCode.OK


def undo(target: Target, *, dry_run: bool, yes: bool, say: Callable[[str], None] = print) -> int:
    records = load_records()
    key = str(target.path.absolute())
    record = records.get(key)
    if record is None:
        say(f"nothing to undo: setup has not changed {target.path} (no record in {record_file()})")
        return ExitCode.OK
    try:
        changes = [Change.from_json(c) for c in record["changes"]]
        created: list[Key] = [tuple(k) for k in record["created"]]
    except (KeyError, TypeError, ValueError) as e:
        damaged = f"setup's record for {target.path} in {record_file()} is damaged ({e})"
        raise ProxyError(damaged) from e
    real = Path(os.path.realpath(target.path))
    before, document = read(target.path, real)
    after, notes = settings.revert(document, changes, created)
    for note in notes:
        say(note)
    remove = record.get("created_file", False) and not after and before is not None
    if after == document and not remove:
        say(f"nothing of setup's is left in {target.path}")
        if not dry_run:
            del records[key]
            save_records(records, target.path)
        return ExitCode.OK
    text = None if remove else settings.render(after, before or "")
    say(diff(target.path, before, text).rstrip("\n"))
    if dry_run:
        say(f"dry run: {NOTHING_WRITTEN}")
        return ExitCode.OK
    if not write(target.path, real, before, text, yes=yes, say=say):
        return ExitCode.FAILURE
    del records[key]
    save_records(records, target.path)
    return ExitCode.OK


def read(shown: Path, real: Path) -> tuple[str | None, Document]:
    """The file's text (None if it does not exist) and its document; refuses what it cannot use."""
    try:
        raw = real.read_bytes()
    except FileNotFoundError:
        return None, {}
    except OSError as e:
        raise ProxyError(f"cannot read {shown}: {e.strerror}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProxyError(
            f"cannot parse {shown}: byte {e.start} is not UTF-8; fix it by hand: {NOTHING_WRITTEN}",
            ExitCode.USAGE,
        ) from e
    try:
        return text, settings.parse(text)
    except settings.SettingsError as e:
        where = f"{shown}:{e.at}" if e.at else str(shown)
        raise ProxyError(
            f"cannot parse {where}: {e}; fix it by hand: {NOTHING_WRITTEN}", ExitCode.USAGE
        ) from e


def diff(shown: Path, before: str | None, after: str | None) -> str:
    def lines(text: str | None) -> list[str]:
        return [line if line.endswith("\n") else line + "\n" for line in (text or "").splitlines()]

    return "".join(
        difflib.unified_diff(
            lines(before),
            lines(after),
            fromfile=str(shown) if before is not None else "/dev/null",
            tofile=str(shown) if after is not None else "/dev/null",
        )
    )


def write(
    shown: Path,
    real: Path,
    before: str | None,
    text: str | None,
    *,
    yes: bool,
    say: Callable[[str], None],
) -> bool:
    """Ask, back up and write `text` (None: remove the file). False if the user said no."""
    if before is not None and read_only(real):
        raise ProxyError(
            f"{shown} is read-only (mode {files.mode_of(real):04o}): {NOTHING_WRITTEN}; "
            "make it writable (chmod u+w) or change it by hand",
        )
    if not confirm(yes):
        say(NOTHING_WRITTEN)
        return False
    try:
        if before is None:
            made = not real.parent.exists()
            real.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if made:
                real.parent.chmod(0o700)  # whatever the umask
        else:
            say(f"backup: {files.backup(real)}")
        if text is None:
            real.unlink()
            say(f"removed {shown} (setup had created it)")
        else:
            mode = 0o600 if before is None else files.mode_of(real)
            files.write_atomically(real, text.encode(), mode)
            say(f"wrote {shown}")
    except OSError as e:
        raise ProxyError(f"cannot write {shown}: {e.strerror}; {NOTHING_WRITTEN}") from e
    return True


def read_only(path: Path) -> bool:
    # A rename would replace a read-only file anyway: respect the mode, even as root.
    return not os.access(path, os.W_OK) or not files.mode_of(path) & (
        stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    )


def confirm(yes: bool) -> bool:
    if yes:
        return True
    if not sys.stdin.isatty():
        raise ProxyError(
            "no terminal to ask whether to write it: pass --yes (or --dry-run to only see it)",
            ExitCode.USAGE,
        )
    try:
        answer = input("Write it? [y/N] ")
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def record_file() -> Path:
    return paths.state_dir() / RECORD_FILE


def load_records() -> dict[str, Any]:
    path = record_file()
    try:
        data = json.loads(path.read_text())
        return dict(data["files"])
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ProxyError(
            f"cannot read setup's record {path} ({e}); move it aside "
            "(undo then has nothing to go on: the backups beside the settings file remain)"
        ) from e


def save_records(records: dict[str, Any], shown: Path) -> None:
    path = record_file()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = json.dumps({"files": records}, indent=2) + "\n"
        files.write_atomically(path, data.encode(), 0o600)
    except OSError as e:
        raise ProxyError(
            f"{shown} was changed, but the record of it could not be written to {path} "
            f"({e.strerror}): --undo will not know about this change; the backup beside it remains"
        ) from e


def merged_record(
    earlier: dict[str, Any] | None,
    target: Target,
    created_file: bool,
    changes: list[Change],
    created: list[Key],
    document: Document,
) -> dict[str, Any]:
    """What undo needs to restore the file as it was before the first setup run."""
    if earlier is not None:
        old = [Change.from_json(c) for c in earlier["changes"]]
        changes = settings.combine(old, changes, document)
        created = [*(tuple(k) for k in earlier["created"]), *created]
        created_file = created_file or bool(earlier.get("created_file"))
    return {
        "target": target.name,
        "created_file": created_file,
        "created": [list(k) for k in dict.fromkeys(created)],
        "changes": [c.to_json() for c in changes],
    }
