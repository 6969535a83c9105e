"""Commands that need no proxy start fast: they import neither mitmproxy nor cryptography nor
asyncio (the benchmark's start-up row measures the time; this proves the imports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("mitmproxy", "cryptography", "asyncio")
PROGRAM = """
import json, sys
from claude_proxy.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def loaded_modules(home: Path, *args: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env["HOME"] = str(home)
    program = f"HEAVY = {HEAVY!r}\n{PROGRAM}"
    result = subprocess.run(
        [sys.executable, "-c", program, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    report: dict[str, object] = json.loads(result.stderr.strip().splitlines()[-1])
    return report


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["env"], 0),
        (["env", "--tools"], 0),
        (["check", "api.anthropic.com"], 0),
        (["check", "https://example.com/x"], 1),  # refused
        (["--help"], 0),
        (["check", "--help"], 0),
        (["--version"], 0),
        (["completion", "bash"], 0),
        (["config", "show"], 0),
    ],
)
def test_commands_that_need_no_proxy_import_no_heavy_module(
    ca_home: Path, args: list[str], code: int
) -> None:
    report = loaded_modules(ca_home, *args)
    assert report["heavy"] == [], report
    assert report["code"] in (code, None if code == 0 else code), report
