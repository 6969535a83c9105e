"""Every decision: one log line, and one row in the audit database, made in one place.

Never headers, bodies, query strings or anything else secret, in either.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy.context import Context

from claude_proxy.defaults import PROBE_HEADER
from claude_proxy.policy.rules import Decision
from claude_proxy.proxy.listeners import format_address
from claude_proxy.proxy.org_probe import ORG_HEADER
from claude_proxy.record import audit_db
from claude_proxy.state import accounts, paths

logger = logging.getLogger("claude_proxy.decisions")

MAX_FIELD = 200
FAILURE = "claude_proxy.failure"  # flow.metadata: why an allowed request got no upstream answer
REFUSED = "claude_proxy.refused"  # flow.metadata: why an allowed request was refused on its way up
SENT_UP = "claude_proxy.bytes_up"  # flow.metadata: the request body's BodyCount
SENT_DOWN = "claude_proxy.bytes_down"  # flow.metadata: the response body's BodyCount
FINGERPRINTS = "claude_proxy.fingerprints"  # flow.metadata: the credentials' (OrgGuard's)
LISTENERS = {"regular": "http"}  # mitmproxy's mode names, as the audit log calls them
SUMMARY_SECONDS = 10  # refusals alike within this long: one line and one row, with a count
MAX_RUNS = 4096  # refusal runs followed at once; past it the oldest is summed up early


class Repeats:
    """Refusals alike (one client address, one destination, one reason) within `interval`: the
    first is logged and recorded as usual, the rest are counted, and one line and one row with
    the count follow when the interval ends. A flood costs a line per interval and erases nothing.
    """

    def __init__(self, interval: float, summarize: Callable[..., None]) -> None:
        self.interval = interval
        self.summarize = summarize  # (more, seconds, **fields): the run's one line and row
        self.runs: dict[tuple[Any, ...], list[Any]] = {}  # key → [started, last, more, fields]

    def counted(self, key: tuple[Any, ...], now: float, fields: dict[str, Any]) -> bool:
        """Whether this refusal is one more of a run (counted, not logged)."""
        run = self.runs.get(key)
        if run is not None and now - run[0] < self.interval:
            run[1], run[2] = now, run[2] + 1
            return True
        if run is not None:
            self._close(key)
        if len(self.runs) >= MAX_RUNS:
            self._close(next(iter(self.runs)))
        self.runs[key] = [now, now, 0, fields]
        return False

    def flush(self, now: float) -> None:
        for key in [k for k, run in self.runs.items() if now - run[0] >= self.interval]:
            self._close(key)

    def _close(self, key: tuple[Any, ...]) -> None:
        started, last, more, fields = self.runs.pop(key)
        if more:
            self.summarize(more, last - started, **fields)


def printable(text: str) -> str:
    """`text` safe for one log line: control characters escaped, length capped."""
    if text.isprintable() and len(text) <= MAX_FIELD:
        return text
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= MAX_FIELD else escaped[: MAX_FIELD - 1] + "…"


class BodyCount:
    """A `stream` function for mitmproxy that passes a body on and counts its bytes."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        self.size = 0

    def __call__(self, chunk: bytes) -> bytes:
        self.size += len(chunk)
        return chunk


def count_body(flow: http.HTTPFlow, key: str) -> BodyCount:
    """Stream a body through a counter kept in the flow's metadata under `key`."""
    counter = flow.metadata[key] = BodyCount()
    return counter


def loggable_path(target: str) -> str:
    """The path without what may carry a secret: the query, a fragment, and every segment's
    parameters (`;jsessionid=…`)."""
    path = re.split(r"[?#]", target, maxsplit=1)[0]
    return re.sub(r";[^/]*", "", path) or "/"


PROBE_REASON = "claude-proxy status probe"  # the audit row of a proven probe


def proves_probe(shown: str | bytes | None) -> bool:
    """Whether `shown` (hex, or raw bytes in SOCKS) is the status probe's proof."""
    if not shown:
        return False  # every CONNECT but status's own: no key to read
    proof = accounts.probe_proof(paths.state_dir())
    if proof is None:
        return False
    expected = proof.hex().encode() if isinstance(shown, str) else proof
    given = shown.encode("ascii", "replace") if isinstance(shown, str) else shown
    return hmac.compare_digest(given, expected)


@dataclass(frozen=True)
class Unadmitted:
    """A client refused on its raw socket, before mitmproxy made a connection of it."""

    peername: tuple[str, int]
    mode: str  # the listener's mitmproxy mode name: "regular" or "socks5"


def who(client: connection.Client | Unadmitted | None) -> tuple[Any, str | None]:
    """A client's address and the mode name of the listener it came to."""
    if client is None:
        return None, None
    if isinstance(client, Unadmitted):
        return client.peername, client.mode
    return client.peername, client.proxy_mode.type_name


class Recorder:
    """Writes every decision's log line and audit row; one per proxy (`service.build_master`
    makes it and hands it to every part that decides). The AuditLog addon opens and closes its
    writer and its refusal runs with the proxy."""

    def __init__(self) -> None:
        self.writer: audit_db.Writer | None = None  # the audit database, while the proxy runs
        self.repeats: Repeats | None = None  # refusals alike, summed up

    def summary(self, more: int, seconds: float, **fields: Any) -> None:
        """The line and the row that close a run of refusals alike: how many more there were."""
        decision: Decision = fields["decision"]
        reason = f"{decision.reason} ({more} more like it in {seconds:.0f} s)"
        logger.info(
            'BLOCK %s %s %s %s "%s"',
            printable(fields["method"]),
            fields["destination"],
            printable(fields["path"]),
            "-" if fields["status"] is None else fields["status"],
            printable(reason),
        )
        if (writer := self.writer) is not None:
            writer.submit(
                audit_db.Record(
                    time=time.time(),
                    client=fields["client"],
                    listener=fields["listener"],
                    method=None if fields["method"] == "-" else printable(fields["method"]),
                    host=fields["host"],
                    port=fields["port"],
                    path=None if fields["path"] == "-" else printable(fields["path"]),
                    decision="block",
                    rule=decision.rule,
                    reason=printable(reason),
                    status=fields["status"] if isinstance(fields["status"], int) else None,
                    bytes_up=0,
                    bytes_down=0,
                    duration_ms=0,
                    organization=fields["organization"],
                    fingerprint=fields["fingerprint"],
                )
            )

    def block(
        self,
        status: int | None,
        reason: str,
        context: Context | None = None,
        since: float | None = None,
        client: connection.Client | Unadmitted | None = None,
    ) -> None:
        """A refusal by one of the proxy's limits (no rule of the policy): one decision line.
        The destination is known inside a tunnel only; `since` is the monotonic time the refused
        request began."""
        host, port = (context.server.address if context is not None else None) or (None, None)
        started = time.time() - (time.monotonic() - since if since is not None else 0)
        client = context.client if context is not None else client
        refused = Decision(False, reason)
        self.line("-", host, port, "-", status, refused, started=started, client=client)

    def decision(
        self,
        flow: http.HTTPFlow,
        decision: Decision,
        *,
        host: str,
        port: int,
        status: int | None,
        organization: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        request = flow.request
        path = "-" if request.method == "CONNECT" else loggable_path(request.path)
        up, down = flow.metadata.get(SENT_UP), flow.metadata.get(SENT_DOWN)
        response = flow.response
        if found := flow.metadata.get(FINGERPRINTS):
            fingerprint = fingerprint or ",".join(found)
            if organization is None and response is not None and len(set(found)) == 1:
                # Anthropic names the organization of the one credential in every answer.
                organization = accounts.organization(response.headers.get(ORG_HEADER))
        if down is None and response is not None:
            down_size = len(response.raw_content or b"")  # our own answer: a refusal, a 504
        else:
            down_size = down.size if down is not None else 0
        probe = request.method == "CONNECT" and proves_probe(request.headers.get(PROBE_HEADER))
        self.line(
            request.method,
            host,
            port,
            path,
            status,
            decision,
            started=request.timestamp_start,
            failure=flow.metadata.get(FAILURE),
            client=flow.client_conn,
            bytes_up=up.size if up is not None else 0,
            bytes_down=down_size,
            organization=organization,
            fingerprint=fingerprint,
            probe=probe,
        )

    def line(
        self,
        method: str,
        host: str | None,
        port: int | None,
        path: str,
        status: int | str | None,
        decision: Decision,
        *,
        started: float,
        failure: str | None = None,
        client: connection.Client | Unadmitted | None = None,
        bytes_up: int | None = None,
        bytes_down: int | None = None,
        organization: str | None = None,
        fingerprint: str | None = None,
        probe: bool = False,
    ) -> None:
        """One decision: `method` is the HTTP method, how a tunnel was asked for (SOCKS5), or "-".

        `host` None: the destination is not known. `client` gives the audit row its address and
        listener; `organization` and `fingerprint` (of a credential, never the credential) are for
        the exfiltration guard. A tunnel `claude-proxy status` opens (`probe`) is no one's traffic:
        when allowed, it is logged at DEBUG, marked, and not recorded. Its requests, if any were
        sent, would each be logged as usual; a refused probe is a decision like any other.
        """
        now = time.time()
        if not decision.allowed and (repeats := self.repeats) is not None:
            peer, mode = who(client)
            fields: dict[str, Any] = {  # each capped (printable): a run costs a few hundred bytes
                "method": printable(method),
                "destination": "-" if host is None else f"{printable(host)}:{port}",
                "host": None if host is None else printable(host),
                "port": port,
                "path": printable(path),
                "status": status,
                "decision": Decision(False, printable(decision.reason), decision.rule),
                "client": str(peer[0]) if peer else None,
                "listener": LISTENERS.get(mode, mode) if mode else None,
                "organization": printable(organization) if organization else None,
                "fingerprint": printable(fingerprint) if fingerprint else None,
            }
            key = (
                *(fields[k] for k in ("client", "listener", "method", "destination", "path")),
                status,
                fields["decision"].reason,
                printable(failure) if failure else None,
                fields["organization"],
                fields["fingerprint"],  # a refusal under another credential is another run
            )
            if repeats.counted(key, now, fields):
                return
        elapsed_ms = (now - started) * 1000
        why = f"rule={decision.rule}" if decision.allowed else f'"{printable(decision.reason)}"'
        if failure:
            why += f' "{printable(failure)}"'
        quiet = probe and decision.allowed  # no one's traffic: at DEBUG, and recorded as a probe
        logger.log(
            logging.DEBUG if quiet else logging.INFO,
            "%s%s %s %s %s %s %s %.0fms",
            "probe: " if quiet else "",
            "ALLOW" if decision.allowed else "BLOCK",
            printable(method),
            "-" if host is None else f"{printable(host)}:{port}",
            printable(path),
            "-" if status is None else status,
            why,
            elapsed_ms,
        )
        if (writer := self.writer) is None:
            return
        try:
            peer, mode = who(client)
            reason = failure if decision.allowed else decision.reason
            if failure and not decision.allowed:
                reason = f"{decision.reason}; {failure}"
            if quiet:
                reason = PROBE_REASON
            writer.submit(
                audit_db.Record(
                    time=now,
                    client=format_address(str(peer[0]), int(peer[1])) if peer else None,
                    listener=LISTENERS.get(mode, mode) if mode else None,
                    method=None if method == "-" else printable(method),
                    host=None if host is None else printable(host),
                    port=port,
                    path=None if path == "-" else printable(path),
                    decision="allow" if decision.allowed else "block",
                    rule=decision.rule,
                    reason=printable(reason) if reason else None,
                    status=status if isinstance(status, int) else None,
                    bytes_up=bytes_up,
                    bytes_down=bytes_down,
                    duration_ms=round(elapsed_ms),
                    organization=printable(organization) if organization else None,
                    fingerprint=printable(fingerprint) if fingerprint else None,
                )
            )
        except Exception as e:  # the audit row is a record, never a reason to fail a decision
            writer.refused += 1
            if not writer.record_failed:
                writer.record_failed = True
                logger.warning("audit log: a decision could not be recorded: %r", e)


class AuditLog:
    """Runs the recorder's audit database writer and refusal runs for as long as the proxy runs."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.flusher: asyncio.Task[None] | None = None

    def load(self, loader: Any) -> None:
        loader.add_option(
            "sandbox_audit",
            bool,
            True,
            "Record every decision in the audit database (`claude-proxy log` reads it).",
        )
        loader.add_option(
            "sandbox_audit_days",
            int,
            int(audit_db.Retention.max_age // audit_db.DAY),
            "Days the audit database keeps a decision.",
        )
        loader.add_option(
            "sandbox_audit_max_mb",
            int,
            audit_db.Retention.max_bytes // audit_db.MIB,
            "Megabytes the audit database may hold; the oldest decisions go first.",
        )
        loader.add_option(
            "sandbox_refusal_summary_seconds",
            int,
            SUMMARY_SECONDS,
            "Refusals alike (one client, destination and reason) within this many seconds make "
            "one log line and one audit row as they come, and one more with their count; 0: "
            "every refusal its own line and row.",
        )

    def configure(self, updated: set[str]) -> None:
        seconds = "sandbox_refusal_summary_seconds"
        if seconds in updated and ctx.options.sandbox_refusal_summary_seconds < 0:
            raise exceptions.OptionsError(f"{seconds} must be 0 (each refusal a line) or more")
        if updated & {"sandbox_audit_days", "sandbox_audit_max_mb"}:
            if ctx.options.sandbox_audit_days < 1 or ctx.options.sandbox_audit_max_mb < 1:
                raise exceptions.OptionsError(
                    "sandbox_audit_days and sandbox_audit_max_mb must be at least 1"
                )
            if self.recorder.writer is not None:
                self.recorder.writer.retention = retention()

    def running(self) -> None:
        recorder = self.recorder
        if ctx.options.sandbox_audit and recorder.writer is None:
            recorder.writer = audit_db.Writer(paths.audit_db(), retention())
            recorder.writer.start()
        if ctx.options.sandbox_refusal_summary_seconds > 0:
            repeats = Repeats(ctx.options.sandbox_refusal_summary_seconds, recorder.summary)
            recorder.repeats = repeats
            self.flusher = asyncio.get_running_loop().create_task(self._flush(repeats))

    async def _flush(self, repeats: Repeats) -> None:
        while True:
            await asyncio.sleep(repeats.interval / 2)
            try:
                repeats.flush(time.time())
            except Exception:
                logger.exception("summing up repeated refusals failed")

    def done(self) -> None:
        recorder = self.recorder
        repeats, recorder.repeats = recorder.repeats, None
        if self.flusher is not None:
            self.flusher.cancel()
        if repeats is not None:
            repeats.flush(float("inf"))  # every run still counting: its line and row now
        writer, recorder.writer = recorder.writer, None
        if writer is not None:
            writer.stop()


def retention() -> audit_db.Retention:
    return audit_db.Retention(
        max_age=ctx.options.sandbox_audit_days * audit_db.DAY,
        max_bytes=ctx.options.sandbox_audit_max_mb * audit_db.MIB,
    )
