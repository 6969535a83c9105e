"""Test-only mitmproxy script: the audit writer with a small queue, a quick retry, and a disk
that does not answer until a file exists, integrity checks that come often
(CLAUDE_PROXY_TEST_AUDIT_QUEUE, _RETRY, _GATE, _CHECK)."""

import os
import sqlite3
import time

from claude_proxy.record import audit_db

if size := os.environ.get("CLAUDE_PROXY_TEST_AUDIT_QUEUE"):
    audit_db.QUEUE_SIZE = int(size)
if retry := os.environ.get("CLAUDE_PROXY_TEST_AUDIT_RETRY"):
    audit_db.RETRY_SECONDS = float(retry)
if gate := os.environ.get("CLAUDE_PROXY_TEST_AUDIT_GATE"):
    _write_batch = audit_db.Writer.write_batch

    def _wait_for_the_disk(
        self: audit_db.Writer, conn: sqlite3.Connection, batch: list[audit_db.Record]
    ) -> None:
        while not os.path.exists(gate):
            time.sleep(0.02)
        _write_batch(self, conn, batch)

    audit_db.Writer.write_batch = _wait_for_the_disk  # type: ignore[method-assign]
if check := os.environ.get("CLAUDE_PROXY_TEST_AUDIT_CHECK"):
    audit_db.CHECK_SECONDS = audit_db.MAINTENANCE_SECONDS = float(check)
