"""`claude-proxy setup`: fence Claude Code's sandbox, or srt, onto claude-proxy; and take it back.

Each run shows the change as a diff, asks, keeps a backup, writes atomically, and records what it
changed (in the state folder), so that `--undo` takes back exactly that and nothing the user did.
What it writes for Claude Code is `fence.claude_code`: in user or project scope, or in the managed
settings file (`--managed`, root only), which no file the agent could write outranks.
"""

from __future__ import annotations

import difflib
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from claude_proxy.cli import claude_settings, diagnostics, fence
from claude_proxy.cli.claude_settings import Document, Edit, Key
from claude_proxy.errors import ExitCode, ProxyError
from claude_proxy.state import files, paths

RECORD_FILE = "setup-record.json"
NOTHING_WRITTEN = "nothing was written"


@dataclass(frozen=True)
class Plan:
    """What setup writes for a target (claude-code or srt): the settings file, the values it
    wants there, and what it judges them against."""

    target: str  # the setup subcommand: claude-code or srt
    path: Path  # the settings file, as the user knows it
    wanted: dict[Key, Any]
    defaults: dict[Key, Any] = field(default_factory=dict)  # set only where missing
    members: dict[Key, list[str]] = field(default_factory=dict)  # appended where missing
    http_port: int = 0
    socks_port: int = 0
    managed: bool = False  # the managed settings file: root's, 0644
    project: Path | None = None  # claude-code: the folder whose scopes are judged
    home: Path = field(default_factory=Path.home)
    secret: fence.Private | None = None

    @property
    def command(self) -> str:
        """The setup command that writes this plan, as the user would type it."""
        words = ["claude-proxy", "setup", self.target]
        if self.managed:
            words = ["sudo", *words, "--managed"]
        elif self.project is not None and self.target == "claude-code":
            words += ["--project", str(self.project)]
        return " ".join(words)


def private_files(home: Path) -> fence.Private:
    """claude-proxy's files: this environment's, the installed agent's config folder and program
    too, and the agent's plist."""
    from claude_proxy.macos import agent

    config_dirs, programs = [paths.config_dir()], running_from()
    try:
        installed = agent.installed_plist(home)
    except (OSError, ValueError):
        pass
    else:
        if installed.config_dir is not None:
            config_dirs.append(installed.config_dir)
        if installed.executable is not None:  # <env>/bin/claude-proxy, maybe a link into it
            programs.append(Path(os.path.realpath(installed.executable)).parent.parent)
    return fence.private(
        config_dirs=list(dict.fromkeys(config_dirs)),
        state_dir=paths.state_dir(),
        log_dir=paths.log_dir(),
        programs=[p for p in programs if users_own(p, home)],
        plist=paths.plist_path(home),
    )


def running_from() -> list[Path]:
    """Every folder whose code this Python runs: the environment, the interpreter it was made
    from (a sitecustomize.py there runs too), and each folder on sys.path (an editable install's
    source); not the current folder, which `python -m` puts first."""
    here = Path.cwd()
    found = [Path(sys.prefix), Path(sys.base_prefix), Path(__file__).parent]
    for entry in sys.path:
        folder = Path(entry).absolute() if entry else here
        if folder != here and folder.is_dir():
            found.append(folder)
    return found


def users_own(folder: Path, home: Path) -> bool:
    """Whether the user (under sudo: who ran it) owns `folder`, and so the agent could change it.
    A folder root owns (a system Python) is out of the agent's reach already."""
    owner = sudo_user()
    uid = owner[0] if owner is not None else os.geteuid()
    try:
        return folder.stat().st_uid == uid and folder != home and folder != Path("/")
    except OSError:
        return False


def claude_code(
    *,
    home: Path,
    project: Path | None,
    http_port: int,
    socks_port: int,
    managed: bool = False,
) -> Plan:
    if project is not None and not project.is_dir():
        raise ProxyError(f"--project {project} is not a folder", ExitCode.USAGE)
    if managed and project is not None:
        raise ProxyError("--managed applies to every project: leave out --project", ExitCode.USAGE)
    secret = private_files(home)
    try:
        rules = fence.claude_code(
            secret, home=home, http_port=http_port, socks_port=socks_port, managed=managed
        )
    except fence.FenceError as e:
        raise ProxyError(f"{e}; {NOTHING_WRITTEN}", ExitCode.USAGE) from None
    if managed:
        where = fence.managed_path()
        if where is None:
            raise ProxyError(f"no managed settings file on {sys.platform}", ExitCode.USAGE)
    else:
        where = (home if project is None else project.absolute()) / ".claude" / "settings.json"
    return Plan(
        "claude-code",
        where,
        rules.wanted,
        defaults=rules.defaults,
        members=rules.members,
        http_port=http_port,
        socks_port=socks_port,
        managed=managed,
        project=project.absolute() if project is not None else None,
        home=home,
        secret=secret,
    )


def srt(*, home: Path, http_port: int, socks_port: int) -> Plan:
    from claude_proxy.policy import rules as policy_rules  # here: only srt's settings name them

    wanted: dict[Key, Any] = {
        ("network", "httpProxyPort"): http_port,
        ("network", "socksProxyPort"): socks_port,
    }
    # srt rejects a file without these (and may run with its own proxy); and up to 0.0.21 it used
    # no proxy at all for an empty allowedDomains. With the ports set, claude-proxy filters.
    required: dict[Key, Any] = {
        ("network", "allowedDomains"): list(policy_rules.DEFAULT_RULES),
        ("network", "deniedDomains"): [],
        ("filesystem", "denyRead"): [],
        ("filesystem", "allowWrite"): [],
        ("filesystem", "denyWrite"): [],
    }
    secret = private_files(home)
    return Plan(
        "srt",
        home / ".srt-settings.json",
        wanted,
        required,
        fence.srt(secret),
        http_port,
        socks_port,
        home=home,
        secret=secret,
    )


def apply(plan: Plan, *, dry_run: bool, yes: bool, say: Callable[[str], None] = print) -> int:
    if plan.managed:
        managed_preconditions(plan.path)
    real = Path(os.path.realpath(plan.path))  # a linked settings file stays linked
    before, document = read(plan.path, real)
    scopes = other_scopes(plan)  # every file Claude Code also reads must parse, first
    openings = fence.openings_in(document) if plan.target == "claude-code" else []
    try:
        after, changes, created = claude_settings.merge(
            document,
            wanted=plan.wanted,
            defaults=plan.defaults,
            members=plan.members,
            remove=[o.key for o in openings] if yes else [],
        )
    except claude_settings.SettingsError as e:
        message = f"{plan.path}: {e}; fix it by hand: {NOTHING_WRITTEN}"
        raise ProxyError(message, ExitCode.USAGE) from None
    if openings:
        say(f"{plan.path} holds settings that open the fence:")
        for opening in openings:
            say(f"  {claude_settings.dotted(opening.key)}: {opening.opens}")
        if not yes:
            say("  (setup removes them only with --yes; or remove them by hand)")
    if not changes:
        say(f"{plan.path} already has these settings: nothing to change")
    else:
        text = claude_settings.render(after, before or "")
        say(diff(plan.path, before, text).rstrip("\n"))
        if dry_run:
            say(f"dry run: {NOTHING_WRITTEN}")
            return ExitCode.OK
        if not write(plan, real, before, text, yes=yes, say=say):
            return ExitCode.FAILURE
        records = load_records()
        key = str(plan.path.absolute())
        records[key] = merged_record(
            records.get(key), plan, before is None, changes, created, document
        )
        save_records(records, plan.path)
    if dry_run:
        return ExitCode.OK
    if plan.target == "claude-code":
        judge(plan, scopes, after, say)
    say("")
    say("What remains yours to do:")
    found = diagnostics.remaining(
        plan.target, home=plan.home, http_port=plan.http_port, socks_port=plan.socks_port
    )
    for line in diagnostics.remaining_lines(plan.target, found):
        say(line)
    return ExitCode.OK


def other_scopes(plan: Plan) -> list[fence.Scope]:
    """Every settings file Claude Code reads for the plan's folder (its own file included,
    as it is now); an unparsable one stops setup before anything is written."""
    if plan.target != "claude-code":
        return []
    return read_scopes(plan.home, plan.project or Path.cwd())


def read_scopes(home: Path, project: Path) -> list[fence.Scope]:
    """Every settings file Claude Code reads for `project`, highest first; raises ProxyError
    (with FILE:LINE:COL) for one it cannot read."""
    return [
        fence.Scope(name, path, read(path, Path(os.path.realpath(path)))[1])
        for name, path in fence.scope_paths(home, project)
    ]


def judge(
    plan: Plan, scopes: list[fence.Scope], written: Document, say: Callable[[str], None]
) -> None:
    """Say what still opens the fence, in any scope, once the plan holds `written`."""
    assert plan.secret is not None
    mine = plan.path.absolute()
    scopes = [
        fence.Scope(s.name, s.path, written) if s.path.absolute() == mine else s for s in scopes
    ]
    review = fence.review(
        scopes,
        secret=plan.secret,
        home=plan.home,
        http_port=plan.http_port,
        socks_port=plan.socks_port,
        setup_command=plan.command,
    )
    failing = [c for c in review if not c.ok]
    if failing:
        say("")
        say(f"Still open (what Claude Code will apply in {plan.project or Path.cwd()}):")
        for check in failing:
            say(f"FAIL {check.what}: {check.detail}")
            if check.fix:
                say(f"     fix: {check.fix}")
    if not plan.managed:
        say("")
        say(
            "User and project settings cannot lock the sandbox: a project's own "
            ".claude/settings.local.json outranks them. `sudo claude-proxy setup claude-code "
            "--managed` writes the settings that nothing outranks."
        )


def managed_preconditions(path: Path) -> None:
    """Only root writes the managed file, and only where nobody else could rewrite it."""
    if os.geteuid() != 0:
        raise ProxyError(
            f"--managed writes {path}, which only root may change: run it with sudo; "
            f"{NOTHING_WRITTEN}",
            ExitCode.USAGE,
        )
    if (check := fence.managed_owner(path)) is not None:
        raise ProxyError(f"{check.detail}; fix: {check.fix}; {NOTHING_WRITTEN}")


def undo(plan: Plan, *, dry_run: bool, yes: bool, say: Callable[[str], None] = print) -> int:
    records = load_records()
    key = str(plan.path.absolute())
    record = records.get(key)
    if record is None:
        say(f"nothing to undo: setup has not changed {plan.path} (no record in {record_file()})")
        return ExitCode.OK
    if plan.managed:
        managed_preconditions(plan.path)
    try:
        changes = [claude_settings.edit_from_json(c) for c in record["changes"]]
        created: list[Key] = [tuple(k) for k in record["created"]]
    except (KeyError, TypeError, ValueError) as e:
        damaged = f"setup's record for {plan.path} in {record_file()} is damaged ({e})"
        raise ProxyError(damaged) from e
    real = Path(os.path.realpath(plan.path))
    before, document = read(plan.path, real)
    after, notes = claude_settings.revert(document, changes, created)
    for note in notes:
        say(note)
    remove = record.get("created_file", False) and not after and before is not None
    if after == document and not remove:
        say(f"nothing of setup's is left in {plan.path}")
        if not dry_run:
            del records[key]
            save_records(records, plan.path)
        return ExitCode.OK
    text = None if remove else claude_settings.render(after, before or "")
    say(diff(plan.path, before, text).rstrip("\n"))
    if dry_run:
        say(f"dry run: {NOTHING_WRITTEN}")
        return ExitCode.OK
    if not write(plan, real, before, text, yes=yes, say=say):
        return ExitCode.FAILURE
    del records[key]
    save_records(records, plan.path)
    return ExitCode.OK


def read(shown: Path, real: Path) -> tuple[str | None, Document]:
    """The file's text (None if it does not exist) and its document; refuses what it cannot use."""
    try:
        info = real.stat()
    except FileNotFoundError:
        if os.path.islink(shown):
            raise ProxyError(
                f"{shown} is a link to {real}, which does not exist: make the link's target, or "
                f"remove the link; {NOTHING_WRITTEN}",
                ExitCode.USAGE,
            ) from None
        return None, {}
    except OSError as e:
        raise ProxyError(f"cannot read {shown}: {e.strerror}") from e
    if not stat.S_ISREG(info.st_mode):
        raise ProxyError(
            f"{shown} is not a regular file: a settings file must be one; {NOTHING_WRITTEN}",
            ExitCode.USAGE,
        )
    try:
        raw = real.read_bytes()
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
        return text, claude_settings.parse(text)
    except claude_settings.SettingsError as e:
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
    plan: Plan,
    real: Path,
    before: str | None,
    text: str | None,
    *,
    yes: bool,
    say: Callable[[str], None],
) -> bool:
    """Ask, back up and write `text` (None: remove the file). False if the user said no."""
    shown = plan.path
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
            folder_mode = 0o755 if plan.managed else 0o700  # Claude Code must read managed
            real.parent.mkdir(mode=folder_mode, parents=True, exist_ok=True)
            if made:
                real.parent.chmod(folder_mode)  # whatever the umask
        else:
            say(f"backup: {files.backup(real)}")
        if text is None:
            real.unlink()
            say(f"removed {shown} (setup had created it)")
        elif plan.managed:
            files.write_atomically(real, text.encode(), 0o644, owner=(0, 0))
            say(f"wrote {shown}")
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
        data = claude_settings.loads(path.read_text())
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
        made = not path.parent.exists()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = claude_settings.dumps({"files": records}, indent=2) + "\n"
        owner = sudo_user()  # root writing for the user who ran sudo: the file stays theirs
        if made and owner is not None:
            os.chown(path.parent, *owner)
        files.write_atomically(path, data.encode(), 0o600, owner=owner)
    except OSError as e:
        raise ProxyError(
            f"{shown} was changed, but the record of it could not be written to {path} "
            f"({e.strerror}): --undo will not know about this change; the backup beside it remains"
        ) from e


def merged_record(
    earlier: dict[str, Any] | None,
    plan: Plan,
    created_file: bool,
    changes: list[Edit],
    created: list[Key],
    document: Document,
) -> dict[str, Any]:
    """What undo needs to restore the file as it was before the first setup run."""
    if earlier is not None:
        old = [claude_settings.edit_from_json(c) for c in earlier["changes"]]
        changes = claude_settings.combine(old, changes, document)
        created = [*(tuple(k) for k in earlier["created"]), *created]
        created_file = created_file or bool(earlier.get("created_file"))
    return {
        "target": plan.target,
        "managed": plan.managed,
        "created_file": created_file,
        "created": [list(k) for k in dict.fromkeys(created)],
        "changes": [c.to_json() for c in changes],
    }


def user_home() -> Path:
    """Whose claude-proxy the managed settings guard: under sudo, the user who ran it.

    sudo may set HOME to root's (Debian does; macOS keeps the user's): the rules must name the
    user's folders, and setup's record belongs in the user's state folder.
    """
    owner = sudo_user()
    if owner is None:
        return Path.home()
    import pwd

    home = pwd.getpwuid(owner[0]).pw_dir
    os.environ["HOME"] = home  # platformdirs then finds the user's folders
    return Path(home)


def undo_all(*, dry_run: bool, yes: bool, say: Callable[[str], None] = print) -> int:
    """Undo every file setup's record names; the managed one needs root, and says so."""
    records = load_records()
    if not records:
        say(f"nothing to undo: setup has changed no file (no record in {record_file()})")
        return ExitCode.OK
    status = ExitCode.OK
    for name, record in sorted(records.items()):
        path = Path(name)
        managed = bool(record.get("managed")) if isinstance(record, dict) else False
        if managed and os.geteuid() != 0:
            say(f"{path}: run `sudo claude-proxy setup claude-code --managed --undo` (root's file)")
            status = ExitCode.FAILURE
            continue
        kind = record.get("target", "claude-code") if isinstance(record, dict) else "claude-code"
        plan = Plan(str(kind), path, {}, managed=managed)
        try:
            if undo(plan, dry_run=dry_run, yes=yes, say=say) != ExitCode.OK:
                status = ExitCode.FAILURE
        except ProxyError as e:
            say(f"{path}: {e}")
            status = ExitCode.FAILURE
    return status


def sudo_user() -> tuple[int, int] | None:
    """The uid and gid of the user who ran `sudo` (None when not root under sudo)."""
    if os.geteuid() != 0:
        return None
    try:
        uid, gid = int(os.environ["SUDO_UID"]), int(os.environ["SUDO_GID"])
    except (KeyError, ValueError):
        return None
    return (uid, gid) if uid != 0 else None
