"""claude-proxy: a filtering HTTPS proxy that lets Claude Code reach only Anthropic's hosts."""
