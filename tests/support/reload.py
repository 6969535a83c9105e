"""Writing config.toml under a running proxy, and waiting until it is in force (the barrier is
the state file the proxy publishes)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import (
    ProxyProcess,
)

STATE_WAIT = 15  # seconds: generous on a loaded machine; a reload takes well under one


def config_file(home: Path) -> Path:
    return home / ".config" / "claude-proxy" / "config.toml"


def allowing(*hosts: str, comment: str = "") -> str:
    rules = "".join(f'[[allow]]\nhost = "{h}"\n' for h in hosts)
    return f"# {comment}\ndefaults = false\n{rules}"


def write_in_place(path: Path, text: str) -> None:
    with path.open("r+b") as file:
        file.truncate(0)
        file.write(text.encode())


def write_by_rename(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".new")
    partial.write_text(text)
    os.replace(partial, path)


def state(proxy: ProxyProcess) -> dict[str, object] | None:
    path = proxy.home / ".local" / "state" / "claude-proxy" / f"proxy-{proxy.port}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def wait_state(proxy: ProxyProcess, ready: Callable[[dict[str, object]], bool]) -> dict:
    """Barrier: the proxy has published a state that satisfies `ready`."""
    deadline = time.monotonic() + STATE_WAIT
    while time.monotonic() < deadline:
        if (found := state(proxy)) is not None and ready(found):
            return found
        time.sleep(0.02)
    raise AssertionError(f"the proxy never published the state expected; last: {state(proxy)}")


def wait_applied(proxy: ProxyProcess, text: str) -> None:
    digest = hashlib.sha256(text.encode()).hexdigest()
    wait_state(proxy, lambda s: s["digest"] == digest and s["error"] is None)
