"""Commands that need no proxy start fast: they import neither mitmproxy nor cryptography nor
asyncio, and the ones the install scripts run often import only what they use (the benchmark's
start-up rows measure the time; this proves the imports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from claude_proxy.state import paths
from tests.conftest import start_proxy
from tests.support.cli import run_cli
from tests.support.waiting import wait_until
from tests.upstream import Upstream

HEAVY = ("mitmproxy", "cryptography", "asyncio")
# Modules that the commands the install scripts and the tests run most do without: status's
# checks and probes, the audit log, TLS, the policy's rules, dataclasses (which imports inspect),
# subprocess (only macOS's keychain check runs a program).
WATCHED = (
    "dataclasses",
    "claude_proxy.cli.diagnostics",
    "claude_proxy.cli.log_cmd",
    "claude_proxy.cli.probes",
    "claude_proxy.cli.status_cmd",
    "claude_proxy.policy.rules",
    "claude_proxy.record.audit_db",
    "claude_proxy.state.accounts",
    "sqlite3",
    "ssl",
    "subprocess",
)
SETUP_USES = {"dataclasses", "claude_proxy.cli.diagnostics"}  # its "what remains" checks
PROGRAM = """
import json, sys
from claude_proxy.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
watched = sorted(set(sys.modules) & set(WATCHED))
print(json.dumps({"code": code, "heavy": heavy, "watched": watched}), file=sys.stderr)
"""


def loaded_modules(home: Path, *args: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env["HOME"] = str(home)
    program = f"HEAVY = {HEAVY!r}\nWATCHED = {WATCHED!r}\n{PROGRAM}"
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


@pytest.mark.parametrize(
    ("args", "uses"),
    [
        (["paths"], set()),
        (["paths", "--installed"], set()),
        (["plist"], set()),
        (["setup", "claude-code", "--yes"], SETUP_USES),
        (["setup", "srt", "--dry-run"], {*SETUP_USES, "claude_proxy.policy.rules"}),
        (["setup", "undo-all", "--yes"], SETUP_USES),
    ],
)
def test_what_the_install_scripts_run_imports_only_what_it_uses(
    ca_home: Path, args: list[str], uses: set[str]
) -> None:
    """`paths` and `plist` name files and render the plist, here with an agent installed; setup
    writes settings and checks what remains, without status's probes or the audit log."""
    plist = paths.plist_path(ca_home)
    plist.parent.mkdir(parents=True)
    assert run_cli(ca_home, "plist", "--port", "19051", "--output", str(plist)).returncode == 0
    report = loaded_modules(ca_home, *args)
    assert report["code"] in (0, None), report
    assert sorted(set(report["watched"]) - uses) == [], report


def test_run_does_not_import_the_addons_it_does_not_use(
    home: Path, upstream: Upstream, upstream_ca_file: Path, tmp_path: Path
) -> None:
    """mitmproxy's addons package imports every default addon (Flask for the onboarding app,
    ldap3 for proxy authentication, …): a running proxy loads only the ones it runs."""
    report = tmp_path / "loaded"
    proxy = start_proxy(
        home,
        upstream,
        upstream_ca_file,
        scripts=("route_to_upstream.py", "loaded_modules.py"),
        env={"CLAUDE_PROXY_TEST_LOADED": str(report)},
    )
    try:
        wait_until(report.exists, "the script's list of loaded modules")
        loaded = set(report.read_text().split())
    finally:
        assert proxy.stop() == 0
    assert {"mitmproxy.addons.proxyserver", "mitmproxy.addons.script"} <= loaded  # it ran them
    unused = {"flask", "ldap3", "mitmproxy.addons.onboarding", "mitmproxy.addons.proxyauth"}
    assert unused & loaded == set()


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--allow", "*.com"],
        ["run", "--allow", "0.0.0.0"],
        ["run", "--host", "0.0.0.0"],
        ["run", "--port", "9051", "--socks-port", "9051"],
    ],
)
def test_run_refuses_a_bad_flag_before_loading_mitmproxy(ca_home: Path, args: list[str]) -> None:
    """A mistyped rule, host or port is answered at once, as `check` answers: the flags and
    config.toml are checked before the proxy's half-second of imports."""
    report = loaded_modules(ca_home, *args)
    assert report["code"] == 2, report
    assert report["heavy"] == [], report
