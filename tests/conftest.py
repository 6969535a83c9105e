"""Real parts: the claude-proxy process, a local HTTPS upstream with a trustme certificate."""

from __future__ import annotations

import compileall
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import pytest
import trustme

from tests.mountns import MountNamespace
from tests.upstream import Upstream

SCRIPTS = Path(__file__).parent / "scripts"
UPSTREAM_NAMES = ["api.anthropic.com", "claude.ai", "platform.claude.com", "statsig.anthropic.com"]
EXECUTABLE = Path(sys.executable).with_name("claude-proxy")
LISTENING = re.compile(r"listening on (?:127\.0\.0\.1|\[::1\]):(\d+)")
SOCKS_LISTENING = re.compile(r"SOCKS5 on (?:127\.0\.0\.1|\[::1\]):(\d+)")


class ProxyProcess:
    """The real `claude-proxy` console script, on an ephemeral port with a temporary HOME."""

    started: ClassVar[list[ProxyProcess]] = []  # every one, so none outlives its test

    def __init__(self, home: Path, args: Sequence[str], env: dict[str, str]) -> None:
        self.home = home
        self.stderr: list[str] = []
        self.listening = threading.Event()
        self.port = 0
        self.socks_port = 0
        if "--socks-port" not in args and (not args or args[0].startswith("-") or args[0] == "run"):
            args = [*args, "--socks-port", "0"]  # never the default port another run may hold
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
        full_env.update(HOME=str(home), PYTHONUNBUFFERED="1", **env)
        self.proc = subprocess.Popen(
            [str(EXECUTABLE), *args],
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        ProxyProcess.started.append(self)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))
            if (found := LISTENING.search(line)) and not self.listening.is_set():
                self.port = int(found[1])
                socks = SOCKS_LISTENING.search(line)
                self.socks_port = int(socks[1]) if socks else 0
                self.listening.set()

    def wait_listening(self, timeout: float = 30) -> ProxyProcess:
        deadline = time.monotonic() + timeout
        while not self.listening.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("proxy did not start:\n" + "\n".join(self.stderr))
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_cert(self) -> Path:
        return self.home / ".config" / "claude-proxy" / "mitmproxy-ca-cert.pem"

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_cert))

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        code = self.proc.wait(timeout)
        # Barrier: every line it wrote has been read (the pipe ends with the process).
        self.reader.join(timeout)
        assert not self.reader.is_alive(), "the proxy's stderr did not end with it"
        return code

    def log_text(self) -> str:
        """Everything the proxy wrote: stderr and its rotating log file."""
        logs = list((self.home / ".local" / "state" / "claude-proxy").rglob("*.log*"))
        return "\n".join(self.stderr + [p.read_text() for p in logs])


def pytest_configure(config: pytest.Config) -> None:
    """Compile claude_proxy and the macOS stand-ins once, before any worker starts: the suite
    runs them hundreds of times, and under PYTHONDONTWRITEBYTECODE (CI machines set it) each run
    would compile them again, as Python never writes their bytecode itself. uv compiles the
    installed packages (`uv sync --compile-bytecode` in .ci/run) but not this editable source."""
    if sys.dont_write_bytecode and not hasattr(config, "workerinput"):
        import claude_proxy

        compileall.compile_dir(Path(claude_proxy.__file__).parent, quiet=1)
        compileall.compile_file(Path(__file__).with_name("standins.py"), quiet=1)


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> Generator[None, None, None]:
    """Groups for pytest-xdist's `--dist loadgroup` (pyproject's addopts): a module's tests that
    share one of its module-scoped fixtures (a proxy, Claude Code sessions) run on one worker, so
    that fixture is set up once; tests already in a group (tests/support/shared.py) stay in it.

    Each worker then marks a grouped test's id with its group, which is how a group reaches one
    worker. A pytest on which that marking does nothing (pytest-dev/pytest-xdist#1386) would
    spread the groups silently: stop instead."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        shared = info is not None and any(
            d.scope == "module" for defs in info.name2fixturedefs.values() for d in defs
        )
        if shared and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    yield
    if not config.getoption("loadgroup", False):
        return
    spread = [
        i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid
    ]
    if spread:
        raise pytest.UsageError(
            f"pytest-xdist did not group {spread[0]} (and {len(spread) - 1} more): this pytest "
            "breaks --dist loadgroup (pytest-dev/pytest-xdist#1386); use the locked one (uv sync)"
        )


@pytest.fixture(autouse=True)
def no_proxy_outlives_its_test() -> Iterator[None]:
    """Stop every proxy a test started and left running (fixtures of wider scope start theirs
    before this snapshot, so they are left alone)."""
    before = len(ProxyProcess.started)
    yield
    leftover = ProxyProcess.started[before:]
    del ProxyProcess.started[before:]
    for process in leftover:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(30)


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def upstream_ca_file(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("upstream") / "upstream-ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def upstream_server(tls_ca: trustme.CA) -> Iterator[Upstream]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert(*UPSTREAM_NAMES, "127.0.0.1").configure_cert(context)
    server = Upstream(context)
    server.serve_in_background()
    yield server
    server.shutdown()


@pytest.fixture
def upstream(upstream_server: Upstream) -> Upstream:
    upstream_server.reset()
    return upstream_server


def start_proxy(
    home: Path,
    upstream: Upstream,
    upstream_ca_file: Path,
    *extra: str,
    scripts: Sequence[str] = ("route_to_upstream.py",),
    trust_upstream: bool = True,
    env: dict[str, str] | None = None,
) -> ProxyProcess:
    args = ["--port", "0"]
    if not any(str(e).startswith("sandbox_refusal_summary_seconds=") for e in extra):
        # Tests that repeat a refusal read each one's line: runs are summed up in test_repeats.
        args += ["--set", "sandbox_refusal_summary_seconds=0"]
    if trust_upstream:
        args += ["--set", f"ssl_verify_upstream_trusted_ca={upstream_ca_file}"]
    for name in scripts:
        args += ["--set", f"scripts={SCRIPTS / name}"]
    full_env = {"CLAUDE_PROXY_TEST_UPSTREAM_PORT": str(upstream.port), **(env or {})}
    return ProxyProcess(home, [*args, *extra], full_env).wait_listening()


@pytest.fixture(scope="session")
def proxy(
    upstream_server: Upstream, upstream_ca_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """One proxy shared by the tests that only send traffic through it."""
    process = start_proxy(tmp_path_factory.mktemp("home"), upstream_server, upstream_ca_file)
    yield process
    process.stop()


ProxyFactory = Callable[..., ProxyProcess]


@pytest.fixture(scope="module")
def module_proxy(
    upstream_server: Upstream, upstream_ca_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyFactory]:
    """Start a proxy with extra arguments (and environment) for one module; stopped after it."""
    started: list[ProxyProcess] = []

    def start(*extra: str, env: dict[str, str] | None = None) -> ProxyProcess:
        home = tmp_path_factory.mktemp("home")
        started.append(start_proxy(home, upstream_server, upstream_ca_file, *extra, env=env))
        return started[-1]

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home dir & more"
    path.mkdir()
    return path


def curl(proxy: ProxyProcess, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    assert shutil.which("curl"), "curl is needed (the CI script installs it)"
    return subprocess.run(
        ["curl", "-sS", "--proxy", proxy.url, "--cacert", str(proxy.ca_cert), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def send_connect(proxy: ProxyProcess, authority: bytes, extra: bytes = b"") -> socket.socket:
    """Open a connection to the proxy and send a CONNECT for `authority` (raw bytes)."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n" + extra)
    sock.sendall(b"\r\n")
    return sock


def read_head(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """Read up to the end of a response head (or until the peer closes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_until_closed(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """Everything until the peer closes (or resets). A peer that does neither in time fails."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ssl.SSLError, ConnectionError):
        pass  # closed uncleanly: closed all the same
    return data


def read_response(sock: socket.socket | ssl.SSLSocket) -> tuple[bytes, bytes]:
    """One response, head and Content-Length body, on a connection that may stay open."""
    head, _, body = read_head(sock).partition(b"\r\n\r\n")
    found = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    length = int(found[1]) if found else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {len(body)} of {length} body bytes"
        body += chunk
    return head, body


def open_tunnel(
    proxy: ProxyProcess, host: str, port: int = 443, sni: str | None = None
) -> ssl.SSLSocket:
    """CONNECT to host:port, then TLS inside the tunnel, trusting the proxy's CA."""
    sock = send_connect(proxy, f"{host}:{port}".encode())
    head = read_head(sock)
    assert head.startswith(b"HTTP/1.1 200"), head
    context = proxy.client_context()
    context.set_alpn_protocols(["http/1.1"])
    return context.wrap_socket(sock, server_hostname=sni or host)


def signal_name(code: int) -> str:
    return signal.Signals(-code).name if code < 0 else str(code)


@pytest.fixture
def managed_etc(tmp_path: Path) -> Iterator[MountNamespace]:
    """A mount namespace with an /etc of its own: the managed settings file at its real path."""
    for program in ("unshare", "nsenter"):
        if shutil.which(program) is None:
            pytest.skip(f"{program} (util-linux) is needed; .ci/run installs it")
    with MountNamespace(tmp_path / "etc") as namespace:
        yield namespace


DESCRIPTOR_LIMIT = 256  # a macOS terminal's soft open-files limit, and launchd's default


@pytest.fixture
def limited_descriptors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start proxies under an open-files limit, as a terminal or launchd does."""
    from tests.support.processes import limited

    monkeypatch.setattr(
        sys.modules[__name__], "EXECUTABLE", limited(EXECUTABLE, tmp_path, DESCRIPTOR_LIMIT)
    )


@pytest.fixture(scope="session")
def made_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HOME with a CA (made once per session: it takes mitmproxy) for the commands that read
    it; tests copy it (`ca_home`) and never write to it."""
    from tests.support.cli import run_cli
    from tests.support.shared import built_once

    def make(home: Path) -> Path:
        assert run_cli(home, "ca").returncode == 0
        return home

    return built_once(tmp_path_factory, "ca-home", make)


@pytest.fixture
def ca_home(made_ca: Path, tmp_path: Path) -> Path:
    """A HOME of its own for a test, with the session's CA in it."""
    home = tmp_path / "home"
    shutil.copytree(made_ca, home)
    return home
