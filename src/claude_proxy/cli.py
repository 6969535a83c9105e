"""Command line: parse, dispatch, and turn a ProxyError into one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

# service imports mitmproxy (~0.75 s): only `run` (and making a new CA) loads it.
from claude_proxy import accounts, ca, config, config_commands, defaults, logs, mitm, paths
from claude_proxy.errors import ExitCode, ProxyError

COMMANDS = (
    "run", "ca", "env", "check", "config", "plist", "status", "paths", "setup", "orgs", "pin",
    "log",
)  # fmt: skip
SHELLS = ("sh", "zsh", "fish", "nu")
TOOL_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args))
    except ProxyError as e:
        print(f"claude-proxy: {e}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.OK)
    except OSError as e:  # a file or folder no check foresaw: one line, never a traceback
        where = f" {e.filename}" if e.filename else ""
        print(
            f"claude-proxy: cannot go on:{where}: {e.strerror or e}; check that it can be read "
            "and written (permissions, a read-only or full disk)",
            file=sys.stderr,
        )
        return int(ExitCode.STATE)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "run")  # `claude-proxy` alone runs the proxy
    parser = argparse.ArgumentParser(
        prog="claude-proxy",
        description="A filtering HTTPS proxy that lets Claude Code reach only Anthropic's hosts.",
        epilog="Exit codes: 0 ok, 1 unexpected error, 2 bad usage/rule/option, "
        "3 cannot listen (port in use), 4 CA unusable, 5 a folder cannot be written, "
        "6 not the tested mitmproxy.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy (the default)")
    run.add_argument(
        "--host",
        help="listen address (default: [listen] hosts in config.toml, else 127.0.0.1 and ::1)",
    )
    run.add_argument(
        "--port", type=port, help=f"(default: config.toml's, else {defaults.DEFAULT_PORT})"
    )
    run.add_argument(
        "--socks-port",
        type=port,
        help=f"SOCKS5 port, same addresses (default: config.toml's, else "
        f"{defaults.DEFAULT_SOCKS_PORT})",
    )
    add_allow(run)
    run.add_argument(
        "--set",
        dest="mitmproxy_options",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a mitmproxy option, as mitmdump --set does",
    )
    run.add_argument(
        "--expose-to-network",
        action="store_true",
        help="allow a non-loopback --host: anyone who can reach the port can use the proxy",
    )
    run.add_argument(
        "--config-dir",
        type=Path,
        help="the folder of the CA (default: $XDG_CONFIG_HOME/claude-proxy, else "
        "~/.config/claude-proxy); the agent's plist names it",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log more")
    run.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="only errors on stderr, rate-limited (the log file has everything): for the agent",
    )
    run.set_defaults(func=cmd_run)

    ca_cmd = sub.add_parser("ca", help="make the CA if missing; print its path and fingerprints")
    ca_output = ca_cmd.add_mutually_exclusive_group()
    ca_output.add_argument("--sha1", action="store_true", help="print only the SHA-1 fingerprint")
    ca_output.add_argument(
        "--bundle",
        nargs="?",
        const="",
        metavar="PATH",
        help="write the system's trust roots plus the CA to PATH, 0644 "
        "(default: ca-bundle.pem beside the CA)",
    )
    ca_cmd.set_defaults(func=cmd_ca)

    env = sub.add_parser("env", help="print the environment Claude Code needs to use the proxy")
    env.add_argument("--shell", choices=SHELLS, default=default_shell())
    env.add_argument("--host", default=defaults.DEFAULT_HOST)
    env.add_argument("--port", type=port, default=defaults.DEFAULT_PORT)
    env.add_argument(
        "--tools",
        action="store_true",
        help="also point SSL_CERT_FILE, REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE and GIT_SSL_CAINFO "
        "at the bundle `ca --bundle` writes",
    )
    env.set_defaults(func=cmd_env)

    check = sub.add_parser(
        "check", help="say whether HOST[:PORT] (or a request to it) would be allowed, and why"
    )
    check.add_argument("destination", metavar="HOST[:PORT]")
    check.add_argument("request", nargs="*", metavar="METHOD PATH", help="e.g. GET /v1/models")
    add_allow(check)
    check.set_defaults(func=cmd_check)

    config_cmd = sub.add_parser("config", help="the policy file: path, edit, check, show")
    actions = config_cmd.add_subparsers(dest="action", required=True)
    actions.add_parser("path", help="print its path (writing a commented example if missing)")
    actions.add_parser("edit", help="edit a copy in $EDITOR; install it only if it is valid")
    config_check = actions.add_parser("check", help="validate it: exit 0, or 2 with every error")
    config_check.add_argument("file", nargs="?", type=Path, help="another file to validate")
    show = actions.add_parser("show", help="the effective policy, each rule with its origin")
    add_allow(show)
    show.add_argument(
        "--port",
        type=port,
        default=defaults.DEFAULT_PORT,
        help="the running proxy whose --allow rules to include (%(default)s)",
    )
    config_cmd.set_defaults(func=cmd_config)

    plist = sub.add_parser("plist", help="render the launchd agent's plist from its template")
    plist.add_argument(
        "--template", type=Path, help="another template (default: the one in the package)"
    )
    plist.add_argument(
        "--executable",
        type=Path,
        help="the claude-proxy launchd starts (default: this environment's installed command)",
    )
    plist.add_argument("--port", type=fixed_port, default=defaults.DEFAULT_PORT)
    plist.add_argument("--socks-port", type=fixed_port, default=defaults.DEFAULT_SOCKS_PORT)
    plist.add_argument(
        "--config-dir", type=Path, help="the CA's folder the agent uses (default: this one's)"
    )
    plist.add_argument("--output", type=Path, help="write here, mode 0644 (default: stdout)")
    plist.set_defaults(func=cmd_plist)

    status = sub.add_parser(
        "status", help="would Claude Code work through the agent? (exit 0 only then)"
    )
    status.add_argument("--host", default=defaults.DEFAULT_HOST)
    status.add_argument("--port", type=fixed_port, help="(default: the installed agent's)")
    status.add_argument("--socks-port", type=fixed_port, help="(default: the installed agent's)")
    status.add_argument(
        "--project",
        type=Path,
        metavar="DIR",
        help="judge the Claude Code settings that apply in DIR (default: this folder)",
    )
    status.set_defaults(func=cmd_status)

    paths_cmd = sub.add_parser(
        "paths", help="print the agent's names, paths and ports as shell assignments"
    )
    paths_cmd.add_argument(
        "--installed",
        action="store_true",
        help="the ports and config folder of the installed agent's plist, where it has one",
    )
    paths_cmd.set_defaults(func=cmd_paths)

    log = sub.add_parser("log", help="what the proxy decided, from its audit database")
    log.add_argument(
        "-n", "--limit", type=count, default=50, help="the newest N (%(default)s; 0: all)"
    )
    log.add_argument("--blocked", action="store_true", help="refusals only")
    log.add_argument("--since", type=since, metavar="WHEN", help="30m, 1h, 2d, 1w or ISO time")
    log.add_argument("--host", metavar="GLOB", help="hosts matching GLOB, as in '*.github.com'")
    log.add_argument("--json", action="store_true", help="JSON lines, one per decision")
    show = log.add_mutually_exclusive_group()
    show.add_argument("-f", "--follow", action="store_true", help="show new ones until Ctrl-C")
    show.add_argument(
        "--summary", action="store_true", help="refused destinations, with counts and last seen"
    )
    show.add_argument(
        "--suggest", action="store_true", help="[[allow]] rules for what was refused (TOML)"
    )
    log.set_defaults(func=cmd_log)

    setup = sub.add_parser(
        "setup", help="fence Claude Code's sandbox (or srt) onto claude-proxy; or take it back"
    )
    targets = setup.add_subparsers(dest="target", required=True)
    for name, settings_file in (
        ("claude-code", "~/.claude/settings.json (DIR/.claude/settings.json; the managed file)"),
        ("srt", "~/.srt-settings.json"),
    ):
        target = targets.add_parser(
            name, help=f"lock the sandbox onto claude-proxy's ports in {settings_file}"
        )
        if name == "claude-code":
            scope = target.add_mutually_exclusive_group()
            scope.add_argument("--project", type=Path, metavar="DIR", help="DIR's settings")
            scope.add_argument(
                "--managed",
                action="store_true",
                help="the managed settings file, which outranks every other (root: use sudo)",
            )
        target.add_argument("--port", type=fixed_port, default=defaults.DEFAULT_PORT)
        target.add_argument("--socks-port", type=fixed_port, default=defaults.DEFAULT_SOCKS_PORT)
        target.add_argument("--dry-run", action="store_true", help="show the change, write nothing")
        target.add_argument(
            "-y",
            "--yes",
            action="store_true",
            help="write without asking, and remove the settings that open the fence",
        )
        target.add_argument("--undo", action="store_true", help="take back what setup changed")
        target.set_defaults(func=cmd_setup)
    undo_all = targets.add_parser(
        "undo-all", help="take back what setup changed in every file it has changed"
    )
    undo_all.add_argument("--dry-run", action="store_true", help="show the change, write nothing")
    undo_all.add_argument("-y", "--yes", action="store_true", help="write without asking")
    undo_all.set_defaults(func=cmd_setup_undo_all)

    orgs = sub.add_parser("orgs", help="organizations seen in Anthropic's answers, per credential")
    orgs.add_argument("--json", action="store_true", help="as a JSON document")
    orgs.set_defaults(func=cmd_orgs)

    pin = sub.add_parser("pin", help="let only one organization's credentials reach Anthropic")
    which = pin.add_mutually_exclusive_group(required=True)
    which.add_argument("organization", nargs="?", metavar="ORG_UUID", help="this organization")
    which.add_argument(
        "--first-seen",
        action="store_true",
        help="whichever organization the next authenticated answer names",
    )
    which.add_argument("--off", action="store_true", help="lift the pin")
    pin.set_defaults(func=cmd_pin)
    return parser.parse_args(argv)


def add_allow(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="RULE",
        help="also allow RULE: host, *.domain (subdomains only) or IP, with optional :port",
    )


def port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535; 0 picks a free one)")
    return int(text)


def fixed_port(text: str) -> int:
    """A port that others are told about (a plist, a settings file): 1-65535, never 0."""
    if port(text) == 0:
        raise argparse.ArgumentTypeError("a port others are told must stay: 1-65535, not 0")
    return int(text)


def count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0 or more)")
    return int(text)


def since(text: str) -> float:
    from claude_proxy import auditlog

    try:
        return auditlog.parse_since(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def default_shell() -> str:
    name = os.path.basename(os.environ.get("SHELL", ""))
    return name if name in SHELLS else "sh"


def cmd_run(args: argparse.Namespace) -> int:
    mitm.check_version()  # before anything imports mitmproxy or patches it
    from claude_proxy import service

    os.umask(0o077)  # every file the proxy makes (logs, rotated logs, state) is the user's alone
    confdir = args.config_dir.absolute() if args.config_dir else paths.config_dir()
    path = paths.config_file(confdir)
    loaded = config_commands.load(path)  # a bad file or rule stops us before anything
    config_commands.policy_for(path, args.allow)
    verbose = args.verbose or loaded.log_level == "debug"
    state_ready(paths.state_dir())  # before the log file: a start that cannot go on is one line
    logs.configure(paths.log_dir() / paths.LOG_FILE, verbose=verbose, quiet=args.quiet)
    ca.ensure_ca(confdir)
    if config.ensure_file(path):  # where the user will look for it; never rewritten
        logging.getLogger(__name__).debug("wrote %s, an example that keeps the defaults", path)
        loaded = config_commands.load(path)
    listen = loaded.listen
    settings = service.Settings(
        confdir=confdir,
        policy=config.build_policy(loaded, args.allow),
        config=loaded,
        flags=args.allow,
        hosts=(args.host,) if args.host else listen.hosts or (),
        port=first(args.port, listen.port, defaults.DEFAULT_PORT),
        socks_port=first(args.socks_port, listen.socks_port, defaults.DEFAULT_SOCKS_PORT),
        expose_to_network=args.expose_to_network,
        mitmproxy_options=args.mitmproxy_options,
    )
    asyncio.run(service.serve(settings))
    return ExitCode.OK


def state_ready(state: Path) -> None:
    """The fingerprint key, which the proxy cannot start without, exists or can be made."""
    from claude_proxy import accounts

    try:
        accounts.load_key(state)
    except accounts.StateError as e:
        fix = "; the state folder must be writable (or set XDG_STATE_HOME to one that is)"
        fix = fix if str(e).startswith("cannot") else ""  # a damaged key says its own fix
        raise ProxyError(f"cannot start: {e}{fix}", ExitCode.STATE) from None


def first(*values: int | None) -> int:
    return next(v for v in values if v is not None)


def cmd_ca(args: argparse.Namespace) -> int:
    confdir = paths.config_dir()
    authority = ca.ensure_ca(confdir)
    if args.bundle is not None:
        from claude_proxy import bundle

        path = Path(args.bundle) if args.bundle else ca.bundle_path(confdir)
        written = bundle.write_bundle(path, authority.cert_path, authority.colons(authority.sha256))
        print(f"bundle:       {written.path}")
        print(f"system roots: {written.roots}, from {written.source}")
        print(f"and the CA:   {authority.cert_path}")
    elif args.sha1:
        print(authority.sha1)
    else:
        print(f"certificate: {authority.cert_path}")
        print(f"private key: {authority.key_path}")
        print(f"SHA-1:       {authority.colons(authority.sha1)}")
        print(f"SHA-256:     {authority.colons(authority.sha256)}")
    return ExitCode.OK


def cmd_env(args: argparse.Namespace) -> int:
    proxy = f"http://{args.host}:{args.port}"
    cert = ca.cert_path(paths.config_dir())
    if not cert.exists():
        print(f"claude-proxy: {cert} does not exist yet; run `claude-proxy ca`", file=sys.stderr)
    variables = {"HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "NODE_EXTRA_CA_CERTS": str(cert)}
    if args.tools:
        bundle = ca.bundle_path(paths.config_dir())
        if not bundle.exists():
            print(
                f"claude-proxy: {bundle} does not exist yet; run `claude-proxy ca --bundle`",
                file=sys.stderr,
            )
        variables |= dict.fromkeys(TOOL_VARIABLES, str(bundle))
    for name, value in variables.items():
        print(export_line(args.shell, name, value))
    return ExitCode.OK


def export_line(shell: str, name: str, value: str) -> str:
    if shell == "fish":
        escaped = value.replace("\\", "\\\\").replace("'", "\\'")
        return f"set -gx {name} '{escaped}'"
    if shell == "nu":
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'$env.{name} = "{escaped}"'
    return f"export {name}='" + value.replace("'", "'\\''") + "'"


def cmd_check(args: argparse.Namespace) -> int:
    return config_commands.cmd_decide(
        paths.config_file(), args.allow, args.destination, args.request
    )


def cmd_config(args: argparse.Namespace) -> int:
    path = paths.config_file()
    if args.action == "path":
        return config_commands.cmd_path(path)
    if args.action == "edit":
        return config_commands.cmd_edit(path)
    if args.action == "check":
        return config_commands.cmd_check(args.file or path)
    return config_commands.cmd_show(path, args.allow, args.port)


def cmd_plist(args: argparse.Namespace) -> int:
    from claude_proxy import agent

    try:
        template = (args.template or paths.PLIST_TEMPLATE).read_bytes()
    except OSError as e:
        raise ProxyError(f"cannot read the plist template: {e}", ExitCode.USAGE) from e
    executable = args.executable.absolute() if args.executable else agent.console_script()
    if executable.name.endswith(".py") or not os.access(executable, os.X_OK):
        raise ProxyError(
            f"{executable} is not an installed claude-proxy command: launchd could not start it",
            ExitCode.USAGE,
        )
    rendered = agent.render_plist(
        template,
        executable=executable,
        home=Path.home(),
        log_dir=paths.log_dir(),
        config_dir=(args.config_dir or paths.config_dir()).absolute(),
        port=args.port,
        socks_port=args.socks_port,
    )
    if args.output is None:
        sys.stdout.buffer.write(rendered)
        return ExitCode.OK
    partial = args.output.with_name(args.output.name + ".partial")
    try:
        partial.write_bytes(rendered)
        partial.chmod(0o644)
        partial.replace(args.output)
    except OSError as e:
        raise ProxyError(f"cannot write {args.output}: {e.strerror}") from e
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    from claude_proxy import agent

    checks = agent.status(
        home=Path.home(),
        host=args.host,
        port=args.port,
        socks_port=args.socks_port,
        project=args.project or Path.cwd(),
    )
    for check in checks:
        print(f"{'ok' if check.ok else 'FAIL':<5}{check.what}: {check.detail}")
        if not check.ok and check.fix:
            print(f"     fix: {check.fix}")
    return ExitCode.OK if all(c.ok for c in checks) else ExitCode.FAILURE


def cmd_paths(args: argparse.Namespace) -> int:
    """What the install scripts need, computed here only: `eval "$(claude-proxy paths)"`."""
    from claude_proxy import agent

    home = Path.home()
    confdir, port_number, socks_port = (
        paths.config_dir(),
        defaults.DEFAULT_PORT,
        defaults.DEFAULT_SOCKS_PORT,
    )
    if args.installed:
        try:
            installed = agent.installed_plist(home)
        except (OSError, ValueError):
            pass  # no usable plist: this environment's values
        else:
            confdir = installed.config_dir or confdir
            port_number = installed.port or port_number
            socks_port = installed.socks_port or socks_port
    values = {
        "LABEL": paths.LABEL,
        "PLIST": paths.plist_path(home),
        "CONFIG_DIR": confdir,
        "CONFIG_FILE": paths.config_file(confdir),
        "CA_CERT": ca.cert_path(confdir),
        "CA_KEY": ca.key_path(confdir),
        "LOG_DIR": paths.log_dir(),
        "LOG_FILE": paths.log_dir() / paths.LOG_FILE,
        "KEYCHAIN": paths.login_keychain(home),
        "PORT": port_number,
        "SOCKS_PORT": socks_port,
    }
    for name, value in values.items():
        print(f"{name}={shlex.quote(str(value))}")
    return ExitCode.OK


def cmd_log(args: argparse.Namespace) -> int:
    from claude_proxy import auditlog

    if args.json and args.suggest:
        raise ProxyError("--suggest prints TOML: leave out --json", ExitCode.USAGE)
    modes = {"follow": args.follow, "summary": args.summary, "suggest": args.suggest}
    request = auditlog.Request(
        selection=auditlog.Selection(blocked=args.blocked, since=args.since, host=args.host),
        limit=args.limit,
        json=args.json,
        mode=next((mode for mode, chosen in modes.items() if chosen), "table"),
    )
    return auditlog.show(paths.audit_db(), request)


def cmd_setup(args: argparse.Namespace) -> int:
    from claude_proxy import setup

    home = setup.user_home() if getattr(args, "managed", False) else Path.home()
    if args.target == "claude-code":
        target = setup.claude_code(
            home=home,
            project=args.project,
            http_port=args.port,
            socks_port=args.socks_port,
            managed=args.managed,
        )
    else:
        target = setup.srt(home=home, http_port=args.port, socks_port=args.socks_port)
    run = setup.undo if args.undo else setup.apply
    return run(target, dry_run=args.dry_run, yes=args.yes)


def cmd_setup_undo_all(args: argparse.Namespace) -> int:
    from claude_proxy import setup

    return setup.undo_all(dry_run=args.dry_run, yes=args.yes)


def cmd_orgs(args: argparse.Namespace) -> int:
    state = paths.state_dir()
    try:
        pin, ledger = accounts.load_pin(state), accounts.load_ledger(state)
    except accounts.StateError as e:
        raise ProxyError(str(e)) from None
    rows = sorted(ledger.entries.items(), key=lambda kv: (kv[1].organization, kv[1].last_seen))
    if args.json:
        document = {
            "pin": pin.to_json() if pin else None,
            "credentials": [
                {
                    "fingerprint": fp,
                    **vars(seen),
                    "pinned": pin is not None and seen.organization == pin.organization,
                }
                for fp, seen in rows
            ],
        }
        print(json.dumps(document, indent=2))
        return ExitCode.OK
    print(f"pin: {pin.describe() if pin else 'off'}")
    if not rows:
        print("no organization seen yet: Anthropic's answers through the proxy name them")
        return ExitCode.OK
    print(f"{'ORGANIZATION':<38}{'FINGERPRINT':<14}{'FIRST SEEN':<22}{'LAST SEEN':<22}COUNT")
    for fp, seen in rows:
        mark = "  pinned" if pin is not None and seen.organization == pin.organization else ""
        print(
            f"{seen.organization:<38}{accounts.short(fp):<14}{seen.first_seen:<22}"
            f"{seen.last_seen:<22}{seen.count}{mark}"
        )
    return ExitCode.OK


def cmd_pin(args: argparse.Namespace) -> int:
    state = paths.state_dir()
    if args.off:
        pin, done = None, "pin lifted: credentials of every organization reach Anthropic"
    elif args.first_seen:
        pin = accounts.Pin(None, accounts.timestamp(), first_seen=True)
        done = "the organization the next authenticated answer names will be pinned"
    else:
        org = accounts.organization(args.organization)
        if org is None:
            raise ProxyError(
                f"{args.organization!r} is not an organization id (a UUID); "
                "`claude-proxy orgs` lists the organizations seen",
                ExitCode.USAGE,
            )
        pin = accounts.Pin(org, accounts.timestamp())
        done = f"pinned organization {org}: only its credentials reach Anthropic"
        try:
            seen = {s.organization for s in accounts.load_ledger(state).entries.values()}
        except accounts.StateError:
            seen = set()
        if org not in seen:
            print(
                f"claude-proxy: no credential of organization {org} has been seen yet; "
                "check the id with `claude-proxy orgs`",
                file=sys.stderr,
            )
    try:
        accounts.save_pin(state, pin)
    except accounts.StateError as e:
        raise ProxyError(str(e)) from None
    print(f"{done} (a running claude-proxy applies it within a second)")
    return ExitCode.OK
