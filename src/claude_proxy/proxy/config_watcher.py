"""Live reload: the running proxy follows config.toml within a second, or at once on SIGHUP.

The file is polled (its mtime, size and inode, every half second; no inotify or kqueue, so it
works alike on macOS and Linux, and an editor that saves by renaming a new file over the old one
is seen too). A change must hold still for a moment before it is read. Only a valid file
replaces the policy; a broken one leaves the policy in force and logs one line with FILE:LINE.
The outcome is published for `status` (run_state).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from claude_proxy.mitm.connections import SOCKS5, Connections
from claude_proxy.policy import config_file
from claude_proxy.policy.config_file import Config, ConfigError
from claude_proxy.policy.rules import Policy
from claude_proxy.proxy.enforcer import Enforcer
from claude_proxy.record.throttle import Throttle
from claude_proxy.state import files, logs, run_state

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
SETTLE_SECONDS = 0.1  # a change must hold still this long before it is read
SETTLE_TRIES = 20
# A file written this recently may change again without its mtime changing (the clock that
# stamps it is coarse): until then its bytes are compared too.
RACY_NS = 2_000_000_000
UNKNOWN = (-1, -1, -1)  # not looked at yet

Signature = tuple[int, int, int] | None  # (mtime_ns, size, inode); None: there is no file


def signature(path: Path) -> Signature:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ConfigWatcher:
    """Keeps the Enforcer's policy in step with config.toml (a mitmproxy addon for its hooks)."""

    def __init__(
        self,
        path: Path,
        flags: Sequence[str],
        enforcer: Enforcer,
        loaded: Config,
        connections: Connections | None = None,  # where the proxy listens, for the run state
    ) -> None:
        self.path = path
        self.connections = connections
        self.flags = tuple(flags)
        self.enforcer = enforcer
        self.current = loaded  # the config the policy in force was built from
        self.seen = loaded.digest  # the bytes last read, valid or not
        self.signature: Signature = UNKNOWN  # until `running` looks at the file
        self.last_failure: str | None = (
            None  # why the last reload failed (not `error`: a hook name)
        )
        self.loaded_at = time.time()
        self.port = 0
        self.socks_port: int | None = None
        self.forced = False
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None
        self.failures = Throttle()

    # mitmproxy hooks

    def running(self) -> None:
        for mode, (_, port) in self.connections.listen_addresses() if self.connections else ():
            if mode == SOCKS5:
                self.socks_port = self.socks_port or port
            elif not self.port:
                self.port = port
        # From here on a change is seen; one made since the policy was read is applied now.
        self.signature = signature(self.path)
        with contextlib.suppress(OSError):
            changed = hashlib.sha256(files.read_regular(self.path)).hexdigest() != self.seen
            self.forced = self.forced or changed
        self.publish()
        self.wake = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self.watch())

    def done(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.port:
            run_state.remove(self.port)

    # Triggers

    def reload_now(self) -> None:
        """SIGHUP: read the file at once, whether or not it seems to have changed."""
        self.forced = True
        if self.wake is not None:
            self.wake.set()

    async def watch(self) -> None:
        assert self.wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), POLL_SECONDS)
            self.wake.clear()
            try:
                if self.forced:
                    self.forced = False
                    await self.reload(forced=True)
                elif self.changed():
                    await self.settle()
                    await self.reload()
            except Exception as e:  # the watcher must outlive any surprise; the policy stays
                if self.failures.allow() is not None:
                    logger.error("config reload failed: %r; keeping the policy in force", e)

    def changed(self) -> bool:
        now = signature(self.path)
        if now != self.signature:
            return True
        if now is not None and time.time_ns() - now[0] < RACY_NS:
            with contextlib.suppress(OSError):
                return hashlib.sha256(files.read_regular(self.path)).hexdigest() != self.seen
        return False

    async def settle(self) -> None:
        """Wait until the file holds still (an editor may write it in several steps)."""
        before = signature(self.path)
        for _ in range(SETTLE_TRIES):
            await asyncio.sleep(SETTLE_SECONDS)
            now = signature(self.path)
            if now == before:
                return
            before = now

    # The reload itself

    async def reload(self, *, forced: bool = False) -> None:
        before = signature(self.path)
        try:
            data = files.read_regular(self.path)
        except FileNotFoundError:
            if self.signature is not None or forced:
                self.fail(f"{self.path} is gone")
            self.signature = None
            return
        came_back = self.signature is None  # it was gone: read it again, whatever it holds
        self.signature = before
        digest = hashlib.sha256(data).hexdigest()
        if digest == self.seen and not forced and not came_back:
            return
        self.seen = digest
        try:
            loaded, new = await asyncio.to_thread(self.build, data)
        except ConfigError as e:
            self.fail(str(e))
            return
        previous, self.current = self.current, loaded
        self.enforcer.use_policy(new)
        self.last_failure, self.loaded_at = None, time.time()
        warnings = f", {len(loaded.warnings)} warning(s)" if loaded.warnings else ""
        back = f"{self.path} is back; " if came_back else ""
        logger.info(
            "%spolicy reloaded from %s: %d rules%s", back, self.path, len(new.rules), warnings
        )
        if loaded.listen != previous.listen:
            logger.warning("[listen] changed in %s: it applies at the next start", self.path)
        if loaded.log_level != previous.log_level:
            logs.set_verbose(loaded.log_level == "debug")
        self.publish()

    def build(self, data: bytes) -> tuple[Config, Policy]:
        loaded = config_file.parse(self.path, data)
        return loaded, config_file.build_policy(loaded, self.flags)

    def fail(self, why: str) -> None:
        self.last_failure = why
        logger.error("%s; keeping the policy in force", why)
        self.publish()

    def publish(self) -> None:
        if not self.port:
            return
        try:
            run_state.write(
                run_state.RunState(
                    pid=os.getpid(),
                    port=self.port,
                    config=str(self.path),
                    digest=self.current.digest,
                    loaded_at=self.loaded_at,
                    rules=len(self.enforcer.policy.rules),
                    error=self.last_failure,
                    flags=self.flags,
                    socks_port=self.socks_port,
                )
            )
        except OSError as e:
            if self.failures.allow() is not None:
                logger.warning("cannot publish the config state: %s", e.strerror)
