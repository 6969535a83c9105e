"""The audit database: every decision as one row in SQLite, written off the event loop.

One writer thread owns the only writing connection. The event loop hands it records through a
bounded queue and never waits: when the queue is full, a record is dropped and counted. The
writer commits in batches, trims old rows (by age and by size) in small steps between batches,
and outlives a missing, locked or full database: it says so once and tries again. A damaged one
(a failed write says so, or a periodic `PRAGMA quick_check`) is set aside, renamed and never
deleted, and a new one started.
Standard library only: `claude-proxy log` and `status` read this schema without mitmproxy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
DAY = 86400.0
QUEUE_SIZE = 10_000  # records waiting for the disk: a few MB, ten seconds of the busiest proxy
BATCH = 500  # records per transaction at most
GATHER_SECONDS = 0.1  # a batch's time to gather records once the first has come
BUSY_SECONDS = 1.0  # how long the writer waits for another process's lock before it gives up
RETRY_SECONDS = 2.0  # between two attempts on a database that failed
MAINTENANCE_SECONDS = 60.0  # between two retention passes (sooner while rows remain to delete)
CHECK_SECONDS = 600.0  # between two integrity checks (PRAGMA quick_check) of the open database
DAMAGED_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB (and their extended codes)
CHUNK = 5000  # rows one retention step deletes, in its own short transaction
STOP_SECONDS = 5.0  # the writer's time to flush at shutdown
WARN_EVERY = 60.0  # seconds between two "falling behind" warnings
WAL_LIMIT = 8 * MIB  # the write-ahead log is truncated to this after a checkpoint
TRIM_TO = 0.9  # a database over its size limit is trimmed to this fraction of it

COLUMNS = (
    "time",  # seconds since the epoch, when the decision was made
    "client",  # the client's address:port
    "listener",  # "http" or "socks5"
    "method",  # GET, POST, CONNECT, SOCKS5…; NULL where none was read
    "host",
    "port",
    "path",  # without the query; NULL for a tunnel
    "decision",  # "allow" or "block"
    "rule",  # the rule that decided
    "reason",  # why it was refused, or why an allowed request got no upstream answer
    "status",  # the HTTP status answered; NULL for none (closed, SOCKS5)
    "bytes_up",  # body bytes sent upstream
    "bytes_down",  # body bytes sent to the client
    "duration_ms",
    "organization",  # the Anthropic organization of the credential, where the guard applies
    "fingerprint",  # the credential's fingerprint (never the credential)
)
# Each migration takes the schema from version N to N + 1 (PRAGMA user_version).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE decisions (
        id INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        client TEXT,
        listener TEXT,
        method TEXT,
        host TEXT,
        port INTEGER,
        path TEXT,
        decision TEXT NOT NULL,
        rule TEXT,
        reason TEXT,
        status INTEGER,
        bytes_up INTEGER,
        bytes_down INTEGER,
        duration_ms INTEGER
    );
    CREATE INDEX decisions_time ON decisions (time);
    """,
    """
    ALTER TABLE decisions ADD COLUMN organization TEXT;
    ALTER TABLE decisions ADD COLUMN fingerprint TEXT;
    CREATE TABLE writer (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        pid INTEGER NOT NULL,
        started REAL NOT NULL,
        updated REAL NOT NULL,
        written INTEGER NOT NULL,
        dropped INTEGER NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
INSERT = f"INSERT INTO decisions ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
WRITER_ROW = "INSERT OR REPLACE INTO writer VALUES (1, ?, ?, ?, ?, ?)"


class Record(NamedTuple):
    """One decision, in COLUMNS order. Never a header, a body, a query string or a credential."""

    time: float
    client: str | None
    listener: str | None
    method: str | None
    host: str | None
    port: int | None
    path: str | None
    decision: str
    rule: str | None
    reason: str | None
    status: int | None
    bytes_up: int | None
    bytes_down: int | None
    duration_ms: int | None
    organization: str | None = None
    fingerprint: str | None = None


@dataclass(frozen=True)
class Retention:
    max_age: float = 30 * DAY  # seconds
    max_bytes: int = 100 * MIB


class Unusable(Exception):
    """The database is there but is not one this claude-proxy may write."""


def is_damage(error: BaseException) -> bool:
    """Whether SQLite said the file is not a sound database (not busy, locked, full…)."""
    code = getattr(error, "sqlite_errorcode", None)
    return (
        isinstance(error, sqlite3.DatabaseError)
        and code is not None
        and code & 0xFF in (DAMAGED_CODES)
    )


def set_aside(path: Path) -> Path:
    """Rename the database (and its -wal, -shm) beside itself: `NAME.damaged-TIME`. Nothing is
    deleted; the next connection starts a new file."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    number = 1
    while aside.exists():
        number += 1
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{number}")
    os.rename(path, aside)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.rename(f"{path}{suffix}", f"{aside}{suffix}")
    return aside


def connect(path: Path) -> sqlite3.Connection:
    """The writer's connection: the file (0600, folder 0700) made if missing, the schema current."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # SQLite gives -wal/-shm this mode
    os.chmod(path, 0o600)
    conn = sqlite3.connect(path, timeout=BUSY_SECONDS, isolation_level=None)
    try:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only a new database takes it
        conn.execute("PRAGMA journal_mode = WAL")  # readers never wait for the writer
        conn.execute("PRAGMA synchronous = NORMAL")  # consistent; a power cut may lose a last batch
        conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT}")
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION in one transaction (readers never see a step of it);
    rows are kept."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise Unusable(
            f"it has schema version {version}, newer than this claude-proxy's "
            f"({SCHEMA_VERSION}); move it aside or upgrade claude-proxy"
        )
    if version == SCHEMA_VERSION:
        return
    steps = "".join(MIGRATIONS[version:])
    try:
        conn.executescript(
            f"BEGIN IMMEDIATE; {steps} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        )
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def open_readonly(path: Path) -> sqlite3.Connection:
    """A connection that cannot change the database (it may read while the proxy writes)."""
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=BUSY_SECONDS)
    conn.row_factory = sqlite3.Row
    return conn


def used_bytes(conn: sqlite3.Connection) -> int:
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int((pages - free) * conn.execute("PRAGMA page_size").fetchone()[0])


def delete_oldest(conn: sqlite3.Connection, where: str, args: Sequence[object], limit: int) -> int:
    """Delete at most `limit` of the oldest rows matching `where`, in one short transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        cursor = conn.execute(
            "DELETE FROM decisions WHERE id IN "
            f"(SELECT id FROM decisions WHERE {where} ORDER BY id LIMIT ?)",
            (*args, limit),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return cursor.rowcount


def describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return str(error) or type(error).__name__


class Writer:
    """The one thread that writes the audit database. `submit` is all the event loop calls."""

    def __init__(
        self,
        path: Path,
        retention: Retention | None = None,
        *,
        queue_size: int | None = None,
        batch_size: int = BATCH,
        retry_seconds: float | None = None,
    ) -> None:
        self.path = path
        self.retention = retention or Retention()  # replaced whole when the options change
        self.queue: queue.Queue[Record | None] = queue.Queue(queue_size or QUEUE_SIZE)
        self.batch_size = batch_size
        self.retry_seconds = RETRY_SECONDS if retry_seconds is None else retry_seconds
        self.started = time.time()
        self.written = 0
        self.refused = 0  # records the full queue turned away (counted by the event loop's thread)
        self.record_failed = False  # a record could not even be made (said once)
        self.lost = 0  # records the writer gave up on (counted by the writer's thread)
        self.falling_behind = False
        self.warned = False
        self.next_warning = 0.0
        self.problem: str | None = None  # what the last failure said, so that it is said once
        self.failures = 0
        self.pending: list[Record] = []  # a batch to write again once the database answers
        self.conn: sqlite3.Connection | None = None
        self.inode: int | None = None
        self.trimming = False
        self.full_warned = False  # said once that refusals keep it over its size limit
        self.check_at = 0.0  # when the open database is next checked (monotonic)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="claude-proxy-audit", daemon=True)

    @property
    def dropped(self) -> int:
        return self.refused + self.lost

    def start(self) -> None:
        self.thread.start()

    def submit(self, record: Record) -> None:
        """Queue one record; never waits. A full queue drops it, counts it, and says so once."""
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.refused += 1
            if self.falling_behind:
                return
            self.falling_behind = True
            now = time.monotonic()
            if now >= self.next_warning:
                self.next_warning, self.warned = now + WARN_EVERY, True
                logger.warning(
                    "audit log: the database does not keep up; dropping decisions from it "
                    "(counted; `claude-proxy status` shows how many); traffic is not slowed"
                )

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Write what is queued (for `timeout` seconds at most), then close."""
        self.stopping.set()
        with contextlib.suppress(queue.Full):  # a full queue: the writer is awake anyway
            self.queue.put_nowait(None)
        if self.thread.is_alive():
            self.thread.join(timeout)
        if self.thread.is_alive():
            unwritten = self.queue.qsize() + len(self.pending)
            logger.warning(
                "audit log: %d decisions not written: %s did not answer within %g s",
                unwritten,
                self.path,
                timeout,
            )
        elif self.dropped:
            logger.warning("audit log: %d decisions were dropped from it in all", self.dropped)

    # The writer's thread

    def _run(self) -> None:
        maintain_at = 0.0  # retention is due once a first batch has opened the database
        while True:
            if self.conn is None:  # nothing to maintain: wait for records (or for stop)
                wait = MAINTENANCE_SECONDS
            else:
                wait = max(0.0, maintain_at - time.monotonic())
            batch = self.pending or self._take(wait)
            stopping = self.stopping.is_set()
            if batch and not self._write(batch):
                if stopping:
                    self.lost += len(batch) + self.queue.qsize()
                    self.pending = []
                    break
                self.stopping.wait(self.retry_seconds)
                continue
            if time.monotonic() >= maintain_at and self.conn is not None:
                more = self._maintain()
                maintain_at = time.monotonic() + (0.0 if more else MAINTENANCE_SECONDS)
            if stopping and self.queue.empty():
                break
        self._write_counters()
        self._close()

    def _take(self, timeout: float) -> list[Record]:
        batch: list[Record] = []
        try:
            item = self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
            if self.queue.qsize() < self.batch_size and not self.stopping.is_set():
                # Let a batch gather: one transaction per record would cost the proxy its speed.
                self.stopping.wait(GATHER_SECONDS)
            while True:
                if item is not None:
                    batch.append(item)
                if len(batch) >= self.batch_size:
                    break
                item = self.queue.get_nowait()
        except queue.Empty:
            pass
        return batch

    def _write(self, batch: list[Record], again: bool = True) -> bool:
        try:
            self.write_batch(self._connection(), batch)
        except (sqlite3.Error, OSError, Unusable) as e:
            if again and is_damage(e) and self._start_anew(describe(e)):
                return self._write(batch, again=False)  # into the new file, once
            self._failed(e)
            self.pending = batch
            return False
        except Exception as e:  # a bug: these records are lost, the next ones may pass
            self._failed(e)
            self.lost += len(batch)
            self.pending = []
            return True
        self.pending = []
        self.written += len(batch)
        self._recovered()
        if self.falling_behind and self.queue.empty():
            self.falling_behind = False
            if self.warned:
                self.warned = False
                logger.warning(
                    "audit log: caught up; %d decisions dropped from it since the proxy started",
                    self.dropped,
                )
        return True

    def write_batch(self, conn: sqlite3.Connection, batch: list[Record]) -> None:
        """One transaction: the records and the writer's counters."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(INSERT, batch)
            conn.execute(WRITER_ROW, self._counters(self.written + len(batch)))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _counters(self, written: int) -> tuple[int, float, float, int, int]:
        return os.getpid(), self.started, time.time(), written, self.dropped

    def _write_counters(self) -> None:
        if self.conn is None:
            return
        with contextlib.suppress(sqlite3.Error):  # a courtesy for `status`, not a record
            self.conn.execute(WRITER_ROW, self._counters(self.written))

    def _connection(self) -> sqlite3.Connection:
        """The open connection; a new one when the file was removed or replaced meanwhile."""
        if self.conn is not None:
            try:
                same = os.stat(self.path).st_ino == self.inode
            except OSError:
                same = False
            if not same:
                logger.warning("audit log: %s was removed or replaced; starting anew", self.path)
                self._close()
        if self.conn is None:
            self.conn = connect(self.path)
            self.inode = os.stat(self.path).st_ino
            self.check_at = time.monotonic() + CHECK_SECONDS
        return self.conn

    def _start_anew(self, damage: str) -> bool:
        """Set the damaged database aside and say so; whether a new one can be started."""
        self._close()
        try:
            aside = set_aside(self.path)
        except OSError as e:
            self._failed(OSError(e.errno, f"it is damaged ({damage}) and cannot be set aside"))
            return False
        logger.warning(
            "audit log: %s is damaged (%s); set aside as %s (kept, never deleted) and a new "
            "one started",
            self.path,
            damage,
            aside.name,
        )
        return True

    def _check(self) -> None:
        """PRAGMA quick_check: a damaged file is set aside; the next batch starts a new one."""
        self.check_at = time.monotonic() + CHECK_SECONDS
        try:
            # A connection of its own: the writer's trusts the pages it has cached, and a file
            # overwritten in place (same inode, no change in the WAL index) looks sound to it.
            with contextlib.closing(open_readonly(self.path)) as fresh:
                found = [row[0] for row in fresh.execute("PRAGMA quick_check").fetchall()]
        except sqlite3.Error as e:
            if not is_damage(e):
                raise
            found = [describe(e)]
        if found != ["ok"]:
            self._start_anew("; ".join(found[:3]))

    def _close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
        self.conn = None

    def _failed(self, error: BaseException) -> None:
        self.failures += 1
        self._close()
        message = describe(error)
        if message != self.problem:
            self.problem = message
            logger.warning(
                "audit log: cannot write %s: %s; the proxy carries on, and tries again every %g s",
                self.path,
                message,
                self.retry_seconds,
            )

    def _recovered(self) -> None:
        if self.problem is not None:
            self.problem = None
            logger.warning("audit log: writing to %s again", self.path)

    def _maintain(self) -> bool:
        """One retention step; whether rows remain to delete. Readers never wait for it (WAL)."""
        assert self.conn is not None
        try:
            if time.monotonic() >= self.check_at:
                self._check()
                if self.conn is None:  # set aside: nothing to trim
                    return False
            more = self._trim(self.conn, self.retention)
            self.conn.execute("PRAGMA incremental_vacuum").fetchall()  # each row frees a page
            return more
        except sqlite3.Error as e:
            if is_damage(e) and self._start_anew(describe(e)):
                return False
            self._failed(e)
            return False

    def _trim(self, conn: sqlite3.Connection, retention: Retention) -> bool:
        cutoff = time.time() - retention.max_age
        if delete_oldest(conn, "time < ?", (cutoff,), CHUNK) == CHUNK:
            return True
        used = used_bytes(conn)
        limit = retention.max_bytes * (TRIM_TO if self.trimming else 1.0)
        self.trimming = used > limit
        if self.trimming:
            # Room is made from allowed traffic only: a refusal younger than the age limit is
            # evidence, and a flood of anything must not be a way to erase it.
            self.trimming = delete_oldest(conn, "decision = 'allow'", (), CHUNK) > 0
            if not self.trimming and not self.full_warned:
                self.full_warned = True
                logger.warning(
                    "audit log: %s is over its size limit (%d MiB) with refusals younger than "
                    "%d days, which are kept; raise sandbox_audit_max_mb or lower "
                    "sandbox_audit_days",
                    self.path,
                    retention.max_bytes // MIB,
                    retention.max_age // 86400,
                )
        return self.trimming
