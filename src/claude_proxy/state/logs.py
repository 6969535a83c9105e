"""Logging, configured once: stderr and a size-capped rotating file in the log folder.

The log never stops the proxy: a file that cannot be written is one line on stderr, then
silence until it can be written again. Under launchd, stderr is a file that is never rotated,
so `--quiet` lets only errors through, and identical lines are summarised, not repeated.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(message)s"
MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 5
WINDOW_SECONDS = 60.0  # identical console lines: one per window, then a count
CONSOLE_BURST = 10  # at most this many warnings and errors on stderr per window
NOTICE_SECONDS = 60.0  # at most one "cannot write the log file" line per minute


def configure(
    log_file: Path | None,
    *,
    verbose: bool = False,
    quiet: bool = False,
) -> None:
    """Decision lines and our own messages at INFO (DEBUG with -v); mitmproxy's from WARNING.

    mitmproxy's INFO and DEBUG output can carry request details, so neither is ever enabled.
    """
    formatter = logging.Formatter(FORMAT)
    console = logging.StreamHandler()
    console.addFilter(Calm())
    if quiet:  # under launchd, stderr is a file that is never rotated: errors only
        console.setLevel(logging.ERROR)
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        handlers.append(PrivateLogFile(log_file, max_bytes=MAX_BYTES))
    root = logging.getLogger()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    set_verbose(verbose)


def set_verbose(verbose: bool) -> None:
    """Our messages at DEBUG with -v, else at INFO; mitmproxy's from WARNING, always: its INFO
    lines quote request lines as they came (userinfo passwords, query strings, control bytes)."""
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("claude_proxy").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("mitmproxy", "asyncio", "hpack", "passlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class PrivateLogFile(logging.handlers.RotatingFileHandler):
    """The rotating log: files 0600 in a 0700 folder, after any rotation too.

    When it cannot be written (a full disk, a folder that is not writable) it says so once on
    stderr and drops lines until a write works again, which it also says; no traceback, ever.
    """

    def __init__(
        self, path: Path, *, max_bytes: int = MAX_BYTES, notices: TextIO | None = None
    ) -> None:
        self.notices = notices
        self.broken: str | None = None  # why the last write failed; None while it works
        self.announced = False  # whether that failure was said on stderr
        self.last_notice = -NOTICE_SECONDS
        self.failed = False
        super().__init__(
            path, maxBytes=max_bytes, backupCount=BACKUPS, encoding="utf-8", delay=True
        )
        for number in range(1, BACKUPS + 1):  # kept from before: as private as the new ones
            with contextlib.suppress(OSError):
                os.chmod(f"{self.baseFilename}.{number}", 0o600)
        self.acquire()
        try:
            self.stream = self._open()  # at start, so that a problem is reported at once
        except OSError as e:
            self.fail(e)
        finally:
            self.release()

    def _open(self) -> io.TextIOWrapper:  # as logging.FileHandler opens it
        folder = Path(self.baseFilename).parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.stat().st_mode & 0o077:
            os.chmod(folder, 0o700)
        stream = super()._open()
        os.chmod(self.baseFilename, 0o600)
        return stream

    def emit(self, record: logging.LogRecord) -> None:
        self.failed = False
        super().emit(record)
        if not self.failed and self.broken is not None:
            self.broken = None
            if self.announced:
                self.notice(f"the log file {self.baseFilename} is written again")

    def handleError(self, record: logging.LogRecord) -> None:
        self.fail(sys.exc_info()[1])

    def fail(self, error: BaseException | None) -> None:
        self.failed = True
        if self.stream is not None:
            # Its buffer could not be written either: those lines are lost.
            with contextlib.suppress(OSError, ValueError):
                self.stream.close()
            self.stream = None  # the next record opens it again
        if self.broken is None:
            why = getattr(error, "strerror", None) or str(error) or type(error).__name__
            self.broken = why
            now = time.monotonic()
            self.announced = now - self.last_notice >= NOTICE_SECONDS
            if self.announced:
                self.last_notice = now
                self.notice(
                    f"cannot write the log file {self.baseFilename} ({why}); the proxy keeps "
                    "serving, and log lines are lost until it can"
                )

    def notice(self, text: str) -> None:
        stream = self.notices or sys.stderr
        with contextlib.suppress(OSError, ValueError):  # stderr cannot be written either
            stream.write(f"claude-proxy: {text}\n")
            stream.flush()


class Calm(logging.Filter):
    """The console's filter: warnings and errors that repeat are summarised, and bursts capped.

    Decision lines (INFO) pass untouched. An identical warning or error within WINDOW_SECONDS of
    the last one shown is held back and counted; the next one shown after the window says how
    many were held back. Beyond CONSOLE_BURST lines in a window, the rest are counted too.
    """

    def __init__(self, clock: object = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self.shown: dict[tuple[int, str], float] = {}  # message → when it was last shown
        self.held: dict[tuple[int, str], int] = {}  # message → repeats held back since
        self.window_start = -WINDOW_SECONDS
        self.in_window = 0
        self.dropped = 0  # lines held back by the burst cap in the last window

    def filter(self, record: logging.LogRecord) -> bool | logging.LogRecord:
        if record.levelno < logging.WARNING:
            return True
        now: float = self.clock()  # type: ignore[operator]
        key = (record.levelno, record.getMessage())
        last = self.shown.get(key)
        if last is not None and now - last < WINDOW_SECONDS:
            self.held[key] = self.held.get(key, 0) + 1
            return False
        if now - self.window_start >= WINDOW_SECONDS:
            self.window_start, self.in_window = now, 0
        if self.in_window >= CONSOLE_BURST:
            self.dropped += 1
            return False
        self.in_window += 1
        self.shown[key] = now
        if len(self.shown) > 1000:  # bounded: forget messages not seen for a window
            self.shown = {k: t for k, t in self.shown.items() if now - t < WINDOW_SECONDS}
        notes = []
        if repeats := self.held.pop(key, 0):
            notes.append(f"repeated {repeats} more times since it was last shown")
        if self.dropped:
            notes.append(f"{self.dropped} other warnings and errors were not shown")
            self.dropped = 0
        if not notes:
            return True
        shown = copy.copy(record)  # this handler's copy: the log file keeps the original
        shown.msg, shown.args = f"{record.getMessage()} ({'; '.join(notes)})", None
        return shown
