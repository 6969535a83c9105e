"""The `claude-proxy` command: the parser and its commands (main), the config, log, setup and
status commands, the diagnostics behind status and setup, Claude Code's settings file, the fence,
the ports and shell completion. Commands that need no proxy import neither mitmproxy nor anything
that would.
"""
