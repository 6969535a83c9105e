"""Logging, configured once: stderr and a size-capped rotating file in the log folder."""

from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(message)s"
MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 5


def configure(log_file: Path | None, *, verbose: bool = False, quiet: bool = False) -> None:
    """Decision lines and our own messages at INFO; mitmproxy's from WARNING (INFO with -v).

    mitmproxy's DEBUG output can carry request details, so it is never enabled.
    """
    formatter = logging.Formatter(FORMAT)
    console = logging.StreamHandler()
    if quiet:  # under launchd, stderr is a file that is never rotated: warnings only
        console.setLevel(logging.WARNING)
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                log_file, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8"
            )
        )
        os.chmod(log_file, 0o600)
    root = logging.getLogger()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    set_verbose(verbose)


def set_verbose(verbose: bool) -> None:
    """Our messages at DEBUG and mitmproxy's at INFO, or ours at INFO and its from WARNING."""
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("mitmproxy", "asyncio", "hpack", "passlib"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
