"""`claude-proxy completion bash|zsh|fish`: completion scripts generated from the argparse parser.

Nothing here is written per command: the parser's subcommands, options, choices and path
arguments become the script, so a new option completes as soon as it exists.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from pathlib import Path

SHELLS = ("bash", "zsh", "fish")
FUNCTION = "_claude_proxy"


@dataclass
class Node:
    """One command level: `config show` is the node at path ("config", "show")."""

    path: tuple[str, ...]
    help: str = ""
    commands: dict[str, Node] = field(default_factory=dict)
    options: list[Option] = field(default_factory=list)


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    help: str
    takes_value: bool
    choices: tuple[str, ...] = ()
    is_path: bool = False


def tree(parser: argparse.ArgumentParser, path: tuple[str, ...] = (), help: str = "") -> Node:
    node = Node(path, help)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                node.commands[name] = tree(sub, (*path, name), helps.get(name, ""))
        elif action.option_strings:
            node.options.append(
                Option(
                    tuple(action.option_strings),
                    (action.help or "").replace("%(default)s", str(action.default)),
                    action.nargs != 0,
                    tuple(str(c) for c in action.choices or ()),
                    action.type is Path,
                )
            )
    return node


def walk(node: Node) -> list[Node]:
    return [node, *(n for child in node.commands.values() for n in walk(child))]


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    root = tree(parser)
    if shell == "fish":
        return fish(root, parser.prog)
    text = bash(root, parser.prog)
    if shell == "zsh":
        return "autoload -U +X bashcompinit && bashcompinit\n" + text
    return text


def bash(root: Node, prog: str) -> str:
    """One function: find the command path in the words so far, then offer what it takes."""
    cases_commands, cases_options, cases_values = [], [], []
    for node in walk(root):
        key = shlex.quote(" ".join(node.path))
        if node.commands:
            cases_commands.append(f"        {key}) echo {shlex.quote(' '.join(node.commands))} ;;")
        flags = " ".join(f for option in node.options for f in option.flags)
        cases_options.append(f"        {key}) echo {shlex.quote(flags)} ;;")
        for option in node.options:
            if not option.takes_value:
                continue
            what = "FILES" if option.is_path else " ".join(option.choices)
            for flag in option.flags:
                cases_values.append(f"        {shlex.quote(' '.join((*node.path, flag)))}) "
                                    f"echo {shlex.quote(what)} ;;")  # fmt: skip
    return f"""# bash completion for {prog} (generated: `{prog} completion bash`)
{FUNCTION}_commands() {{
    case "$1" in
{chr(10).join(cases_commands)}
    esac
}}
{FUNCTION}_options() {{
    case "$1" in
{chr(10).join(cases_options)}
    esac
}}
{FUNCTION}_values() {{
    case "$1" in
{chr(10).join(cases_values)}
        *) return 1 ;;
    esac
}}
{FUNCTION}() {{
    local cur prev path word i subs values
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    path=""
    i=1
    while [ "$i" -lt "$COMP_CWORD" ]; do
        word="${{COMP_WORDS[$i]}}"
        subs=" $({FUNCTION}_commands "$path") "
        case "$word" in
            -*) ;;
            *) case "$subs" in *" $word "*) path="${{path:+$path }}$word" ;; esac ;;
        esac
        i=$((i + 1))
    done
    COMPREPLY=()
    if [ "$COMP_CWORD" -gt 1 ]; then
        prev="${{COMP_WORDS[$((COMP_CWORD - 1))]}}"
        case "$prev" in
            -*)
                if values="$({FUNCTION}_values "${{path:+$path }}$prev")"; then
                    if [ "$values" = FILES ]; then
                        COMPREPLY=($(compgen -f -- "$cur"))
                    else
                        COMPREPLY=($(compgen -W "$values" -- "$cur"))
                    fi
                    return 0
                fi
                ;;
        esac
    fi
    case "$cur" in
        -*) COMPREPLY=($(compgen -W "$({FUNCTION}_options "$path")" -- "$cur")) ;;
        *) COMPREPLY=($(compgen -W "$({FUNCTION}_commands "$path")" -- "$cur")) ;;
    esac
    return 0
}}
complete -F {FUNCTION} {prog}
"""


def fish(root: Node, prog: str) -> str:
    lines = [f"# fish completion for {prog} (generated: `{prog} completion fish`)",
             f"complete -c {prog} -f"]  # fmt: skip
    for node in walk(root):
        condition = fish_condition(root, node)
        for name, child in node.commands.items():
            lines.append(
                f"complete -c {prog} -n {shlex.quote(condition)} -a {shlex.quote(name)} "
                f"-d {fish_quote(child.help)}"
            )
        for option in node.options:
            words = []
            for flag in option.flags:
                words += ["-l", flag[2:]] if flag.startswith("--") else ["-s", flag[1:]]
            if option.takes_value:
                words.append("-F" if option.is_path else "-x")
            if option.choices:
                words += ["-a", shlex.quote(" ".join(option.choices))]
            lines.append(
                f"complete -c {prog} -n {shlex.quote(condition)} {' '.join(words)} "
                f"-d {fish_quote(option.help)}"
            )
    return "\n".join(lines) + "\n"


def fish_condition(root: Node, node: Node) -> str:
    """True when the words so far name exactly `node`'s command path."""
    if not node.path:
        return "__fish_use_subcommand"
    parts = [f"__fish_seen_subcommand_from {word}" for word in node.path]
    if node.commands:
        parts.append(f"not __fish_seen_subcommand_from {' '.join(node.commands)}")
    return "; and ".join(parts)


def fish_quote(text: str) -> str:
    first = text.split(". ")[0].split("; ")[0]
    return "'" + first.replace("\\", "\\\\").replace("'", "\\'") + "'"
