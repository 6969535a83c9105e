"""What a test session builds once, shared by its parallel workers (pytest-xdist)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

import pytest


def built_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Path]) -> Path:
    """`build(folder)`'s answer, built by the first worker to ask and reused by the others.

    Workers of one session share their base temporary folder's parent (each has its own folder
    under it); the first takes a lock on `name` there, builds, and marks the folder done. A
    build that fails leaves no mark: the next worker to ask builds again, and fails alike. Run
    without workers, the folder is the session's own, as any session-scoped fixture's.
    """
    root = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if done.exists():
            return Path(done.read_text())
        folder.mkdir(exist_ok=True)
        answer = build(folder)
        done.write_text(str(answer))
        return answer


# Tests that put the proxy under memory or descriptor pressure, or measure what it holds, run one
# after another on one worker (pyproject's `--dist loadgroup`): never two such loads at once.
ONE_AT_A_TIME = pytest.mark.xdist_group("pressure")
