"""Command line: parse, dispatch, and turn a ProxyError into one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# service imports mitmproxy (~0.75 s): only `run` (and making a new CA) loads it.
# Nor do the others import anything a command does not need: `env` runs in every new shell.
from claude_proxy import defaults
from claude_proxy.errors import ExitCode, ProxyError
from claude_proxy.state import paths

if TYPE_CHECKING:  # typing costs every command a few milliseconds to import
    from typing import Any, NoReturn

COMMANDS = (
    "run", "ca", "env", "check", "config", "plist", "status", "paths", "setup", "orgs", "pin",
    "log", "completion",
)  # fmt: skip
SHELLS = ("sh", "bash", "zsh", "fish", "nu")
POSIX_SHELLS = ("dash", "ash", "ksh", "mksh", "oksh", "yash", "busybox")  # they take sh's lines
TOOL_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO")
BROKEN_PIPE = 141  # 128 + SIGPIPE: what a Unix tool whose reader went away exits with
PORT_HELP = (
    "(default: the running proxy's, else the installed agent's, else [listen] in config.toml, "
    "else {default})"
)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        return int(args.func(args))
    except ProxyError as e:
        print(f"claude-proxy: {e}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.OK)
    except BrokenPipeError:
        return closed_pipe()
    except OSError as e:  # a file or folder no check foresaw: one line, never a traceback
        where = f" {e.filename}" if e.filename else ""
        print(
            f"claude-proxy: cannot go on:{where}: {e.strerror or e}; check that it can be read "
            "and written (permissions, a read-only or full disk)",
            file=sys.stderr,
        )
        return int(ExitCode.STATE)


def closed_pipe() -> int:
    """The reader went away (`claude-proxy log --json | head -1`): stop quietly. What is still
    buffered for stdout goes nowhere, so that the exit flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # not a real file (a test's capture): nothing to flush at exit
    return BROKEN_PIPE


class Formatter(argparse.HelpFormatter):
    """Descriptions are wrapped; text with line breaks of its own (the examples) is kept."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class Parser(argparse.ArgumentParser):
    """Usage errors are one line, exit 2, naming the help to read; misspellings get a guess."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        found = re.search(r"invalid choice: '?([^' ]+)'? \(choose from (.*)\)", message)
        if found:
            choices = [c.strip(" '") for c in found[2].split(",")]
            message = f"{found[1]!r} is not one of {', '.join(choices)}"
            if guess := did_you_mean(found[1], choices):
                message += f"; did you mean {guess!r}?"
        print(f"{self.prog}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(ExitCode.USAGE)


def did_you_mean(word: str, choices: Sequence[str]) -> str | None:
    import difflib

    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None


class Version(argparse.Action):
    """`--version`, read from the installed package only when asked (importlib.metadata is slow)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from importlib.metadata import version

        print(f"claude-proxy {version('claude-proxy')}")
        parser.exit()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "run")  # `claude-proxy` alone (or with run's options) runs the proxy
    elif argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        guess = did_you_mean(argv[0], COMMANDS)
        hint = f"; did you mean `claude-proxy {guess}`?" if guess else ""
        raise ProxyError(
            f"{argv[0]!r} is not a command{hint} (`claude-proxy --help` lists them)",
            ExitCode.USAGE,
        )
    return build_parser(only=argv[0] if argv[0] in COMMANDS else "").parse_args(argv)


class Unbuilt:
    """Stands for the parser of a command that is not run: its arguments are not built (building
    them all costs every command several milliseconds; `env` runs in every new shell)."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self


def command(
    sub: argparse._SubParsersAction[Parser], only: str | None, name: str, summary: str,
    description: str, *examples: str, func: Callable[[argparse.Namespace], int],
) -> Parser:  # fmt: skip
    """A subcommand run by `func`, with its one-line summary, a description, and examples under
    its help.

    With `only` set, the other commands get their summary alone (for `--help`)."""
    if only is not None and name != only:
        if not only:  # `claude-proxy --help` lists every command
            sub.add_parser(name, help=summary)
        unbuilt: Any = Unbuilt()
        return unbuilt  # type: ignore[no-any-return]
    shown = "\n".join(f"  {e}" for e in examples)
    label = "example" if len(examples) == 1 else "examples"
    parser: Parser = sub.add_parser(
        name, help=summary, description=description, epilog=f"{label}:\n{shown}"
    )
    parser.set_defaults(func=func)
    return parser


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of subcommand `name` (for tests and completion)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise KeyError(name)


def build_parser(only: str | None = None) -> Parser:
    """The whole parser; with `only`, just that command's arguments (the others unbuilt)."""
    parser = Parser(
        prog="claude-proxy",
        description="A filtering HTTPS proxy that lets Claude Code reach only Anthropic's hosts. "
        "With no command, or with run's options, it runs the proxy.",
        epilog="exit codes:\n  0 ok, 1 failure (the message names the fix), 2 bad usage, rule or "
        "option,\n  3 cannot listen (port in use), 4 CA unusable, 5 a folder cannot be written,\n"
        "  6 not the tested mitmproxy,\n"
        "  141 the output pipe closed\n"
        "example:\n  claude-proxy status",
    )
    parser.add_argument("--version", action=Version)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser,
        help="one of the commands below; `claude-proxy COMMAND --help` describes it",
    )  # fmt: skip

    run = command(
        sub, only, "run", "run the proxy (the default)",
        "Run the proxy in the foreground until SIGTERM or Ctrl-C; SIGHUP reads config.toml "
        "again. It listens on 127.0.0.1 and ::1, HTTP and SOCKS5.",
        "claude-proxy run --port 19051 --socks-port 19052",
        func=cmd_run,
    )  # fmt: skip
    run.add_argument(
        "--host",
        help="listen address (default: [listen] hosts in config.toml, else 127.0.0.1 and ::1)",
    )
    run.add_argument(
        "--port", type=port, help=f"HTTP port; 0 picks a free one (default: config.toml's, "
        f"else {defaults.DEFAULT_PORT})",
    )  # fmt: skip
    run.add_argument(
        "--socks-port",
        type=port,
        help=f"SOCKS5 port, same addresses; 0 picks a free one (default: config.toml's, else "
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
        help="the folder of the CA, which must exist (default: $XDG_CONFIG_HOME/claude-proxy, "
        "else ~/.config/claude-proxy, made on first run); the agent's plist names it",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log more")
    run.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="only errors on stderr, rate-limited (the log file has everything): for the agent",
    )

    ca_cmd = command(
        sub, only, "ca", "make the CA if missing; print its path and fingerprints",
        "Make the proxy's certificate authority if there is none, then print where it is and "
        "its fingerprints. A damaged CA is never replaced: the message says what to do.",
        "claude-proxy ca --bundle",
        func=cmd_ca,
    )  # fmt: skip
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

    env = command(
        sub, only, "env", "print the environment Claude Code needs to use the proxy",
        "Print shell lines that point HTTPS_PROXY and HTTP_PROXY at the proxy, trust its CA "
        "(NODE_EXTRA_CA_CERTS) and clear NO_PROXY, so that nothing inherited bypasses it. "
        "The port is --port, else the running proxy's, else the installed agent's, else "
        "[listen] in config.toml, else the default.",
        'eval "$(claude-proxy env)"    # fish: claude-proxy env --shell fish | source',
        func=cmd_env,
    )  # fmt: skip
    env.add_argument(
        "--shell", choices=SHELLS, help="the shell to write for (default: the one $SHELL names)"
    )
    env.add_argument(
        "--host", type=client_host,
        help=f"the proxy's address as clients reach it: an IP or name ({defaults.DEFAULT_HOST})",
    )  # fmt: skip
    add_port(env, "--port", "the proxy's HTTP port, 1-65535")
    add_port(env, "--socks-port", "the proxy's SOCKS5 port, 1-65535, which must differ from the "
             "HTTP port")  # fmt: skip
    env.add_argument(
        "--tools",
        action="store_true",
        help="also point SSL_CERT_FILE, REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE and GIT_SSL_CAINFO "
        "at the CA bundle (written if missing)",
    )
    env.add_argument(
        "--no-proxy",
        default="",
        metavar="LIST",
        help="set NO_PROXY to LIST (e.g. localhost,127.0.0.1,::1): those hosts are reached "
        "without the proxy (default: empty, everything goes through it)",
    )

    check = command(
        sub, only, "check", "say whether a host, request or URL would be allowed, and why",
        "Decide as the running proxy would, from config.toml and the defaults: a destination "
        "(HOST[:PORT]), a request to it (HOST[:PORT] METHOD PATH), or a URL ([METHOD] URL; "
        "GET unless named). Exit 0 when allowed, 1 when refused.",
        "claude-proxy check https://api.anthropic.com/v1/messages",
        "claude-proxy check api.anthropic.com POST /v1/files",
        func=cmd_check,
    )  # fmt: skip
    check.add_argument(
        "words", nargs="*", metavar="HOST[:PORT] [METHOD PATH] | [METHOD] URL",
        help="what to check",
    )  # fmt: skip
    add_allow(check)
    check.add_argument("--json", action="store_true", help="the decision as a JSON document")

    config_cmd = command(
        sub, only, "config", "the policy file: path, edit, check, show",
        "The policy file, config.toml beside the CA: print its path, edit it safely, check it, "
        "or show the rules in force with their origins.",
        "claude-proxy config show",
        func=cmd_config,
    )  # fmt: skip
    actions = config_cmd.add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser,
        help="path, edit, check or show",
    )  # fmt: skip
    actions.add_parser(
        "path", help="print its path (writing a commented example if missing)",
        description="Print the path of config.toml, writing a commented example if missing.",
    )  # fmt: skip
    actions.add_parser(
        "edit", help="edit a copy in $VISUAL or $EDITOR; install it only if it is valid",
        description="Edit a copy in $VISUAL or $EDITOR (else vi); the copy replaces the file "
        "only when it is valid, and a running proxy applies it at once.",
    )  # fmt: skip
    config_check = actions.add_parser(
        "check", help="validate it: exit 0, or 2 with every error",
        description="Validate config.toml (or FILE): exit 0, or 2 with every error.",
    )  # fmt: skip
    config_check.add_argument("file", nargs="?", type=Path, help="another file to validate")
    show = actions.add_parser(
        "show", help="the effective policy, each rule with its origin",
        description="The effective policy, each rule with its origin, and whether the running "
        "proxy has this file in force.",
    )  # fmt: skip
    add_allow(show)
    add_port(show, "--port", "the running proxy whose --allow rules to include")
    show.add_argument("--json", action="store_true", help="the policy as a JSON document")

    plist = command(
        sub, only, "plist", "render the launchd agent's plist from its template",
        "Render the launchd agent's plist (absolute paths, ports, config folder) from the "
        "template in the package; scripts/install-agent.sh uses it.",
        "claude-proxy plist --output ~/Library/LaunchAgents/local.claude-proxy.plist",
        func=cmd_plist,
    )  # fmt: skip
    plist.add_argument(
        "--template", type=Path, help="another template (default: the one in the package)"
    )
    plist.add_argument(
        "--executable",
        type=Path,
        help="the claude-proxy launchd starts (default: this environment's installed command)",
    )
    plist.add_argument(
        "--port", type=fixed_port, default=defaults.DEFAULT_PORT,
        help="the agent's HTTP port, 1-65535 (%(default)s)",
    )  # fmt: skip
    plist.add_argument(
        "--socks-port", type=fixed_port, default=defaults.DEFAULT_SOCKS_PORT,
        help="the agent's SOCKS5 port, 1-65535 (%(default)s)",
    )  # fmt: skip
    plist.add_argument(
        "--config-dir", type=Path, help="the CA's folder the agent uses (default: this one's)"
    )
    plist.add_argument("--output", type=Path, help="write here, mode 0644 (default: stdout)")

    status = command(
        sub, only, "status", "would Claude Code work through the proxy? (exit 0 only then)",
        "Check, row by row, what Claude Code needs: the agent (macOS), the CA, both listeners "
        "(a real TLS handshake through each), the keychain (macOS), the policy, the logs and "
        "the Claude Code settings that apply here. Exit 0 only when every row is ok.",
        "claude-proxy status --project ~/src/myproject",
        func=cmd_status,
    )  # fmt: skip
    status.add_argument(
        "--host", type=client_host, default=defaults.DEFAULT_HOST,
        help="the proxy's address (%(default)s)",
    )  # fmt: skip
    add_port(status, "--port", "HTTP port")
    add_port(status, "--socks-port", "SOCKS5 port")
    status.add_argument(
        "--project",
        type=Path,
        metavar="DIR",
        help="judge the Claude Code settings that apply in DIR (default: this folder)",
    )
    status.add_argument("--json", action="store_true", help="the rows as a JSON document")

    paths_cmd = command(
        sub, only, "paths", "print the agent's names, paths and ports as shell assignments",
        "Print the agent's label, paths and ports as shell assignments: the install scripts "
        "take them from here rather than computing them again.",
        'eval "$(claude-proxy paths)"; echo "$CA_CERT"',
        func=cmd_paths,
    )  # fmt: skip
    paths_cmd.add_argument(
        "--installed",
        action="store_true",
        help="the ports and config folder of the installed agent's plist, where it has one",
    )

    log = command(
        sub, only, "log", "what the proxy decided, from its audit database",
        "What the proxy decided, from its audit database: a table, JSON lines, a summary of "
        "refusals, or [[allow]] rules that would allow what was refused.",
        "claude-proxy log --blocked --since 1h",
        func=cmd_log,
    )  # fmt: skip
    log.add_argument(
        "-n", "--limit", type=count, default=50, help="the newest N (%(default)s; 0: all)"
    )
    log.add_argument("--blocked", action="store_true", help="refusals only")
    log.add_argument("--since", type=since, metavar="WHEN", help="30m, 1h, 2d, 1w or ISO time")
    log.add_argument("--host", metavar="GLOB", help="hosts matching GLOB, as in '*.github.com'")
    log.add_argument("--json", action="store_true", help="JSON lines, one per decision")
    shown = log.add_mutually_exclusive_group()
    shown.add_argument("-f", "--follow", action="store_true", help="show new ones until Ctrl-C")
    shown.add_argument(
        "--summary", action="store_true", help="refused destinations, with counts and last seen"
    )
    shown.add_argument(
        "--suggest", action="store_true", help="[[allow]] rules for what was refused (TOML)"
    )

    setup = command(
        sub, only, "setup",
        "fence Claude Code's sandbox (or srt) onto claude-proxy; or take it back",
        "Write the settings that lock Claude Code's sandbox (or srt's) onto claude-proxy's "
        "ports, showing the change first; --undo takes back exactly what setup changed.",
        "claude-proxy setup claude-code --dry-run",
        func=cmd_setup,
    )  # fmt: skip
    targets = setup.add_subparsers(
        dest="target", required=True, metavar="TARGET", parser_class=Parser,
        help="claude-code, srt or undo-all",
    )  # fmt: skip
    for name, settings_file in (
        ("claude-code", "~/.claude/settings.json (DIR/.claude/settings.json; the managed file)"),
        ("srt", "~/.srt-settings.json"),
    ):
        target = targets.add_parser(
            name,
            help=f"lock the sandbox onto claude-proxy's ports in {settings_file}",
            description=f"Lock the sandbox onto claude-proxy's ports in {settings_file}.",
            epilog=f"example:\n  claude-proxy setup {name} --dry-run",
        )
        if name == "claude-code":
            scope = target.add_mutually_exclusive_group()
            scope.add_argument("--project", type=Path, metavar="DIR", help="DIR's settings")
            scope.add_argument(
                "--managed",
                action="store_true",
                help="the managed settings file, which outranks every other (root: use sudo)",
            )
        add_port(target, "--port", "the proxy's HTTP port, 1-65535")
        add_port(target, "--socks-port", "the proxy's SOCKS5 port, 1-65535")
        add_writing(target, "write without asking, and remove the settings that open the fence")
        target.add_argument("--undo", action="store_true", help="take back what setup changed")
    undo_all = targets.add_parser(
        "undo-all", help="take back what setup changed in every file it has changed",
        description="Take back what setup changed in every file it has changed.",
    )  # fmt: skip
    add_writing(undo_all, "write without asking")

    orgs = command(
        sub, only, "orgs", "organizations seen in Anthropic's answers, per credential",
        "The Anthropic organizations seen in answers through the proxy, per credential "
        "(a fingerprint, never the key), and the pin.",
        "claude-proxy orgs --json",
        func=cmd_orgs,
    )  # fmt: skip
    orgs.add_argument("--json", action="store_true", help="as a JSON document")

    pin = command(
        sub, only, "pin", "let only one organization's credentials reach Anthropic",
        "Let only one organization's credentials reach Anthropic: a request with any other "
        "credential is refused before its body moves. A running proxy applies it at once.",
        "claude-proxy pin --first-seen",
        func=cmd_pin,
    )  # fmt: skip
    which = pin.add_mutually_exclusive_group(required=True)
    which.add_argument("organization", nargs="?", metavar="ORG_UUID", help="this organization")
    which.add_argument(
        "--first-seen",
        action="store_true",
        help="whichever organization the next authenticated answer names",
    )
    which.add_argument("--off", action="store_true", help="lift the pin")

    completion = command(
        sub, only, "completion", "print a shell completion script (bash, zsh or fish)",
        "Print a completion script for bash, zsh or fish, generated from these commands.",
        'eval "$(claude-proxy completion bash)"    # in ~/.bashrc; zsh alike in ~/.zshrc',
        "claude-proxy completion fish > ~/.config/fish/completions/claude-proxy.fish",
        func=cmd_completion,
    )  # fmt: skip
    completion.add_argument("shell", metavar="SHELL", help="bash, zsh or fish")
    return parser


def add_port(parser: argparse.ArgumentParser, flag: str, what: str) -> None:
    """--port or --socks-port of a command that finds the proxy as every command does (ports)."""
    default = defaults.DEFAULT_PORT if flag == "--port" else defaults.DEFAULT_SOCKS_PORT
    parser.add_argument(flag, type=fixed_port, help=f"{what} {PORT_HELP.format(default=default)}")


def add_writing(parser: argparse.ArgumentParser, yes: str) -> None:
    """--dry-run and --yes of a command that writes a file the user keeps."""
    parser.add_argument("--dry-run", action="store_true", help="show the change, write nothing")
    parser.add_argument("-y", "--yes", action="store_true", help=yes)


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
    if text == "0" or (text.isdigit() and int(text) == 0):
        raise argparse.ArgumentTypeError(
            "a port clients are told must stay the same: give one of 1-65535, not 0"
        )
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give one of 1-65535")
    return int(text)


HOST_NAME = re.compile(
    r"(?i)^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?$"
)


def client_host(text: str) -> str:
    """The proxy's address as a client writes it: an IP literal (v6 with or without brackets)
    or a host name; the brackets are added where a URL needs them."""
    import ipaddress

    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        ipaddress.ip_address(bare.split("%", 1)[0])
        return bare
    except ValueError:
        pass
    if bare != text or not HOST_NAME.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an address: give an IP (127.0.0.1, ::1) or a host name"
        )
    return text


def url_host(host: str) -> str:
    if ":" in host:  # IPv6; a zone id's % is written %25 in a URL (RFC 6874)
        return "[" + host.replace("%", "%25") + "]"
    return host


def count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0 or more)")
    return int(text)


def since(text: str) -> float:
    from claude_proxy.cli import log_cmd

    try:
        return log_cmd.parse_since(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def default_shell() -> str:
    """The shell $SHELL names; sh when it names none. One env cannot write for is an error."""
    shell = os.environ.get("SHELL", "")
    name = os.path.basename(shell)
    if not name or name in POSIX_SHELLS:
        return "sh"
    if name not in SHELLS:
        raise ProxyError(
            f"$SHELL is {shell}, and env cannot write for {name}: pass --shell with one of "
            f"{', '.join(SHELLS)}",
            ExitCode.USAGE,
        )
    return name


def cmd_run(args: argparse.Namespace) -> int:
    # The flags and config.toml first: a mistake is answered before mitmproxy's imports.
    from claude_proxy.cli import config_cmd
    from claude_proxy.policy import config_file

    os.umask(0o077)  # every file the proxy makes (logs, rotated logs, state) is the user's alone
    confdir = config_dir_flag(args.config_dir)
    path = paths.config_file(confdir)
    loaded = config_cmd.load(path)  # a bad file or rule stops us before anything
    config_cmd.policy_for(path, args.allow)
    listen = loaded.listen
    hosts = (args.host,) if args.host else listen.hosts or ()
    if not args.expose_to_network:
        from claude_proxy.policy.addresses import is_loopback

        for host in hosts:
            if not is_loopback(host):
                raise ProxyError(
                    f"listening on {host} would let other machines use the proxy: use "
                    "127.0.0.1 or ::1 (the default is both), or pass --expose-to-network if "
                    "that is really meant",
                    ExitCode.USAGE,
                )
    http_port = first(args.port, listen.port, defaults.DEFAULT_PORT)
    socks_port = first(args.socks_port, listen.socks_port, defaults.DEFAULT_SOCKS_PORT)
    if http_port == socks_port and http_port != 0:
        raise ProxyError(
            f"the HTTP and the SOCKS port are both {http_port}: they must differ; pass "
            "--port or --socks-port, or change [listen] in config.toml",
            ExitCode.USAGE,
        )
    from claude_proxy import mitm

    mitm.check_version()  # before anything imports mitmproxy or patches it
    from claude_proxy.mitm import lean

    lean.install()  # before anything imports mitmproxy.addons
    import asyncio
    import logging

    from claude_proxy.proxy import service
    from claude_proxy.state import ca, logs

    verbose = args.verbose or loaded.log_level == "debug"
    state_ready(paths.state_dir())  # before the log file: a start that cannot go on is one line
    logs.configure(paths.log_dir() / paths.LOG_FILE, verbose=verbose, quiet=args.quiet)
    ca.ensure_ca(confdir)
    if config_file.ensure_file(path):  # where the user will look for it; never rewritten
        logging.getLogger(__name__).debug("wrote %s, an example that keeps the defaults", path)
        loaded = config_cmd.load(path)
    settings = service.Settings(
        confdir=confdir,
        policy=config_file.build_policy(loaded, args.allow),
        config=loaded,
        flags=args.allow,
        hosts=hosts,
        port=http_port,
        socks_port=socks_port,
        expose_to_network=args.expose_to_network,
        mitmproxy_options=args.mitmproxy_options,
    )
    asyncio.run(service.serve(settings))
    return ExitCode.OK


def config_dir_flag(folder: Path | None) -> Path:
    """The CA's folder `--config-dir` names (`run`'s, and the agent's in `plist`), absolute; else
    the usual one. A folder that is not there is refused: a new one would mean a new CA that
    nothing trusts, so only the usual folder is made."""
    if folder is None:
        return paths.config_dir()
    if not folder.is_dir() and folder.absolute() != paths.config_dir():
        make = f"mkdir -m 700 {shlex.quote(str(folder))}"
        raise ProxyError(
            f"--config-dir {folder} is not a folder: name the folder of your CA "
            f"(`claude-proxy paths` shows it), or make it ({make}) to start a new CA there",
            ExitCode.USAGE,
        )
    return folder.absolute()


def state_ready(state: Path) -> None:
    """The fingerprint key, which the proxy cannot start without, exists or can be made."""
    from claude_proxy.state import accounts

    try:
        accounts.load_key(state)
    except accounts.StateError as e:
        fix = "; the state folder must be writable (or set XDG_STATE_HOME to one that is)"
        fix = fix if str(e).startswith("cannot") else ""  # a damaged key says its own fix
        raise ProxyError(f"cannot start: {e}{fix}", ExitCode.STATE) from None


def first(*values: int | None) -> int:
    return next(v for v in values if v is not None)


def cmd_ca(args: argparse.Namespace) -> int:
    from claude_proxy.state import ca

    confdir = paths.config_dir()
    authority = ca.ensure_ca(confdir)
    if args.bundle is not None:
        from claude_proxy.state import bundle

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
    from claude_proxy.cli import ports
    from claude_proxy.state import ca

    shell = args.shell or default_shell()
    found = ports.resolve(args.port, args.socks_port)
    if note := ports.pending(found):
        print(f"claude-proxy: {note}", file=sys.stderr)
    proxy = f"http://{url_host(args.host or defaults.DEFAULT_HOST)}:{found.port}"
    confdir = paths.config_dir()
    cert = ca.cert_path(confdir)
    if args.tools:
        bundle = ensure_bundle(confdir)  # else the tools would be told of a file not there
    if not cert.exists():
        print(f"claude-proxy: {cert} does not exist yet; run `claude-proxy ca`", file=sys.stderr)
    variables = {"HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "NODE_EXTRA_CA_CERTS": str(cert)}
    # An inherited NO_PROXY would let the hosts it names bypass the proxy: empty unless chosen.
    variables |= {"NO_PROXY": args.no_proxy, "no_proxy": args.no_proxy}
    if args.tools:
        variables |= dict.fromkeys(TOOL_VARIABLES, str(bundle))
    for name, value in variables.items():
        print(export_line(shell, name, value))
    return ExitCode.OK


def ensure_bundle(confdir: Path) -> Path:
    """The CA bundle `ca --bundle` writes, written now if it is missing (the CA must exist)."""
    import hashlib

    from claude_proxy.state import bundle, ca

    path, cert = ca.bundle_path(confdir), ca.cert_path(confdir)
    if path.exists():
        return path
    if not cert.exists():
        raise ProxyError(
            f"there is no CA in {confdir} yet, so no bundle for --tools: run `claude-proxy ca` "
            "(or start the proxy), then this again",
            ExitCode.CA,
        )
    try:
        ours = bundle.certificates(cert.read_bytes())
    except OSError as e:
        raise ProxyError(f"cannot read {cert}: {e.strerror}", ExitCode.CA) from None
    if len(ours) != 1:
        raise ProxyError(f"{cert} should hold one certificate: run `claude-proxy ca`", ExitCode.CA)
    sha256 = hashlib.sha256(ours[0]).hexdigest().upper()
    colons = ":".join(sha256[i : i + 2] for i in range(0, len(sha256), 2))
    written = bundle.write_bundle(path, cert, colons)
    print(f"claude-proxy: wrote the CA bundle {written.path}", file=sys.stderr)
    return written.path


def export_line(shell: str, name: str, value: str) -> str:
    if shell == "fish":
        escaped = value.replace("\\", "\\\\").replace("'", "\\'")
        return f"set -gx {name} '{escaped}'"
    if shell == "nu":
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'$env.{name} = "{escaped}"'
    return f"export {name}='" + value.replace("'", "'\\''") + "'"


def cmd_check(args: argparse.Namespace) -> int:
    from claude_proxy.cli import config_cmd

    return config_cmd.cmd_decide(paths.config_file(), args.allow, args.words, args.json)


def cmd_completion(args: argparse.Namespace) -> int:
    from claude_proxy.cli import completion

    if args.shell not in completion.SHELLS:
        raise ProxyError(
            f"{args.shell!r} is not a shell completion is written for: give one of "
            f"{', '.join(completion.SHELLS)}",
            ExitCode.USAGE,
        )
    print(completion.script(build_parser(), args.shell), end="")  # nothing, if stdout is closed
    return ExitCode.OK


def cmd_config(args: argparse.Namespace) -> int:
    from claude_proxy.cli import config_cmd

    path = paths.config_file()
    if args.action == "path":
        return config_cmd.cmd_path(path)
    if args.action == "edit":
        return config_cmd.cmd_edit(path)
    if args.action == "check":
        if args.file is not None and not args.file.exists():
            raise ProxyError(
                f"{args.file} does not exist: name an existing file, or leave FILE out to "
                f"check {path}",
                ExitCode.USAGE,
            )
        return config_cmd.cmd_check(args.file or path)
    return config_cmd.cmd_show(path, args.allow, args.port, as_json=args.json)


def cmd_plist(args: argparse.Namespace) -> int:
    from claude_proxy.macos import agent

    try:
        template = (args.template or paths.PLIST_TEMPLATE).read_bytes()
    except OSError as e:
        raise ProxyError(f"cannot read the plist template: {e}", ExitCode.USAGE) from e
    if args.port == args.socks_port:
        raise ProxyError(
            f"the HTTP and the SOCKS port are both {args.port}: they must differ; pass --port "
            "or --socks-port",
            ExitCode.USAGE,
        )
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
        config_dir=config_dir_flag(args.config_dir).absolute(),
        port=args.port,
        socks_port=args.socks_port,
    )
    if args.output is None:
        if sys.stdout is None:
            raise ProxyError("standard output is closed: pass --output FILE", ExitCode.USAGE)
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
    import json

    from claude_proxy.cli import diagnostics, ports, status_cmd

    found = ports.resolve(args.port, args.socks_port)
    checks = status_cmd.status(
        home=Path.home(),
        host=args.host,
        port=found.port,
        socks_port=found.socks_port,
        project=args.project or Path.cwd(),
        ports_from="; ".join(filter(None, (found.describe(), ports.pending(found)))),
    )
    ok = all(c.ok for c in checks)
    if args.json:
        rows = diagnostics.status_rows(checks)
        print(json.dumps({"ok": ok, "ports": found.to_json(), "checks": rows}, indent=2))
    else:
        print("\n".join(diagnostics.status_lines(checks)))
    return ExitCode.OK if ok else ExitCode.FAILURE


def cmd_paths(args: argparse.Namespace) -> int:
    """What the install scripts need, computed here only: `eval "$(claude-proxy paths)"`. The
    ports are where every command finds the proxy (ports.resolve); with --installed, the
    installed agent's plist names them (and the config folder) first."""
    from claude_proxy.cli import ports
    from claude_proxy.macos import agent
    from claude_proxy.state import ca

    home = Path.home()
    confdir, port_number, socks_port = paths.config_dir(), None, None
    if args.installed:
        try:
            installed = agent.installed_plist(home)
        except (OSError, ValueError):
            pass  # no usable plist: this environment's values
        else:
            confdir = installed.config_dir or confdir
            port_number, socks_port = installed.port, installed.socks_port
    # Port 0 ([listen] may pick one at each start) is printed as it is: the install script is
    # told --port then, and `plist` refuses 0 with its fix.
    found = ports.resolve(port_number, socks_port, home=home, config_dir=confdir, fixed=False)
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
        "PORT": found.port,
        "SOCKS_PORT": found.socks_port,
    }
    for name, value in values.items():
        print(f"{name}={shlex.quote(str(value))}")
    return ExitCode.OK


def cmd_log(args: argparse.Namespace) -> int:
    from claude_proxy.cli import log_cmd

    if args.json and args.suggest:
        raise ProxyError("--suggest prints TOML: leave out --json", ExitCode.USAGE)
    modes = {"follow": args.follow, "summary": args.summary, "suggest": args.suggest}
    request = log_cmd.Request(
        selection=log_cmd.Selection(blocked=args.blocked, since=args.since, host=args.host),
        limit=args.limit,
        json=args.json,
        mode=next((mode for mode, chosen in modes.items() if chosen), "table"),
    )
    return log_cmd.show(paths.audit_db(), request)


def cmd_setup(args: argparse.Namespace) -> int:
    from claude_proxy.cli import ports, setup_cmd

    if args.target == "undo-all":
        return setup_cmd.undo_all(dry_run=args.dry_run, yes=args.yes)
    found = ports.resolve(args.port, args.socks_port)
    if {found.source, found.socks_source} - {ports.FLAGS, ports.DEFAULTS}:
        print(f"claude-proxy: the proxy's ports: {found.describe()}", file=sys.stderr)
    home = setup_cmd.user_home() if getattr(args, "managed", False) else Path.home()
    if args.target == "claude-code":
        plan = setup_cmd.claude_code(
            home=home,
            project=args.project,
            http_port=found.port,
            socks_port=found.socks_port,
            managed=args.managed,
        )
    else:
        plan = setup_cmd.srt(home=home, http_port=found.port, socks_port=found.socks_port)
    run = setup_cmd.undo if args.undo else setup_cmd.apply
    return run(plan, dry_run=args.dry_run, yes=args.yes)


def cmd_orgs(args: argparse.Namespace) -> int:
    import json

    from claude_proxy.state import accounts

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
    from claude_proxy.state import accounts

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
