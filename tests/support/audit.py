"""Waiting for what the proxy's audit writer and log have."""

from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from claude_proxy.cli import log_cmd
from tests.conftest import ProxyProcess

DEADLINE = 10  # seconds any awaited event may take; running out fails the test


def audit_db(proxy: ProxyProcess) -> Path:
    return proxy.home / ".local" / "state" / "claude-proxy" / "audit.db"


def decisions(proxy: ProxyProcess, where: str = "1", args: tuple[Any, ...] = ()) -> list[dict]:
    conn = log_cmd.connect(audit_db(proxy))
    if conn is None:
        return []  # not made yet
    with closing(conn):
        query = f"SELECT * FROM decisions WHERE {where} ORDER BY id"
        return [dict(row) for row in conn.execute(query, args)]


def wait_for(
    proxy: ProxyProcess, where: str, args: tuple[Any, ...] = (), count: int = 1
) -> list[dict]:
    """Barrier: the rows matching `where` (at least `count`) once the writer has them."""
    deadline = time.monotonic() + DEADLINE
    while len(found := decisions(proxy, where, args)) < count:
        if time.monotonic() > deadline:
            pytest.fail(
                f"no audit row where {where} {args}; the last rows: {decisions(proxy)[-5:]}"
            )
        time.sleep(0.02)
    return found


def wait_for_log(proxy: ProxyProcess, text: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while text not in proxy.log_text():
        if time.monotonic() > deadline:
            pytest.fail(f"the proxy never logged {text!r}")
        time.sleep(0.02)
