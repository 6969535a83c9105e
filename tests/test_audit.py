"""The audit database in-process, on a real SQLite file: the writer thread, its failures,
retention and migrations; then `claude-proxy log` reading it back."""

from __future__ import annotations

import io
import json
import queue
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.exceptions import OptionsError
from mitmproxy.test import taddons

from claude_proxy.cli import log_cmd, main
from claude_proxy.policy import rules
from claude_proxy.record import audit_db, decisions
from claude_proxy.state import paths
from tests.support.waiting import wait_until

DEADLINE = 10  # seconds any awaited event may take; running out fails the test
NOW = time.time()
MINUTE, HOUR, DAY = 60, 3600, 86400

# The first schema, written out by hand as a database of that version held it.
V1_SCHEMA = """
CREATE TABLE decisions (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, client TEXT, listener TEXT, method TEXT,
    host TEXT, port INTEGER, path TEXT, decision TEXT NOT NULL, rule TEXT, reason TEXT,
    status INTEGER, bytes_up INTEGER, bytes_down INTEGER, duration_ms INTEGER
);
CREATE INDEX decisions_time ON decisions (time);
PRAGMA user_version = 1;
"""


def record(**fields: Any) -> audit_db.Record:
    values: dict[str, Any] = {
        "time": NOW,
        "client": "127.0.0.1:50000",
        "listener": "http",
        "method": "CONNECT",
        "host": "api.anthropic.com",
        "port": 443,
        "path": None,
        "decision": "allow",
        "rule": "*.anthropic.com",
        "reason": None,
        "status": 200,
        "bytes_up": 0,
        "bytes_down": 0,
        "duration_ms": 1,
    }
    values.update(fields)
    return audit_db.Record(**values)


def refusal(host: str, port: int = 443, **fields: Any) -> audit_db.Record:
    values = {
        "decision": "block",
        "rule": None,
        "reason": f"{host} is not on the allowlist",
        "host": host,
        "port": port,
        "status": 403,
    }
    return record(**{**values, **fields})


def rows(path: Path, where: str = "1") -> list[tuple[Any, ...]]:
    with closing(audit_db.open_readonly(path)) as conn:
        columns = ", ".join(audit_db.COLUMNS)
        query = f"SELECT {columns} FROM decisions WHERE {where} ORDER BY id"
        return [tuple(row) for row in conn.execute(query)]


def pragma(path: Path, name: str) -> Any:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]


def warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state dir & more" / "audit.db"


Start = Callable[..., audit_db.Writer]


@pytest.fixture
def start() -> Iterator[Start]:
    started: list[audit_db.Writer] = []

    def make(
        path: Path, retention: audit_db.Retention | None = None, **options: Any
    ) -> audit_db.Writer:
        writer = audit_db.Writer(path, retention, **options)
        writer.start()
        started.append(writer)
        return writer

    yield make
    for writer in started:
        writer.stop(timeout=DEADLINE)


def fill(path: Path, records: list[audit_db.Record]) -> None:
    writer = audit_db.Writer(path)
    writer.start()
    for item in records:
        writer.submit(item)
    wait_until(lambda: writer.written == len(records), "the records to be written")
    writer.stop()


# The writer


def test_every_field_is_written_as_given(db: Path, start: Start) -> None:
    records = [
        record(),
        record(
            method="POST",
            path="/v1/messages",
            bytes_up=12,
            bytes_down=3400,
            duration_ms=2314,
            organization="org-1",
            fingerprint="sha256:ab12",
        ),
        refusal("mozilla.org", listener="socks5", method="SOCKS5", status=None, client="[::1]:4"),
    ]
    writer = start(db)
    for item in records:
        writer.submit(item)
    wait_until(lambda: writer.written == 3, "three records")
    assert rows(db) == [tuple(item) for item in records]


def test_the_files_are_private_and_the_schema_current(db: Path, start: Start) -> None:
    writer = start(db)
    writer.submit(record())
    wait_until(lambda: writer.written == 1, "one record")
    files = sorted(db.parent.glob("audit.db*"))
    assert [f.name for f in files] == ["audit.db", "audit.db-shm", "audit.db-wal"]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    assert pragma(db, "user_version") == audit_db.SCHEMA_VERSION
    assert pragma(db, "journal_mode") == "wal"
    assert pragma(db, "auto_vacuum") == 2  # incremental: retention gives space back


def test_a_reader_reads_while_the_writer_writes_and_cannot_write(db: Path, start: Start) -> None:
    writer = start(db)
    writer.submit(record())
    wait_until(lambda: writer.written == 1, "one record")
    with closing(audit_db.open_readonly(db)) as reader:
        assert reader.execute("SELECT count(*) FROM decisions").fetchone()[0] == 1
        writer.submit(record())
        wait_until(
            lambda: reader.execute("SELECT count(*) FROM decisions").fetchone()[0] == 2,
            "the reader to see the second record",
        )
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.execute("DELETE FROM decisions")
    writer.stop()
    assert len(rows(db)) == 2  # and once the writer has closed (no -wal, no -shm) too


def test_migration_from_v1_keeps_every_row(db: Path, start: Start) -> None:
    db.parent.mkdir()
    with closing(sqlite3.connect(db)) as conn:
        conn.executescript(V1_SCHEMA)
        conn.execute(
            "INSERT INTO decisions (time, method, host, port, decision, reason, status) "
            "VALUES (?, 'CONNECT', 'mozilla.org', 443, 'block', 'not on the allowlist', 403)",
            (NOW - HOUR,),
        )
        conn.commit()
    writer = start(db)
    writer.submit(record(organization="org-2", fingerprint="sha256:cd34"))
    wait_until(lambda: writer.written == 1, "the new record")
    assert pragma(db, "user_version") == audit_db.SCHEMA_VERSION == 2
    kept, new = rows(db)
    assert kept == (
        *(NOW - HOUR, None, None, "CONNECT", "mozilla.org", 443, None, "block", None),
        *("not on the allowlist", 403, None, None, None),
        *(None, None),  # organization, fingerprint: added by the migration, empty
    )
    assert new == tuple(record(organization="org-2", fingerprint="sha256:cd34"))


def test_a_newer_schema_is_left_alone_and_said_once(
    db: Path, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    db.parent.mkdir()
    with closing(sqlite3.connect(db)) as conn:
        conn.executescript("CREATE TABLE future (x); PRAGMA user_version = 99;")
    writer = start(db, retry_seconds=0.01)
    writer.submit(record())
    wait_until(lambda: writer.failures >= 5, "five attempts")
    said = warnings(caplog, "cannot write")
    assert len(said) == 1 and "schema version 99" in said[0], said
    assert pragma(db, "user_version") == 99
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("future",)]


def test_retention_removes_rows_older_than_the_age_limit(db: Path, start: Start) -> None:
    fill(
        db,
        [
            refusal("old.example", time=NOW - 40 * DAY),
            refusal("older.example", time=NOW - 31 * DAY),
            refusal("recent.example", time=NOW - 29 * DAY),
        ],
    )
    writer = start(db, audit_db.Retention(max_age=30 * DAY))
    writer.submit(record())  # the first batch opens the database; retention follows it
    wait_until(lambda: len(rows(db)) == 2, "the old rows to go")
    assert [row[4] for row in rows(db)] == ["recent.example", "api.anthropic.com"]


def test_retention_keeps_the_database_under_its_size_limit(
    db: Path, start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    flood_until_trimmed(db, start, monkeypatch, audit_db.Retention(max_bytes=TRIM_LIMIT))
    assert db.stat().st_size <= TRIM_LIMIT
    total = FLOOD_ROWS
    kept = rows(db)
    assert 0 < len(kept) < total
    assert kept[-1][6].startswith(f"/{total - 1}/")  # the newest stays, the oldest went
    assert kept[0][0] > NOW


def test_size_trimming_never_deletes_refusals_younger_than_the_age_limit(
    db: Path, start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood (of allowed traffic, or of anything) cannot push the evidence of refusals out."""
    fill(db, [refusal(f"r{i}.example", time=NOW - DAY + i) for i in range(300)])
    retention = audit_db.Retention(max_age=30 * DAY, max_bytes=TRIM_LIMIT)
    flood_until_trimmed(db, start, monkeypatch, retention)
    kept = rows(db)
    assert [r[4] for r in kept if r[7] == "block"] == [f"r{i}.example" for i in range(300)]
    assert len([r for r in kept if r[7] == "allow"]) < FLOOD_ROWS


def test_refusals_alone_over_the_size_limit_are_kept_and_said_once(
    db: Path, start: Start, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(audit_db, "MAINTENANCE_SECONDS", 0.05)
    fill(db, [refusal(f"r{i}.example", reason="x" * 300, time=NOW - i) for i in range(2000)])
    writer = start(db, audit_db.Retention(max_age=30 * DAY, max_bytes=TRIM_LIMIT))
    writer.submit(refusal("opens.example"))  # the first batch opens the database
    said = "is over its size limit (0 MiB) with refusals younger than 30 days, which are kept"
    wait_until(lambda: said in caplog.text, "the warning")
    wait_until(lambda: writer.written == 1, "the record")
    writer.stop()
    assert caplog.text.count(said) == 1
    assert len(rows(db)) == 2001


TRIM_LIMIT = 256 * 1024
FLOOD_ROWS = 6000  # about 1.5 MB of rows


def flood_until_trimmed(
    db: Path, start: Start, monkeypatch: pytest.MonkeyPatch, retention: audit_db.Retention
) -> None:
    """Write FLOOD_ROWS allowed requests; return once retention has the file under its limit."""
    monkeypatch.setattr(audit_db, "MAINTENANCE_SECONDS", 0.05)
    monkeypatch.setattr(audit_db, "CHUNK", 200)
    writer = start(db, retention)
    for i in range(FLOOD_ROWS):
        writer.submit(record(method="GET", path=f"/{i}/" + "x" * 200, time=NOW + i))
    wait_until(lambda: writer.written == FLOOD_ROWS, "every record")
    with closing(audit_db.open_readonly(db)) as reader:
        wait_until(lambda: audit_db.used_bytes(reader) <= retention.max_bytes, "the file to shrink")
    writer.stop()


def test_a_slow_disk_never_holds_up_submit(
    db: Path, start: Start, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    disk = threading.Event()
    write_batch = audit_db.Writer.write_batch

    def stuck(
        self: audit_db.Writer, conn: sqlite3.Connection, batch: list[audit_db.Record]
    ) -> None:
        disk.wait(DEADLINE)
        write_batch(self, conn, batch)

    monkeypatch.setattr(audit_db.Writer, "write_batch", stuck)
    writer = start(db, queue_size=10)
    total = 200
    submitter = threading.Thread(target=lambda: [writer.submit(record()) for _ in range(total)])
    submitter.start()
    submitter.join(DEADLINE)
    assert not submitter.is_alive(), "submit waited for the disk"
    assert writer.refused >= total - 2 * 10  # a full queue, and at most one batch in the writer
    disk.set()
    wait_until(lambda: writer.written + writer.dropped == total, "every record accounted for")
    assert len(rows(db)) == writer.written
    with closing(audit_db.open_readonly(db)) as reader:
        wait_until(
            lambda: reader.execute("SELECT dropped FROM writer").fetchone()[0] == writer.dropped,
            "the counters in the database",
        )
    assert len(warnings(caplog, "does not keep up")) == 1
    assert warnings(caplog, "caught up") == [
        f"audit log: caught up; {writer.dropped} decisions dropped from it since the proxy started"
    ]


def test_a_corrupt_database_is_set_aside_and_a_new_one_started(
    db: Path, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    db.parent.mkdir()
    garbage = b"this is not a database " * 200
    db.write_bytes(garbage)
    writer = start(db, retry_seconds=0.01)
    writer.submit(record())
    wait_until(lambda: writer.written == 1, "the record, in a new file")
    said = warnings(caplog, "is damaged")
    assert len(said) == 1 and "file is not a database" in said[0], said
    assert warnings(caplog, "cannot write") == []
    (aside,) = db.parent.glob("audit.db.damaged-*")
    assert aside.name in said[0]
    assert aside.read_bytes() == garbage  # kept as it was
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM decisions").fetchone() == (1,)


def test_a_full_disk_is_said_once_and_retried(
    db: Path, start: Start, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    full = threading.Event()
    full.set()
    connect = audit_db.connect

    def no_room(path: Path) -> sqlite3.Connection:
        conn = connect(path)
        if full.is_set():  # SQLite answers as on a full disk once the file would grow
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")
        return conn

    monkeypatch.setattr(audit_db, "connect", no_room)
    writer = start(db, retry_seconds=0.01)
    for _ in range(5):
        writer.submit(record(path="/" + "x" * 3000))
    wait_until(lambda: writer.failures >= 5, "five attempts")
    said = warnings(caplog, "cannot write")
    assert len(said) == 1 and "full" in said[0], said
    full.clear()
    wait_until(lambda: writer.written == 5, "the records, once there is room")
    assert len(rows(db)) == 5


def test_a_removed_database_is_made_anew(
    db: Path, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    writer = start(db)
    writer.submit(refusal("first.example"))
    wait_until(lambda: writer.written == 1, "the first record")
    for path in db.parent.glob("audit.db*"):
        path.unlink()
    writer.submit(refusal("second.example"))
    wait_until(lambda: writer.written == 2, "the second record")
    assert [row[4] for row in rows(db)] == ["second.example"]
    assert len(warnings(caplog, "removed or replaced")) == 1


def test_a_folder_that_cannot_be_made_stops_nothing(
    tmp_path: Path, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a file").write_text("")
    writer = start(tmp_path / "a file" / "audit.db", retry_seconds=0.01)
    for _ in range(3):
        writer.submit(record())
    wait_until(lambda: writer.failures >= 3, "three attempts")
    said = warnings(caplog, "cannot write")
    assert len(said) == 1 and f"File exists: {tmp_path / 'a file'}" in said[0], said
    assert writer.written == 0


def test_stop_writes_what_is_queued(db: Path) -> None:
    writer = audit_db.Writer(db)
    writer.start()
    for i in range(1000):
        writer.submit(record(port=i))
    writer.stop()
    assert not writer.thread.is_alive()
    assert len(rows(db)) == 1000


# `claude-proxy log`


@pytest.fixture
def log(db: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """Runs `claude-proxy log ARGS` on `db`; returns (exit code, stdout lines, stderr)."""
    monkeypatch.setattr(paths, "audit_db", lambda: db)
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)

    def run(*args: str) -> tuple[int, list[str], str]:
        code = main.main(["log", *args])
        out, err = capsys.readouterr()
        return code, out.splitlines(), err

    return run


def hosts(lines: list[str]) -> list[str]:
    return [json.loads(line)["host"] for line in lines]


def test_log_shows_the_newest_50_newest_last(db: Path, log: Any) -> None:
    fill(db, [refusal(f"h{i}.example", time=NOW - 100 + i) for i in range(60)])
    code, lines, _ = log()
    assert code == 0
    assert lines[0].split() == ["TIME", "METHOD", "DESTINATION", "PATH", "RULE", "OR", "REASON"]
    assert len(lines) == 51
    assert "h10.example:443" in lines[1] and "h59.example:443" in lines[-1]
    assert "BLOCK 403 CONNECT h59.example:443" in lines[-1]
    assert lines[-1].endswith("h59.example is not on the allowlist")
    assert "\033[" not in "".join(lines)  # not a terminal: no colours
    assert len(log("-n", "5")[1]) == 6
    assert len(log("-n", "0")[1]) == 61


def test_log_filters(db: Path, log: Any) -> None:
    fill(
        db,
        [
            refusal("mozilla.org", time=NOW - 2 * HOUR),
            record(time=NOW - 10 * MINUTE),
            refusal("api.github.com", time=NOW - 5 * MINUTE),
            refusal("github.com", time=NOW - MINUTE),
        ],
    )
    assert hosts(log("--json", "--blocked")[1]) == ["mozilla.org", "api.github.com", "github.com"]
    assert hosts(log("--json", "--since", "1h")[1]) == [
        "api.anthropic.com",
        "api.github.com",
        "github.com",
    ]
    assert hosts(log("--json", "--host", "*.GitHub.com")[1]) == ["api.github.com"]
    assert hosts(log("--json", "--blocked", "--since", "30m", "--host", "*github*")[1]) == [
        "api.github.com",
        "github.com",
    ]
    code, lines, _ = log("--host", "nothing.example")
    assert code == 0 and len(lines) == 1  # the header alone


def test_log_json_lines_carry_every_field(db: Path, log: Any) -> None:
    fill(db, [record(method="GET", path="/v1/models", bytes_down=20, organization="org-9")])
    code, lines, _ = log("--json")
    assert code == 0
    [line] = lines
    decision = json.loads(line)
    assert set(decision) == {"id", *audit_db.COLUMNS}
    assert datetime.fromisoformat(decision["time"]).timestamp() == pytest.approx(NOW, abs=0.001)
    assert decision["path"] == "/v1/models"
    assert decision["bytes_down"] == 20 and decision["organization"] == "org-9"


def test_log_summary_groups_refused_destinations(db: Path, log: Any) -> None:
    fill(
        db,
        [
            refusal("mozilla.org", time=NOW - 3 * MINUTE, reason="first reason"),
            refusal("example.com", time=NOW - 2 * MINUTE),
            refusal("mozilla.org", time=NOW - MINUTE, reason="latest reason"),
            record(),
        ],
    )
    code, lines, _ = log("--summary")
    assert code == 0
    assert lines[0].split()[:4] == ["REFUSED", "LAST", "SEEN", "DESTINATION"]
    assert lines[1].split()[0] == "2" and "mozilla.org:443" in lines[1]
    assert lines[1].endswith("latest reason")
    assert lines[2].split()[0] == "1" and "example.com:443" in lines[2]
    assert len(lines) == 3
    groups = [json.loads(line) for line in log("--summary", "--json")[1]]
    assert [(g["host"], g["port"], g["refused"]) for g in groups] == [
        ("mozilla.org", 443, 2),
        ("example.com", 443, 1),
    ]


def test_log_suggest_prints_allow_rules_for_what_the_allowlist_refused(db: Path, log: Any) -> None:
    fill(
        db,
        [
            *[refusal("mozilla.org", time=NOW - i * MINUTE) for i in range(3)],
            refusal("Mozilla.org", 8443, reason="port 8443 is not allowed for mozilla.org (x)"),
            refusal("8.8.8.8", method="SOCKS5", listener="socks5", status=None),
            refusal("2606:4700::1111"),
            refusal("2606:4700::1111", time=NOW - HOUR),
            # Not for a rule to change: a limit, a malformed request, a forbidden address, a
            # name no rule can name, and a destination allowed since.
            refusal("api.anthropic.com", method=None, reason="more than 256 header fields"),
            refusal("api.anthropic.com", method="GET", reason="malformed request: x", status=400),
            refusal(
                "internal.example", method="GET", reason="internal.example resolves to 10.0.0.1"
            ),
            refusal("bad_name", reason="host 'bad_name' is not a valid host name"),
            refusal("api.github.com", time=NOW - HOUR),
            record(host="api.github.com", rule="api.github.com", time=NOW - MINUTE),
        ],
    )
    code, lines, _ = log("--suggest")
    assert code == 0
    text = "\n".join(lines)
    assert tomllib.loads(text) == {
        "allow": [
            {"host": "mozilla.org", "ports": [443, 8443]},
            {"ip": "2606:4700::1111", "ports": [443]},
            {"ip": "8.8.8.8", "ports": [443]},
        ]
    }
    comments = [line for line in lines if line.startswith("# ") and "refused attempt" in line]
    assert comments[0].startswith("# 4 refused attempts in 3 separate bursts, last ")
    assert comments[0].endswith("--allow mozilla.org:443 --allow mozilla.org:8443")
    assert comments[1].startswith("# 2 refused attempts in 2 separate bursts, last ")
    assert comments[1].endswith("--allow [2606:4700::1111]:443")
    assert comments[2].startswith("# 1 refused attempt in 1 burst, last ")
    marks = [line for line in lines if line.startswith("# An IP address")]
    assert len(marks) == 2


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("127.0.0.1", "127.0.0.1 is loopback"),
        ("::1", "::1 is loopback"),
        ("169.254.169.254", "169.254.169.254 is link-local (cloud metadata lives here)"),
        ("10.1.2.3", "10.1.2.3 is private"),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1 is loopback, embedded in ::ffff:127.0.0.1"),
        ("localhost", "localhost is this machine"),
    ],
)
def test_log_suggest_never_suggests_what_the_address_guard_refuses(
    db: Path, log: Any, host: str, why: str
) -> None:
    """Fifty refused CONNECTs to a local service, from any process in the sandbox, outrank
    everything: pasting the top suggestion would open that service to the sandbox."""
    fill(db, [*[refusal(host, 8080, time=NOW - i) for i in range(50)], refusal("mozilla.org")])
    code, lines, _ = log("--suggest")
    assert code == 0
    assert tomllib.loads("\n".join(lines)) == {"allow": [{"host": "mozilla.org", "ports": [443]}]}
    [said] = [line for line in lines if line.startswith("# Not suggested: ")]
    assert "(50 refused attempts in 1 burst, last " in said
    assert said.endswith(
        f"{why}, which the address guard refuses; a rule naming it would let the sandbox reach it"
    )


def test_log_suggest_ranks_distinct_minutes_above_a_burst(db: Path, log: Any) -> None:
    burst = [refusal("burst.example", time=NOW - i / 100) for i in range(40)]
    spread = [refusal("spread.example", time=NOW - i * 10 * MINUTE) for i in range(3)]
    fill(db, [*burst, *spread])
    _, lines, _ = log("--suggest")
    hosts = tomllib.loads("\n".join(lines))["allow"]
    assert [h["host"] for h in hosts] == ["spread.example", "burst.example"]


def test_log_suggest_with_nothing_to_suggest_is_valid_toml(db: Path, log: Any) -> None:
    fill(db, [record()])
    code, lines, _ = log("--suggest")
    assert code == 0 and tomllib.loads("\n".join(lines)) == {}


def test_log_output_fits_the_terminal(db: Path, log: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    long_host = "a-very-long-name-" * 6 + "example"
    fill(db, [refusal(long_host, method="GET", path="/" + "p" * 120)])
    monkeypatch.setenv("COLUMNS", "80")
    for args in ((), ("--summary",)):
        _, lines, _ = log(*args)
        assert all(len(line) <= 80 for line in lines), lines
        assert "…" in lines[-1]
    monkeypatch.delenv("COLUMNS")
    _, lines, _ = log()
    assert long_host in lines[-1] and "p" * 120 in lines[-1]  # not a terminal: nothing cut


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_colours_only_on_a_terminal_without_no_color(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(db, [record(), refusal("mozilla.org")])
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.delenv("NO_COLOR", raising=False)
    request = log_cmd.Request(log_cmd.Selection())
    terminal = Terminal()
    log_cmd.show(db, request, terminal)
    assert log_cmd.GREEN + "ALLOW" in terminal.getvalue()
    assert log_cmd.RED + "BLOCK" in terminal.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    terminal = Terminal()
    log_cmd.show(db, request, terminal)
    assert "\033[" not in terminal.getvalue()


def test_log_without_a_database_says_so_in_one_line(log: Any) -> None:
    code, lines, err = log()
    assert (code, lines) == (0, [])
    assert err.count("\n") == 1 and "no audit log yet" in err


def test_log_of_a_database_still_being_made_shows_nothing_yet(db: Path, log: Any) -> None:
    db.parent.mkdir()
    db.touch()  # the proxy has made the file, not yet the schema
    code, lines, err = log()
    assert (code, lines) == (0, [])
    assert "no audit log yet" in err
    assert log_cmd.describe(db) == (True, f"{db} (not written yet)")


def test_log_of_a_damaged_database_is_one_line_and_exit_1(db: Path, log: Any) -> None:
    db.parent.mkdir()
    db.write_bytes(b"garbage " * 1000)
    code, lines, err = log()
    assert (code, lines) == (1, [])
    assert err.count("\n") == 1 and "cannot read the audit log" in err


@pytest.mark.parametrize(
    ("text", "ago"),
    [("45s", 45), ("30m", 30 * MINUTE), ("1h", HOUR), ("2d", 2 * DAY), ("1w", 7 * DAY)],
)
def test_since_durations(text: str, ago: int) -> None:
    assert log_cmd.parse_since(text, now=NOW) == NOW - ago


def test_since_iso_times() -> None:
    assert log_cmd.parse_since("2025-06-01T14:00:00+00:00") == 1748786400
    naive = log_cmd.parse_since("2025-06-01T14:00")
    assert naive == datetime(2025, 6, 1, 14, 0).timestamp()  # local time
    with pytest.raises(ValueError, match="is not a time"):
        log_cmd.parse_since("yesterday")


def test_log_refuses_a_bad_since(log: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main.main(["log", "--since", "yesterday"])
    assert exited.value.code == 2
    assert "is not a time" in capsys.readouterr().err


def test_status_names_the_database_its_rows_and_what_was_dropped(db: Path) -> None:
    assert log_cmd.describe(db) == (True, f"{db} (not written yet)")
    fill(db, [record(), record()])
    ok, detail = log_cmd.describe(db)
    assert ok
    assert detail.startswith(f"{db}: 2 decisions; ")
    assert detail.endswith("dropped 0")
    db.write_bytes(b"garbage " * 1000)
    for path in db.parent.glob("audit.db-*"):
        path.unlink()
    ok, detail = log_cmd.describe(db)
    assert not ok and detail.startswith(f"cannot read the audit log {db}: ")


def test_suggested_rules_are_allowlist_rules(db: Path) -> None:
    """What `--suggest` names (an A-label, an IPv6 literal) is a rule that allows it."""
    name = "bücher.example".encode("idna").decode()
    fill(db, [refusal(name, time=NOW - 1), refusal("2606:4700::1111")])
    with closing(log_cmd.connect(db)) as conn:
        found = log_cmd.suggestions(conn, log_cmd.Selection())
    assert [(s.host, list(s.ports)) for s in found] == [("2606:4700::1111", [443]), (name, [443])]
    for suggestion in found:
        ip = rules.parse_ip(suggestion.host) is not None
        text = log_cmd.rule_text(suggestion.host, 443, ip)
        assert rules.Policy.from_texts([text]).decide(suggestion.host, 443).allowed, text


@pytest.mark.parametrize("option", ["sandbox_audit_days", "sandbox_audit_max_mb"])
def test_retention_options_must_be_positive(option: str) -> None:
    audit_log = decisions.AuditLog(decisions.Recorder())
    with taddons.context(audit_log) as tctx:
        with pytest.raises(OptionsError, match="must be at least 1"):
            tctx.configure(audit_log, **{option: 0})
        tctx.configure(audit_log, sandbox_audit_days=7, sandbox_audit_max_mb=5)
        assert decisions.retention() == audit_db.Retention(
            max_age=7 * DAY, max_bytes=5 * audit_db.MIB
        )


def test_log_does_not_load_mitmproxy(db: Path, tmp_path: Path) -> None:
    fill(db, [record()])
    code = (
        "import sys; from claude_proxy.cli import main; from claude_proxy.state import paths\n"
        "from pathlib import Path\n"
        f"paths.audit_db = lambda: Path({str(db)!r})\n"
        "assert main.main(['log', '--json']) == 0\n"
        "assert not [m for m in sys.modules if m.startswith('mitmproxy')], 'mitmproxy loaded'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["host"] == "api.anthropic.com"


def test_status_and_log_read_a_v1_database_a_proxy_has_not_migrated_yet(db: Path, log: Any) -> None:
    db.parent.mkdir()
    with closing(sqlite3.connect(db)) as conn:
        conn.executescript(V1_SCHEMA)
        conn.execute(
            "INSERT INTO decisions (time, method, host, port, decision, reason, status) "
            "VALUES (?, 'CONNECT', 'mozilla.org', 443, 'block', 'not on the allowlist', 403)",
            (NOW,),
        )
        conn.commit()
    assert log_cmd.describe(db) == (True, f"{db}: 1 decisions")
    code, lines, _ = log("--blocked")
    assert code == 0 and "mozilla.org:443" in lines[-1]


class WatchedQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that remembers how the writer asked it for records."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.asked: list[float | None] = []  # the timeout of each get; None: get_nowait

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        self.asked.append(timeout if block else None)
        return super().get(block, timeout)


def test_an_idle_writer_waits_for_records_rather_than_polling(db: Path, start: Start) -> None:
    writer = audit_db.Writer(db)
    watched = WatchedQueue(10)
    writer.queue = watched
    writer.start()
    try:
        wait_until(lambda: len(watched.asked) >= 1, "the writer to ask for records")
        assert watched.asked[0] is not None and watched.asked[0] > 1, watched.asked
        writer.submit(record())
        wait_until(lambda: writer.written == 1, "one record")
        wait_until(lambda: len(watched.asked) >= 3, "the writer to ask again")  # get, get_nowait
        assert watched.asked[-1] is not None and watched.asked[-1] > 1, watched.asked
    finally:
        writer.stop()
