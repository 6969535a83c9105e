"""The cached hook dispatch calls what mitmproxy's own would, in the same order, and follows the
addons as they change: in a master here, and in the real proxy as a script is edited."""

from __future__ import annotations

import ast
import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from mitmproxy import exceptions, hooks, master, options
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook
from mitmproxy.proxy.server_hooks import ClientConnectedHook
from mitmproxy.test import tflow

import claude_proxy
from claude_proxy.mitm import hook_cache
from tests.conftest import start_proxy
from tests.upstream import Upstream

Calls = list[str]


class Recorder:
    def __init__(self, name: str, calls: Calls, children: list[Any] | None = None) -> None:
        self.name = name
        self.calls = calls
        self.addons = children or []

    def requestheaders(self, flow: object) -> None:
        self.calls.append(self.name)


class AsyncRecorder(Recorder):
    async def requestheaders(self, flow: object) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        self.calls.append(self.name)


class Failing(Recorder):
    def requestheaders(self, flow: object) -> None:
        self.calls.append(self.name)
        raise ValueError("a bug in an addon")


class Halting(Recorder):
    def requestheaders(self, flow: object) -> None:
        self.calls.append(self.name)
        raise exceptions.AddonHalt


def run_with_master(cached: bool, body: Callable[[master.Master], Awaitable[None]]) -> None:
    async def main() -> None:
        m = master.Master(options.Options(), with_termlog=False)
        if cached:
            hook_cache.install(m)
        await body(m)

    asyncio.run(main())


async def request_headers(m: master.Master) -> None:
    await m.addons.trigger_event(HttpRequestHeadersHook(tflow.tflow()))


@pytest.mark.parametrize("cached", [False, True], ids=["mitmproxy", "cached"])
def test_order_children_async_errors_and_halt(
    cached: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The order is the chain's, each addon before its children; a failing handler is logged and
    skips only the rest of its own addon; AddonHalt stops the hook."""
    calls: Calls = []

    async def body(m: master.Master) -> None:
        m.addons.add(
            Recorder("first", calls),
            Recorder("parent", calls, [AsyncRecorder("child", calls), Recorder("child2", calls)]),
            Recorder("holder", calls, [Failing("bug", calls), Recorder("after-bug", calls)]),
            Recorder("next", calls),
            Halting("halt", calls),
            Recorder("never", calls),
        )
        for _ in range(2):  # the second time from the cache
            await request_headers(m)

    with caplog.at_level(logging.ERROR):
        run_with_master(cached, body)
    once = ["first", "parent", "child", "child2", "holder", "bug", "next", "halt"]
    assert calls == once + once
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["Addon error: a bug in an addon"] * 2


@pytest.mark.parametrize("cached", [False, True], ids=["mitmproxy", "cached"])
def test_addons_added_and_removed_between_hooks(cached: bool) -> None:
    calls: Calls = []

    async def body(m: master.Master) -> None:
        first, late = Recorder("first", calls), Recorder("late", calls)
        m.addons.add(first)
        await request_headers(m)
        m.addons.add(late)
        await request_headers(m)
        m.addons.remove(first)
        await request_headers(m)
        # A parent that takes a child without the manager knowing (as ScriptLoader orders its
        # scripts): seen from the next configure hook on.
        late.addons.append(Recorder("adopted", calls))
        m.addons.trigger(hooks.ConfigureHook(set()))
        await request_headers(m)

    run_with_master(cached, body)
    assert calls == ["first", "first", "late", "late", "late", "adopted"]


def test_a_hook_no_addon_has_is_remembered_as_such() -> None:
    """The `update` hook after every flow hook, for one: no walk of the addons each time."""

    async def body(m: master.Master) -> None:
        m.addons.add(Recorder("only", []))
        await m.addons.trigger_event(ClientConnectedHook(tflow.tclient_conn()))
        assert isinstance(m.addons, hook_cache.CachedAddonManager)
        assert m.addons.handlers == {"client_connected": []}

    run_with_master(True, body)


class LogReader(Recorder):
    def add_log(self, entry: Any) -> None:
        self.calls.append(entry.msg)


@pytest.mark.parametrize("cached", [False, True], ids=["mitmproxy", "cached"])
def test_log_records_reach_no_addon(cached: bool) -> None:
    """Decision lines are not dispatched to every addon as the deprecated `add_log` hook."""
    calls: Calls = []

    async def body(m: master.Master) -> None:
        m.addons.add(LogReader("reader", calls))
        logging.getLogger("claude_proxy.test").warning("a decision line")
        for _ in range(3):  # what call_soon_threadsafe scheduled runs within these turns
            await asyncio.sleep(0)

    run_with_master(cached, body)
    assert any("a decision line" in call for call in calls) is not cached


def test_an_edited_script_takes_effect(
    home: Path, upstream: Upstream, upstream_ca_file: Path, tmp_path: Path
) -> None:
    """mitmproxy reloads a script when its file changes: the new handlers are the ones called."""
    script = tmp_path / "tag.py"
    source = 'def responseheaders(flow):\n    flow.response.headers["x-tag"] = "{}"\n'
    script.write_text(source.format("one"))
    proxy = start_proxy(home, upstream, upstream_ca_file, "--set", f"scripts={script}")
    try:
        with httpx.Client(proxy=proxy.url, verify=proxy.client_context(), timeout=10) as client:
            assert client.get("https://api.anthropic.com/v1/a").headers["x-tag"] == "one"
            script.write_text(source.format("two"))
            later = time.time() + 5
            os.utime(script, (later, later))  # a new modification time, however coarse the clock
            deadline = time.monotonic() + 20
            tags = []
            while not tags or tags[-1] != "two":
                assert time.monotonic() < deadline, f"the edit never took effect: {tags[-3:]}"
                tags.append(client.get("https://api.anthropic.com/v1/b").headers.get("x-tag"))
            assert set(tags) <= {"one", "two"}
    finally:
        assert proxy.stop() == 0


def test_no_attribute_of_ours_is_named_as_a_hook() -> None:
    """mitmproxy takes any attribute named as a hook for its handler: `self.error = "..."` on an
    addon made every failed flow log "Addon handler error (...) not callable" with a traceback."""
    package = Path(claude_proxy.__file__).parent
    found = []
    for source in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
                and node.attr in hooks.all_hooks
            ):
                found.append(f"{source.relative_to(package)}:{node.lineno}: self.{node.attr}")
    assert found == []
