"""`claude-proxy log`: the audit database read back as a table, JSON lines, a summary or rules.

Reads through a read-only connection, so it works while the proxy writes. No mitmproxy here: the
command starts in a fraction of a second.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from claude_proxy.errors import ProxyError
from claude_proxy.policy import addresses, rules
from claude_proxy.record import audit_db

FOLLOW_SECONDS = 0.5  # how often --follow looks for new rows
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
TUNNELS = ("CONNECT", "SOCKS5")  # the decisions a destination rule changes
# The allowlist's own refusals: only these would a rule have allowed (not a limit, a malformed
# request, a name that resolves to a forbidden address…).
NOT_ALLOWED = ("% is not on the allowlist", "port % is not allowed for %")
GREEN, RED, DIM, RESET = "\033[32m", "\033[31m", "\033[2m", "\033[0m"
PREFIX = 34  # TIME, DECISION, STATUS, METHOD and the spaces between them


BURST_GAP = 60.0  # seconds: refusals closer than this are one burst in --suggest's ranking


@dataclass(frozen=True)
class Selection:
    """Which decisions: `--blocked`, `--since`, `--host`."""

    blocked: bool = False
    since: float | None = None
    host: str | None = None  # a shell-style glob, case-insensitive

    def where(self) -> tuple[str, list[object]]:
        clauses: list[str] = ["1"]
        args: list[object] = []
        if self.blocked:
            clauses.append("decision = 'block'")
        if self.since is not None:
            clauses.append("time >= ?")
            args.append(self.since)
        if self.host is not None:
            clauses.append("lower(host) GLOB lower(?)")
            args.append(self.host)
        return " AND ".join(clauses), args


def parse_since(text: str, now: float | None = None) -> float:
    """`30s`, `30m`, `1h`, `2d`, `1w` ago, or an ISO date/time (local time unless it says)."""
    now = time.time() if now is None else now
    if found := re.fullmatch(r"(\d+)\s*([smhdw])", text.strip()):
        return now - int(found[1]) * UNITS[found[2]]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: write 30m, 1h, 2d, 1w or an ISO date like 2025-06-01T14:00"
        ) from None
    return moment.timestamp()  # a naive datetime counts as local time


DAMAGED = ("not a database", "malformed", "corrupt")


def unreadable(path: Path, e: sqlite3.Error) -> ProxyError:
    """Why the database cannot be read, and (when it is damaged) what to do about it."""
    message = f"cannot read the audit log {path}: {e}"
    if any(word in str(e) for word in DAMAGED):
        quoted = shlex.quote(str(path))
        message += (
            f"; move it aside (mv {quoted} {quoted}.damaged) and restart the proxy: it starts "
            "a new one"
        )
    return ProxyError(message)


def connect(path: Path) -> sqlite3.Connection | None:
    """The database, read-only; None while it is not there or not made yet (a proxy is making
    it); a clear ProxyError when it cannot be read."""
    if not path.exists():
        return None
    if not path.is_file():
        quoted = shlex.quote(str(path))
        raise ProxyError(
            f"cannot read the audit log {path}: it is not a file; move it aside "
            f"(mv {quoted} {quoted}.aside) and restart the proxy: it starts a new one"
        )
    try:
        conn = audit_db.open_readonly(path)
    except sqlite3.Error as e:
        raise unreadable(path, e) from None
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            conn.close()
            return None
        conn.execute("SELECT id FROM decisions LIMIT 1").fetchall()
    except sqlite3.Error as e:
        conn.close()
        raise unreadable(path, e) from None
    return conn


def latest(conn: sqlite3.Connection, selection: Selection, limit: int) -> list[sqlite3.Row]:
    """The newest `limit` decisions (0: all), oldest first."""
    where, args = selection.where()
    sql = f"SELECT * FROM decisions WHERE {where} ORDER BY id DESC"
    if limit > 0:
        sql += " LIMIT ?"
        args.append(limit)
    return list(reversed(conn.execute(sql, args).fetchall()))


def after(conn: sqlite3.Connection, selection: Selection, last_id: int) -> list[sqlite3.Row]:
    where, args = selection.where()
    sql = f"SELECT * FROM decisions WHERE id > ? AND {where} ORDER BY id"
    return conn.execute(sql, [last_id, *args]).fetchall()


@dataclass(frozen=True)
class Refused:
    """Refusals of one destination."""

    host: str | None
    port: int | None
    count: int
    last: float
    reason: str | None  # the latest one's


def refused(conn: sqlite3.Connection, selection: Selection) -> list[Refused]:
    """Refused destinations, the most refused first."""
    where, args = selection.where()
    # SQLite takes `reason` from the row that holds max(time).
    sql = (
        "SELECT host, port, count(*), max(time), reason FROM decisions "
        f"WHERE decision = 'block' AND {where} GROUP BY host, port "
        "ORDER BY count(*) DESC, max(time) DESC"
    )
    return [Refused(*row) for row in conn.execute(sql, args)]


@dataclass
class Suggestion:
    host: str  # normalized: a lowercase A-label name or an IP address
    ports: dict[int, int] = field(default_factory=dict)  # port → refused attempts
    last: float = 0.0
    bursts: int = 0  # refusals less than a minute after the one before count as one burst
    times: list[float] = field(default_factory=list, repr=False)
    withheld: str | None = None  # why no rule is suggested for it

    @property
    def count(self) -> int:
        return sum(self.ports.values())

    @property
    def ip(self) -> bool:
        return rules.parse_ip(self.host) is not None


def withheld(host: str) -> str | None:
    """Why a rule for `host` must not be suggested: the address guard would refuse where it leads.

    A rule that names an IP literal reaches it even when the guard would refuse it; any process in
    the sandbox can make refusals, so the most refused destinations are the attacker's choice.
    """
    ip = rules.parse_ip(host)
    if ip is None:
        local = host == "localhost" or host.endswith(".localhost")
        return "localhost is this machine" if local else None
    found = ipaddress.ip_address(str(ip).split("%", 1)[0])
    why = addresses.forbidden(found)
    return f"{host} is {why}" if why else None


def suggestions(conn: sqlite3.Connection, selection: Selection) -> list[Suggestion]:
    """Destinations the allowlist refused (tunnels only) and has not allowed since."""
    where, args = selection.where()
    methods = ", ".join("?" * len(TUNNELS))
    reasons = " OR ".join("reason LIKE ?" for _ in NOT_ALLOWED)
    rows = conn.execute(
        "SELECT host, port, count(*), group_concat(time), max(time) FROM decisions "
        f"WHERE decision = 'block' AND method IN ({methods}) AND ({reasons}) AND {where} "
        "GROUP BY host, port",
        [*TUNNELS, *NOT_ALLOWED, *args],
    ).fetchall()
    allowed_since: dict[tuple[str, int], float] = {}
    for host, port, last in conn.execute(
        "SELECT host, port, max(time) FROM decisions "
        f"WHERE decision = 'allow' AND method IN ({methods}) GROUP BY host, port",
        TUNNELS,
    ):
        if (name := normalized(host)) is not None:
            key = (name, port)
            allowed_since[key] = max(last, allowed_since.get(key, 0.0))
    found: dict[str, Suggestion] = {}
    for host, port, count, times, last in rows:
        name = normalized(host)
        if name is None or port is None or allowed_since.get((name, port), 0.0) > last:
            continue
        suggestion = found.setdefault(name, Suggestion(name, withheld=withheld(name)))
        suggestion.ports[port] = suggestion.ports.get(port, 0) + count
        suggestion.times += [float(t) for t in times.split(",")]
        suggestion.last = max(suggestion.last, last)
    for suggestion in found.values():
        suggestion.bursts = bursts(suggestion.times)
    return sorted(found.values(), key=lambda s: (-s.bursts, -s.count, -s.last, s.host))


def bursts(times: Iterable[float], gap: float = BURST_GAP) -> int:
    """How many runs of refusals there are, a new one after `gap` seconds without any."""
    ordered = sorted(times)
    return sum(1 for i, t in enumerate(ordered) if i == 0 or t - ordered[i - 1] >= gap)


def normalized(host: str | None) -> str | None:
    """The host as a rule would name it, or None when no rule could (not a valid name)."""
    if not host:
        return None
    try:
        return rules.normalize_host(host)
    except ValueError:
        return None


def suggest_toml(found: list[Suggestion]) -> Iterator[str]:
    """`[[allow]]` tables, refused in the most distinct minutes first, each with its counts in a
    comment; what the address guard would refuse is only named, never suggested."""
    yield "# Rules that would have allowed what claude-proxy refused, refused in the most separate"
    yield "# bursts first (repeats within a minute count once: any sandboxed process makes them)."
    yield "# Nothing is applied: review each, then add the ones you want to config.toml."
    suggested = [s for s in found if s.withheld is None]
    if not suggested:
        yield "# (no refusal that a rule could change)"
    for suggestion in suggested:
        ports = sorted(suggestion.ports)
        flags = " ".join(
            f"--allow {rule_text(suggestion.host, port, suggestion.ip)}" for port in ports
        )
        yield ""
        yield f"# {counts(suggestion)}; on the command line: {flags}"
        if suggestion.ip:
            yield "# An IP address: the address guard does not check a destination a rule names"
        yield "[[allow]]"
        yield f"{'ip' if suggestion.ip else 'host'} = {json.dumps(suggestion.host)}"
        yield f"ports = [{', '.join(map(str, ports))}]"
    for suggestion in (s for s in found if s.withheld is not None):
        shown = ", ".join(
            rule_text(suggestion.host, p, suggestion.ip) for p in sorted(suggestion.ports)
        )
        yield ""
        yield (
            f"# Not suggested: {shown} ({counts(suggestion)}): {suggestion.withheld}, which the "
            "address guard refuses; a rule naming it would let the sandbox reach it"
        )


def counts(suggestion: Suggestion) -> str:
    attempts = "attempt" if suggestion.count == 1 else "attempts"
    runs = "burst" if suggestion.bursts == 1 else "separate bursts"
    return (
        f"{suggestion.count} refused {attempts} in {suggestion.bursts} {runs}, "
        f"last {local(suggestion.last)}"
    )


def rule_text(host: str, port: int, ip: bool) -> str:
    return f"[{host}]:{port}" if ip and ":" in host else f"{host}:{port}"


def local(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment))


def as_json(row: sqlite3.Row) -> str:
    record = {key: row[key] for key in row.keys()}  # noqa: SIM118 - sqlite3.Row is no mapping
    record["time"] = datetime.fromtimestamp(row["time"], UTC).isoformat(timespec="milliseconds")
    return json.dumps(record, ensure_ascii=False)


# Terminal output


@dataclass(frozen=True)
class Layout:
    """Column widths; `width` None: no terminal, nothing is cut."""

    width: int | None
    destination: int
    path: int

    @classmethod
    def fit(cls, width: int | None, destinations: int = 30, paths: int = 20) -> Layout:
        """Widths for the longest destination and path, within `width` when there is one."""
        if width is None:
            return cls(None, min(destinations, 50), min(paths, 40))
        rest = max(0, width - PREFIX - 2)
        destination = min(destinations, max(12, rest * 2 // 5))
        path = min(paths, max(6, (rest - destination) // 2))
        return cls(width, destination, path)

    def line(self, *cells: str) -> str:
        """TIME DECISION STATUS METHOD DESTINATION PATH WHY, each cut to its column."""
        when, decision, status, method, destination, path, why = cells
        fit = self.width is not None
        text = (
            f"{when:<14}  {decision:<5} {status:>3} {pad(method, 7, True)} "
            f"{pad(destination, self.destination, fit)} {pad(path, self.path, fit)} {why}"
        )
        return clip(text.rstrip(), self.width)


def pad(text: str, size: int, fit: bool) -> str:
    """`text` padded to `size`, or cut to it (ending in …) when it must fit."""
    if fit and len(text) > size:
        return text[: max(0, size - 1)] + "…"
    return text.ljust(size)


def clip(text: str, width: int | None) -> str:
    if width is None or len(text) <= width:
        return text
    return text[: max(0, width - 1)] + "…"


def table(rows: Iterable[sqlite3.Row], layout: Layout, colour: bool) -> Iterator[str]:
    for row in rows:
        allowed = row["decision"] == "allow"
        if allowed:
            why = f"rule={row['rule']}"
            if row["reason"]:
                why += f"  {row['reason']}"
        else:
            why = row["reason"] or ""
        if "organization" in row.keys() and row["organization"]:  # noqa: SIM118 - not a dict
            why += f"  org={row['organization']}"
        word = "ALLOW" if allowed else "BLOCK"
        destination = "-" if row["host"] is None else f"{row['host']}:{row['port']}"
        text = layout.line(
            time.strftime("%m-%d %H:%M:%S", time.localtime(row["time"])),
            word,
            "-" if row["status"] is None else str(row["status"]),
            row["method"] or "-",
            destination,
            row["path"] or "-",
            why,
        )
        if colour:
            text = text.replace(word, f"{GREEN if allowed else RED}{word}{RESET}", 1)
            text = f"{DIM}{text[:14]}{RESET}{text[14:]}"
        yield text


def header(layout: Layout) -> str:
    return layout.line("TIME", "", "", "METHOD", "DESTINATION", "PATH", "RULE OR REASON")


def summary_lines(found: list[Refused], width: int | None) -> Iterator[str]:
    yield f"{'REFUSED':>7}  {'LAST SEEN':<19}  {'DESTINATION':<30}  LAST REASON"
    for group in found:
        destination = "-" if group.host is None else f"{group.host}:{group.port}"
        text = (
            f"{group.count:>7}  {local(group.last):<19}  "
            f"{pad(destination, 30, width is not None)}  {group.reason or ''}"
        )
        yield clip(text.rstrip(), width)


def summary_json(group: Refused) -> str:
    return json.dumps(
        {
            "host": group.host,
            "port": group.port,
            "refused": group.count,
            "last": datetime.fromtimestamp(group.last, UTC).isoformat(timespec="milliseconds"),
            "reason": group.reason,
        },
        ensure_ascii=False,
    )


def terminal_width(out: TextIO) -> int | None:
    """Columns to fit: COLUMNS, else the terminal's; None when the output is no terminal."""
    if columns := os.environ.get("COLUMNS", "").strip():
        return int(columns) if columns.isdigit() and int(columns) > 0 else None
    if not out.isatty():
        return None
    try:
        return os.get_terminal_size(out.fileno()).columns
    except OSError:
        return None


def wants_colour(out: TextIO) -> bool:
    return out.isatty() and not os.environ.get("NO_COLOR")


# The command


@dataclass(frozen=True)
class Request:
    selection: Selection
    limit: int = 50
    json: bool = False
    mode: str = "table"  # table, follow, summary, suggest


def show(path: Path, request: Request, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    conn = connect(path)
    if conn is None and request.mode != "follow":
        print(
            f"claude-proxy: no audit log yet at {path} (the proxy writes it from its first "
            "decision)",
            file=sys.stderr,
        )
        return 0
    if conn is None:
        print(f"claude-proxy: waiting for {path}", file=sys.stderr)
    while conn is None:
        time.sleep(FOLLOW_SECONDS)
        conn = connect(path)
    try:
        return _show(conn, request, out)
    except sqlite3.Error as e:
        raise unreadable(path, e) from None
    finally:
        conn.close()


def _show(conn: sqlite3.Connection, request: Request, out: TextIO) -> int:
    width, colour = terminal_width(out), wants_colour(out)
    selection = request.selection
    if request.mode == "suggest":
        for line in suggest_toml(suggestions(conn, selection)):
            print(line, file=out)
        return 0
    if request.mode == "summary":
        found = refused(conn, selection)
        lines = map(summary_json, found) if request.json else summary_lines(found, width)
        for line in lines:
            print(line, file=out)
        return 0
    rows = latest(conn, selection, request.limit)
    if request.json:
        layout = Layout.fit(width)
    else:
        longest = max((len(f"{r['host']}:{r['port']}") for r in rows), default=11)
        paths = max((len(r["path"] or "-") for r in rows), default=4)
        layout = (
            Layout.fit(width) if request.mode == "follow" else Layout.fit(width, longest, paths)
        )
        print(header(layout), file=out)
    emit(rows, layout, request.json, colour, out)
    if request.mode != "follow":
        return 0
    last_id = rows[-1]["id"] if rows else 0
    if not rows:
        last_id = conn.execute("SELECT coalesce(max(id), 0) FROM decisions").fetchone()[0]
    while True:  # until Ctrl-C
        time.sleep(FOLLOW_SECONDS)
        if rows := after(conn, selection, last_id):
            emit(rows, layout, request.json, colour, out)
            last_id = rows[-1]["id"]


def emit(
    rows: list[sqlite3.Row], layout: Layout, as_lines: bool, colour: bool, out: TextIO
) -> None:
    lines = map(as_json, rows) if as_lines else table(rows, layout, colour)
    for line in lines:
        print(line, file=out)
    out.flush()


# `claude-proxy status`


def describe(path: Path) -> tuple[bool, str]:
    """One line for `status`: where the database is, its rows, and what the writer dropped."""
    try:
        conn = connect(path)
        if conn is None:
            return True, f"{path} (not written yet)"
        try:
            count = conn.execute("SELECT count(*) FROM decisions").fetchone()[0]
            writer = None
            if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'writer'").fetchone():
                writer = conn.execute("SELECT pid, dropped FROM writer WHERE id = 1").fetchone()
        finally:
            conn.close()
    except ProxyError as e:
        return False, str(e)
    except sqlite3.Error as e:
        return False, str(unreadable(path, e))
    detail = f"{path}: {count} decisions"
    if writer is not None:
        pid, dropped = writer
        who = "the running proxy" if alive(pid) else "the last proxy"
        detail += f"; {who} (pid {pid}) dropped {dropped}"
    return True, detail


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
