"""The documentation as a user reads it: short enough, its commands run as written, and every test,
file, benchmark flag and link it names exists (so a reference cannot rot).

The README's install line runs into temporary uv tool folders, its `setup` line with a temporary
HOME; its curl lines and the srt example of docs/enforced-mode.md run against a real claude-proxy
whose every upstream connection is routed to the local upstream, which counts what reaches it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import socket
import subprocess
import time
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import EXECUTABLE, ProxyFactory
from tests.macos import ROOT, tool_env, uv_dir
from tests.programs import sandbox_program
from tests.upstream import Upstream

README = ROOT / "README.md"
DOCS = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGE = ROOT / "src" / "claude_proxy"
FOREIGN_FILES = {"sitecustomize.py"}  # named in the docs, but not ours: Python's own hook


def block_under(path: Path, heading: str, language: str = "sh") -> list[str]:
    """The command lines of the first ```language block after `heading`, comments dropped."""
    text = path.read_text()
    assert heading in text, f"{path.name} has no heading {heading!r}"
    after = text[text.index(heading) :]
    found = re.search(rf"```{language}\n(.*?)```", after, re.S)
    assert found, f"{path.name}: no ```{language} block under {heading!r}"
    lines = []
    for line in found[1].splitlines():
        command = strip_comment(line).strip()
        if command:
            lines.append(command)
    return lines


def strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a `#` outside quotes, after a space)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] == " "):
            return line[:i]
    return line


# What the docs name exists


def test_the_readme_is_under_12_kb() -> None:
    size = len(README.read_bytes())
    assert size < 12_000, f"README.md is {size} bytes: move detail into docs/"


@cache
def names_defined_in(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text())
    return frozenset(
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    )


def all_test_names() -> frozenset[str]:
    return frozenset().union(*(names_defined_in(p) for p in (ROOT / "tests").glob("test_*.py")))


TEST_REFERENCE = re.compile(r"(tests/[\w/]+\.py)(?:::(\w+))?|`(test_\w+)`")


def test_every_test_the_docs_name_exists() -> None:
    """`tests/x.py::name` must be defined in that file; a bare `test_name` in the file named last
    in its paragraph (or, with none, in some test file)."""
    missing = []
    every = all_test_names()
    for doc in DOCS:
        for paragraph in doc.read_text().split("\n\n"):
            last_file: Path | None = None
            for found in TEST_REFERENCE.finditer(paragraph):
                file, name, bare = found.groups()
                if file:
                    last_file = ROOT / file
                    if not last_file.exists():
                        missing.append(f"{doc.name}: {file}")
                    elif name and name not in names_defined_in(last_file):
                        missing.append(f"{doc.name}: {file}::{name}")
                elif last_file is not None and last_file.exists():
                    if bare not in names_defined_in(last_file):
                        missing.append(f"{doc.name}: {bare} in {last_file.relative_to(ROOT)}")
                elif bare not in every:
                    missing.append(f"{doc.name}: {bare}")
    assert missing == []


FILE_REFERENCE = re.compile(
    r"`((?:src|tests|scripts|docs|\.ci|\.github)/[\w./-]*|(?:[\w-]+/)*[\w-]+\.(?:py|sh))[`\s]"
)
ROOTS = ("src/", "tests/", "scripts/", "docs/", ".ci/", ".github/")
SUBPACKAGES = sorted(p.parent for p in PACKAGE.glob("*/__init__.py"))


def test_every_file_the_docs_name_exists() -> None:
    missing = []
    for doc in DOCS:
        for found in FILE_REFERENCE.finditer(doc.read_text()):
            name = found[1]
            if name.startswith(ROOTS):
                exists = (ROOT / name).exists()
            elif "/" in name:  # a module named by its place in the package: `proxy/enforcer.py`
                exists = (PACKAGE / name).exists()
            else:
                where = [PACKAGE, *SUBPACKAGES, ROOT / "tests", ROOT / "scripts"]
                exists = name in FOREIGN_FILES or any((d / name).exists() for d in where)
            if not exists:
                missing.append(f"{doc.name}: {name}")
    assert missing == []


def test_every_benchmark_flag_the_docs_name_exists() -> None:
    bench = (ROOT / "scripts" / "bench.py").read_text()
    flags = set(re.findall(r'"(--[\w-]+)"', bench))
    named = set()
    for doc in DOCS:
        for found in re.finditer(r"bench\.py((?:\s+--[\w-]+(?:\s+[A-Z]+)?)+)", doc.read_text()):
            named.update(re.findall(r"--[\w-]+", found[1]))
    named |= set(re.findall(r"`(--[\w-]+)", (ROOT / "CONTRIBUTING.md").read_text()))
    assert named, "the docs name no benchmark flag"
    assert sorted(named - flags) == []


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    result = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        result.add(slug)
    return result


def test_every_link_between_the_docs_leads_somewhere() -> None:
    broken = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                broken.append(f"{doc.name}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert broken == []


def test_the_readme_test_command_is_the_one_ci_runs() -> None:
    assert block_under(README, "## Tests") == ["uv run pytest"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == "uv run pytest"


def test_the_module_map_names_every_module() -> None:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = text[text.index("## Module map") :]
    mapped = set(re.findall(r"^\| `([\w./-]+)` \|", section, re.M))
    named = [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.plist")]
    modules = {p.relative_to(PACKAGE).as_posix() for p in named if p.name != "__init__.py"}
    modules |= {f"{p.relative_to(PACKAGE).as_posix()}/" for p in SUBPACKAGES}
    assert sorted(modules - mapped) == [], "modules the map leaves out"
    assert sorted(mapped - modules) == [], "names in the map that are not modules"


def test_the_command_reference_covers_every_command() -> None:
    help_text = subprocess.run(
        [str(EXECUTABLE), "--help"], capture_output=True, text=True, check=True
    ).stdout
    listed = help_text[help_text.index("COMMAND ") : help_text.index("options:")]
    commands = re.findall(r"^    (\w[\w-]*)  ", listed, re.M)
    assert "run" in commands and "status" in commands, help_text
    reference = (ROOT / "docs" / "commands.md").read_text()
    synopsis = re.search(r"```\n(claude-proxy .*?)```", reference, re.S)
    assert synopsis
    for command in commands:
        assert re.search(rf"^claude-proxy \[?{command}\b", synopsis[1], re.M), command
        assert re.search(rf"^## .*`{command}`", reference, re.M), f"no section for {command}"


# The README's commands, run as written


INSTALL = ["uv tool install .", "scripts/install-agent.sh", "claude-proxy setup claude-code"]


def test_the_readme_install_block_is_the_one_these_tests_run() -> None:
    assert block_under(README, "## Install and use") == INSTALL


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's install line, as written, into temporary uv tool folders. uv installs from
    its cache; on a machine without one it needs the package index (as `uv sync` does)."""
    tools = tmp_path_factory.mktemp("tools")
    env = {**tool_env(tools), "PATH": os.pathsep.join([uv_dir(), os.environ["PATH"]])}
    result = subprocess.run(
        shlex.split(INSTALL[0]), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return tools / "bin" / "claude-proxy"


def home_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env["HOME"] = str(home)
    return env


def test_the_readme_install_line_installs_a_working_tool(installed: Path) -> None:
    result = subprocess.run([str(installed), "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "setup" in result.stdout and "status" in result.stdout


def test_the_install_script_the_readme_names_answers_here() -> None:
    """It is macOS-only (tests/test_agent.py runs it against stand-ins, dry run included:
    test_install_dry_run_changes_nothing); here its help must answer."""
    script = ROOT / INSTALL[1]
    assert os.access(script, os.X_OK)
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "launchd agent" in result.stdout


def test_the_readme_setup_line_with_dry_run(installed: Path, home: Path) -> None:
    command = shlex.split(INSTALL[2])
    assert command[0] == "claude-proxy"
    result = subprocess.run(
        [str(installed), *command[1:], "--dry-run"],
        env=home_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    added = json.loads(
        "\n".join(line[1:] for line in result.stdout.splitlines() if line.startswith("+") and
                  not line.startswith("+++"))
    )  # fmt: skip
    assert added["sandbox"]["enabled"] is True
    assert added["sandbox"]["allowUnsandboxedCommands"] is False
    assert added["sandbox"]["network"] == {"httpProxyPort": 9051, "socksProxyPort": 9052}
    assert "dry run: nothing was written" in result.stdout
    assert not (home / ".claude").exists()


STATUS_ROW = re.compile(r"^(ok  |FAIL) (.+)$")


def documented_status_rows() -> list[str]:
    text = (ROOT / "docs" / "operations.md").read_text()
    table = text[text.index("| check | ok when |") :].split("\n\n")[0]
    return re.findall(r"^\| `([^`]+)`", table, re.M)


def test_status_prints_the_rows_the_docs_list(installed: Path, home: Path) -> None:
    """Every row `status` prints is one the docs describe, each failure has its fix under it,
    and with nothing installed it fails (exit 1). Ports nothing listens on: no proxy of another
    test answers."""
    documented = documented_status_rows()
    patterns = {
        label: re.compile(re.escape(label).replace("H:P", r"\S+").replace("…", ".*"))
        for label in documented
    }
    ports = ["--port", str(free_port()), "--socks-port", str(free_port())]
    result = subprocess.run(
        [str(installed), "status", *ports],
        env=home_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    seen = set()
    for i, line in enumerate(lines):
        if line.startswith("     fix: "):
            continue
        row = STATUS_ROW.match(line)
        assert row, f"not a status row: {line!r}"
        labels = [label for label, p in patterns.items() if p.fullmatch(row[2].split(": ")[0])]
        assert labels, f"a row the docs do not describe: {line!r}"
        seen.update(labels)
        if row[1] == "FAIL":
            assert lines[i + 1].startswith("     fix: "), f"no fix under {line!r}"
    macos_only = {"keychain"}
    assert set(documented) - macos_only - seen == set(), "documented rows status never printed"


def free_port() -> int:
    """A port nothing listens on now (status only probes it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_readme_curl_lines_as_written(module_proxy: ProxyFactory, upstream: Upstream) -> None:
    """The README's two curl lines, with the test proxy's port for 9051 and its HOME for `~`:
    the allowed one reaches the upstream, the refused one fails with the 403 and, with -i, the
    reason the README quotes; then `log --blocked` shows the refusal."""
    proxy = module_proxy()  # its own: `log --blocked` below shows this test's refusals only
    lines = block_under(README, "## Check it")
    curls = [line for line in lines if line.startswith("curl ")]
    assert len(curls) == 2 and "api.anthropic.com" in curls[0] and "mozilla.org" in curls[1]

    def run(line: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", line.replace("9051", str(proxy.port))],
            env=home_env(proxy.home),
            capture_output=True,
            text=True,
            timeout=60,
        )

    allowed = run(curls[0])
    assert allowed.returncode == 0, allowed.stderr
    statuses = re.findall(r"^HTTP/\S+ (\d+)", allowed.stdout, re.M)
    assert statuses == ["200", "200"], allowed.stdout  # the CONNECT's, then the upstream's
    refused = run(curls[1])
    assert refused.returncode == 56
    assert "CONNECT tunnel failed, response 403" in refused.stderr
    why = run(curls[1] + " -i")
    quoted = re.search(r"`(Proxy-Status: claude-proxy;[^`]+)`", README.read_text())
    assert quoted and quoted[1] in why.stdout, why.stdout
    assert "X-Claude-Proxy: refused" in why.stdout
    assert upstream.seen.requests == [("HEAD", "/", "api.anthropic.com")]

    log_line = next(line for line in lines if line.startswith("claude-proxy log"))
    deadline = time.monotonic() + 10  # the audit writer commits within about 0.1 s
    while True:
        shown = subprocess.run(
            [str(EXECUTABLE), *shlex.split(log_line)[1:]],
            env=home_env(proxy.home),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if "mozilla.org:443" in shown.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert shown.returncode == 0, shown.stderr
    assert "BLOCK 403 CONNECT mozilla.org:443" in shown.stdout
    assert "api.anthropic.com" not in shown.stdout  # --blocked: refusals only


def test_the_readme_check_line(home: Path) -> None:
    line = next(line for line in block_under(README, "## Check it") if "check " in line)
    result = subprocess.run(
        [str(EXECUTABLE), *shlex.split(line)[1:]],
        env=home_env(home),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1  # refused: exit 1, with the reason
    assert result.stdout.strip() == (
        "refuse github.com:443 GET /repos/x: github.com is not on the allowlist"
    )


# The srt example of docs/enforced-mode.md, run as written


SRT_EXAMPLE = [
    "srt -c 'curl -sS -i https://mozilla.org/'",
    "srt -c \"curl -sS --noproxy '*' https://mozilla.org/\"",
]


def test_the_srt_example_runs_as_written(
    module_proxy: ProxyFactory, upstream: Upstream, tmp_path: Path
) -> None:
    """`setup srt` points ~/.srt-settings.json at the proxy, then each documented line runs in
    bash as written: the refused host gets claude-proxy's 403 with its reason; `--noproxy` cannot
    connect at all; nothing reaches the upstream."""
    srt = sandbox_program("srt")
    block = block_under(ROOT / "docs" / "enforced-mode.md", "## Check it")
    assert [line for line in block if line.startswith("srt ")] == SRT_EXAMPLE
    proxy = module_proxy()
    env = home_env(proxy.home)
    env["PATH"] = os.pathsep.join([str(srt.parent), str(EXECUTABLE.parent), env["PATH"]])
    ports = ["--port", str(proxy.port), "--socks-port", str(proxy.socks_port)]
    setup = subprocess.run(
        [str(EXECUTABLE), "setup", "srt", "--yes", *ports], env=env, capture_output=True, text=True
    )
    assert setup.returncode == 0, setup.stderr

    def run(line: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", line],
            env=env,
            cwd=proxy.home,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    check = run(next(line for line in block if line.startswith("claude-proxy check")))
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("allow api.anthropic.com:443 (rule *.anthropic.com)")
    refused = run(SRT_EXAMPLE[0])
    assert refused.returncode == 56, refused.stderr
    assert refused.stdout.startswith("HTTP/1.1 403"), refused.stdout
    assert "X-Claude-Proxy: refused" in refused.stdout
    assert 'details="mozilla.org is not on the allowlist"' in refused.stdout
    assert "curl: (56) CONNECT tunnel failed, response 403" in refused.stderr
    around = run(SRT_EXAMPLE[1])
    assert around.returncode == 6, around.stderr
    assert "Could not resolve host: mozilla.org" in around.stderr
    upstream.wait_idle()
    assert upstream.seen.connections == 0
