"""What a running proxy says about its policy, for `status` and `config show`: a small JSON file.

One file per HTTP port (`proxy-PORT.json` in the state folder), written atomically by the proxy
whenever it loads its config or fails to, and removed when it stops. Pure Python.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import NamedTuple

from claude_proxy.state import files, paths


class RunState(NamedTuple):  # not a dataclass: `env` reads it, and dataclasses is slow to import
    pid: int
    port: int
    config: str  # the config file's path
    digest: str  # SHA-256 of the config the policy was built from; "" for no file
    loaded_at: float  # when that policy was loaded (epoch seconds)
    rules: int  # how many rules the policy has, defaults and flags included
    error: str | None = None  # why the last reload failed (FILE:LINE: …), None if it did not
    flags: tuple[str, ...] = ()  # the --allow rules the proxy was given
    socks_port: int | None = None  # where its SOCKS5 listener is (None: none, or an older proxy)

    def alive(self) -> bool:
        """Whether the proxy that wrote this still runs: its process, and its port listened on
        (a SIGKILL or a reboot leaves the file behind, and the pid may name another process)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return listened_on(self.port)


def listened_on(port: int) -> bool:
    """Whether something listens on `port` on a loopback address: a bind there is refused.
    Nothing connects to it, so the proxy sees nothing of the question."""
    import errno
    import socket  # here: `env` runs in every new shell

    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
    return False


def path_for(port: int, state_dir: Path | None = None) -> Path:
    return (state_dir or paths.state_dir()) / f"proxy-{port}.json"


def write(state: RunState, state_dir: Path | None = None) -> None:
    path = path_for(state.port, state_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    files.write_atomically(path, json.dumps(state._asdict(), indent=2).encode() + b"\n", 0o600)


def read(port: int, state_dir: Path | None = None) -> RunState | None:
    """The state the proxy on `port` published, if any and if that process still runs."""
    try:
        document = json.loads(path_for(port, state_dir).read_text())
        state = RunState(**{**document, "flags": tuple(document.get("flags", ()))})
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return state if state.alive() else None


def running(state_dir: Path | None = None) -> list[RunState]:
    """Every proxy that published its state and still runs."""
    folder = state_dir or paths.state_dir()
    found = []
    for path in sorted(folder.glob("proxy-*.json")):
        port = path.stem.removeprefix("proxy-")
        if port.isdigit() and (state := read(int(port), folder)) is not None:
            found.append(state)
    return found


def remove(port: int, state_dir: Path | None = None) -> None:
    with contextlib.suppress(OSError):
        path_for(port, state_dir).unlink()
