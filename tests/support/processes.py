"""Starting a program as launchd or a terminal would limit it."""

from __future__ import annotations

import stat
from pathlib import Path


def limited(executable: Path, folder: Path, open_files: int) -> Path:
    """A stand-in for `executable` that runs it under a soft and hard open-files limit."""
    wrapper = folder / f"limited-{executable.parent.parent.name}-{executable.name}"
    limit = f"{open_files}:{open_files}"
    wrapper.write_text(f'#!/bin/sh\nexec prlimit --nofile={limit} "{executable}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return wrapper
