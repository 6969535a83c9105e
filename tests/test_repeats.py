"""A flood of refusals costs a line per interval and erases nothing: the first of a run is logged
and recorded as usual, the rest are counted, and one line and one row carry the count."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

import httpx

from tests.conftest import EXECUTABLE, ProxyFactory, read_head, send_connect

FLOOD = 200
DEADLINE = 15


def rows(home: Path) -> list[dict[str, object]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env["HOME"] = str(home)
    shown = subprocess.run(
        [str(EXECUTABLE), "log", "--json", "-n", "0", "--host", "flood.example"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return [json.loads(line) for line in shown.stdout.splitlines()]


def test_a_flood_of_refusals_is_one_line_and_one_row_with_a_count(
    module_proxy: ProxyFactory,
) -> None:
    proxy = module_proxy("--set", "sandbox_refusal_summary_seconds=2")
    began = time.monotonic()
    for _ in range(FLOOD):
        with send_connect(proxy, b"flood.example:443") as sock:
            assert read_head(sock).startswith(b"HTTP/1.1 403")
    runs = math.ceil((time.monotonic() - began) / 2) + 1  # a run lasts 2 s
    deadline = time.monotonic() + DEADLINE
    while accounted(proxy.stderr) < FLOOD:  # barrier: every run's interval has ended
        assert time.monotonic() < deadline, f"{accounted(proxy.stderr)} of {FLOOD} accounted"
        time.sleep(0.05)
    lines = [line for line in proxy.stderr if "flood.example" in line]
    assert len(lines) <= 2 * runs, lines  # a line and a summary per 2 s, not one per refusal
    assert (
        'BLOCK CONNECT flood.example:443 - 403 "flood.example is not on the allowlist"'
        in (lines[0])
    )
    assert "more like it in " in lines[1]
    assert proxy.stop() == 0  # every row written
    found = rows(proxy.home)
    reasons = sorted(str(r["reason"]) for r in found)
    counted = [int(r.split("(", 1)[1].split()[0]) for r in reasons if "more like it" in r]
    assert len(found) - len(counted) + sum(counted) == FLOOD  # every refusal is accounted for
    assert len(found) == len(lines)


def accounted(stderr: list[str]) -> int:
    """Refusals the log lines stand for: one each, plus each summary's count."""
    total = 0
    for line in stderr:
        if "flood.example" in line:
            total += 1
            if "more like it in " in line:
                total += int(line.split("(")[-1].split()[0]) - 1
    return total


def test_a_run_is_per_credential_and_its_summary_names_it(module_proxy: ProxyFactory) -> None:
    """A refusal under another key is another run: the summary cannot hide which one was used."""
    proxy = module_proxy("--set", "sandbox_refusal_summary_seconds=2")
    body = json.dumps(
        {
            "model": "m",
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "hi"}],
            "mcp_servers": [{"type": "url", "url": "https://exfil.example/", "name": "m"}],
        }
    ).encode()
    with httpx.Client(proxy=proxy.url, verify=proxy.client_context(), timeout=30) as client:
        for key in ["sk-ant-api03-AAAA", *["sk-ant-api03-BBBB"] * 3]:
            response = client.post(
                "https://api.anthropic.com/v1/messages", content=body, headers={"x-api-key": key}
            )
            assert response.status_code == 403
    deadline = time.monotonic() + DEADLINE
    while not any("(2 more like it in " in line for line in proxy.stderr):
        assert time.monotonic() < deadline, "no summary line"
        time.sleep(0.05)
    assert proxy.stop() == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env["HOME"] = str(proxy.home)
    shown = subprocess.run(
        [str(EXECUTABLE), "log", "--json", "-n", "0", "--blocked"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    found = [json.loads(line) for line in shown.stdout.splitlines()]
    refused = [r for r in found if "exfil.example" in str(r["reason"])]
    assert len(refused) == 3  # A, B, and B's summary
    assert all(r["fingerprint"] for r in refused)
    assert len({r["fingerprint"] for r in refused}) == 2
    [summary] = [r for r in refused if "more like it" in str(r["reason"])]
    assert summary["fingerprint"] == refused[1]["fingerprint"] != refused[0]["fingerprint"]
