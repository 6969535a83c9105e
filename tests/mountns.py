"""A private mount namespace whose /etc is an overlay, for the managed settings file.

`setup claude-code --managed` writes /etc/claude-code/managed-settings.json and Claude Code reads
it from there: run both inside the namespace, and both use the real path while this machine's /etc
stays untouched. Needs root (CI and this machine run the suite as root) and util-linux.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path


class MountNamespace:
    """A private mount namespace whose /etc is an overlay: a managed-settings file written there
    is at the real path Claude Code reads (/etc/claude-code), and the machine's /etc is untouched.
    Commands run inside it through nsenter."""

    def __init__(self, work: Path) -> None:
        upper, scratch = work / "upper", work / "work"
        upper.mkdir(parents=True)
        scratch.mkdir()
        mount = (
            f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={scratch} /etc"
            " && echo ready && exec sleep 3600"
        )
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()  # returns at "ready", or at EOF when mount fails
        if line.strip() != "ready":
            self.holder.wait(10)
            assert self.holder.stderr is not None
            raise OSError(f"cannot make a mount namespace: {self.holder.stderr.read().strip()}")
        self.upper = upper

    def command(self, argv: Sequence[str], cwd: Path) -> list[str]:
        """Entering a mount namespace moves a process to its root: --wd takes it back to `cwd`."""
        return ["nsenter", f"--target={self.holder.pid}", "--mount", f"--wd={cwd}", "--", *argv]

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait(10)

    def __enter__(self) -> MountNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
