"""mitmproxy's hook dispatch, with each hook's handlers looked up once instead of on every event.

On every hook (four or more per request, each followed by an `update` hook) mitmproxy walks every
addon and its children, asks each for a handler by name, and wraps each in a context manager and a
coroutine, whether or not it has one. That walk was the largest single cost of a keep-alive
request. Here the handlers of each hook are found once; the list is dropped whenever the set of
addons can change (an addon registered or removed, a script loaded, a configure, running or done
hook). The order, the handling of AddonHalt and the error log of a failing handler are mitmproxy's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from mitmproxy import exceptions, hooks, master
from mitmproxy.addonmanager import AddonManager, safecall

# Hooks around which the addons may change (ScriptLoader loads and orders scripts in them).
UNCACHED = frozenset({"load", "configure", "running", "done"})


class CachedAddonManager(AddonManager):
    def __init__(self, m: master.Master) -> None:
        super().__init__(m)
        # hook name → for each addon in the chain that has handlers: the handlers, in order
        self.handlers: dict[str, list[list[Callable[..., Any]]]] = {}

    def register(self, addon: Any) -> Any:
        self.handlers.clear()
        try:
            return super().register(addon)
        finally:
            self.handlers.clear()

    def remove(self, addon: Any) -> None:
        self.handlers.clear()
        try:
            super().remove(addon)
        finally:
            self.handlers.clear()

    def clear(self) -> None:
        super().clear()
        self.handlers.clear()

    def trigger(self, event: hooks.Hook) -> None:
        if event.name in UNCACHED:
            self.handlers.clear()
        super().trigger(event)

    async def trigger_event(self, event: hooks.Hook) -> None:
        if event.name in UNCACHED:
            self.handlers.clear()
            await super().trigger_event(event)
            self.handlers.clear()
            return
        chain = self.handlers.get(event.name)
        if chain is None:
            chain = self.handlers[event.name] = self._find(event)
        args = event.args()
        for funcs in chain:
            try:
                for func in funcs:
                    result = func(*args)
                    if result is not None and inspect.isawaitable(result):
                        await result
            except exceptions.AddonHalt:
                return
            except Exception:
                with safecall():  # mitmproxy's own log line and traceback (OptionsError goes on)
                    raise

    def _find(self, event: hooks.Hook) -> list[list[Callable[..., Any]]]:
        chain = []
        for addon in self.chain:
            with safecall():  # a handler that is not callable: logged, as mitmproxy does
                if funcs := [func for _, func in self._iter_hooks(addon, event)]:
                    chain.append(funcs)
        return chain


def install(m: master.Master) -> None:
    """Give a new master (no addons yet) the cached dispatch, without the deprecated `add_log`.

    mitmproxy turns every log record into an `add_log` hook: formatted a second time, then sent
    to the event loop through its self-pipe (a system call per decision line) and dispatched to
    every addon. No addon of ours has that hook; a script that does gets mitmproxy's deprecation
    warning when it loads, and no events.
    """
    assert not m.addons.chain, "install before adding addons"
    m._legacy_log_events.uninstall()
    m.options.changed.disconnect(m.addons._configure_all)
    m.addons = CachedAddonManager(m)
