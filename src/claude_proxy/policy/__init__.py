"""What may pass: the rules that decide which hosts, ports and URL paths a client may reach, the
user's config.toml that extends them, the addresses an allowed name must not lead to, and the check
of the server-fetch tools in a Messages body. Pure decisions on plain values: nothing here imports
mitmproxy or touches the network.
"""
