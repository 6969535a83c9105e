"""Where the proxy listens by default; here so that commands can know it without mitmproxy."""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9051
