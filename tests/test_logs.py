"""The log: private after any rotation, quiet under --quiet, and never a reason to stop serving."""

from __future__ import annotations

import errno
import io
import logging
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from claude_proxy.state import logs
from tests.conftest import EXECUTABLE, SCRIPTS
from tests.support.cli import run_cli
from tests.support.files import mode
from tests.support.ports import free_port
from tests.upstream import Upstream


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def test_rotation_keeps_the_files_0600_and_the_folder_0700(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    folder = tmp_path / "log"
    folder.mkdir()
    folder.chmod(0o755)  # as an older install script made it
    monkeypatch.setattr(logs, "MAX_BYTES", 2000)
    old = os.umask(0o022)  # the umask of a shell, not the proxy's
    try:
        logs.configure(folder / "claude-proxy.log", quiet=True)
        logger = logging.getLogger("claude_proxy.decisions")
        for number in range(200):  # ~14 KB: several rollovers
            logger.info("ALLOW GET api.anthropic.com:443 /v1/%05d 200 rule=*.anthropic.com", number)
    finally:
        os.umask(old)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["claude-proxy.log", *(f"claude-proxy.log.{n}" for n in range(1, 6))]
    assert {p.name: mode(p) for p in folder.iterdir()} == dict.fromkeys(names, 0o600)
    assert mode(folder) == 0o700


def test_a_log_file_that_cannot_be_written_is_one_line_then_silence_until_it_can(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the log folder's parent should be")
    notices = io.StringIO()
    handler = logs.PrivateLogFile(blocker / "log" / "claude-proxy.log", notices=notices)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.Logger("test")
    logger.addHandler(handler)
    for number in range(500):
        logger.info("decision %d", number)
    assert len(notices.getvalue().splitlines()) == 1
    assert "cannot write the log file" in notices.getvalue()
    assert "keeps serving" in notices.getvalue()
    blocker.unlink()  # it can be written again
    logger.info("after")
    handler.close()
    said = notices.getvalue().splitlines()
    assert len(said) == 2 and "is written again" in said[1]
    assert (blocker / "log" / "claude-proxy.log").read_text() == "after\n"


def test_identical_warnings_are_summarised_and_bursts_capped() -> None:
    now = [0.0]
    stream = io.StringIO()
    console = logging.StreamHandler(stream)
    console.addFilter(logs.Calm(clock=lambda: now[0]))
    logger = logging.Logger("test")
    logger.addHandler(console)
    for _ in range(1000):
        logger.warning("Client TLS handshake failed for %s", "example.com")
    assert stream.getvalue().splitlines() == ["Client TLS handshake failed for example.com"]
    now[0] = logs.WINDOW_SECONDS + 1
    logger.warning("Client TLS handshake failed for %s", "example.com")
    assert stream.getvalue().splitlines()[-1] == (
        "Client TLS handshake failed for example.com (repeated 999 more times since it was last "
        "shown)"
    )
    for number in range(100):  # all different, in one window
        logger.error("error %d", number)
    assert len(stream.getvalue().splitlines()) == 2 + logs.CONSOLE_BURST - 1
    now[0] = 2 * logs.WINDOW_SECONDS + 2
    logger.error("later")
    assert (
        stream.getvalue()
        .splitlines()[-1]
        .endswith(f"({100 - logs.CONSOLE_BURST + 1} other warnings and errors were not shown)")
    )
    for number in range(10):
        logger.info("decision %d", number)  # decision lines are never held back
    assert stream.getvalue().splitlines()[-1] == "decision 9"


# The real proxy under --quiet, as the agent runs it


class QuietProxy:
    """`claude-proxy run --quiet` (nothing on stderr says where it listens: we choose)."""

    def __init__(self, home: Path, upstream: Upstream, upstream_ca_file: Path) -> None:
        self.home, self.port = home, free_port()
        self.stderr_file = home.parent / "stderr.log"
        args = ["--quiet", "--port", str(self.port), "--socks-port", str(free_port()),
                "--set", f"ssl_verify_upstream_trusted_ca={upstream_ca_file}",
                "--set", f"scripts={SCRIPTS / 'route_to_upstream.py'}"]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
        env.update(HOME=str(home), CLAUDE_PROXY_TEST_UPSTREAM_PORT=str(upstream.port))
        with open(self.stderr_file, "wb") as stderr:
            self.proc = subprocess.Popen([str(EXECUTABLE), *args], env=env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=stderr)  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
                break
            except ConnectionRefusedError:
                assert self.proc.poll() is None, self.stderr()
                assert time.monotonic() < deadline, "the proxy did not listen"
                time.sleep(0.05)

    def stderr(self) -> str:
        return self.stderr_file.read_text(errors="replace")

    def client(self) -> httpx.Client:
        cert = self.home / ".config" / "claude-proxy" / "mitmproxy-ca-cert.pem"
        context = ssl.create_default_context(cafile=str(cert))
        return httpx.Client(proxy=f"http://127.0.0.1:{self.port}", verify=context, timeout=30)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture
def quiet_proxy(
    home: Path, upstream: Upstream, upstream_ca_file: Path
) -> Iterator[Callable[[], QuietProxy]]:
    started: list[QuietProxy] = []

    def start() -> QuietProxy:
        started.append(QuietProxy(home, upstream, upstream_ca_file))
        return started[-1]

    yield start
    for proxy in started:
        if proxy.proc.poll() is None:
            proxy.proc.kill()
            proxy.proc.wait(30)


def failed_handshake(port: int, context: ssl.SSLContext) -> None:
    """A client that does not trust the proxy's CA: its TLS handshake fails inside the tunnel."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        with pytest.raises(ssl.SSLCertVerificationError):
            context.wrap_socket(sock, server_hostname="api.anthropic.com")


def test_quiet_keeps_a_thousand_failed_handshakes_off_stderr(
    quiet_proxy: Callable[[], QuietProxy],
) -> None:
    proxy = quiet_proxy()
    context = ssl.create_default_context()  # the system's roots only
    for _ in range(1000):
        failed_handshake(proxy.port, context)
    log = proxy.home / ".local" / "state" / "claude-proxy" / "log" / "claude-proxy.log"
    deadline = time.monotonic() + 30
    while log.read_text().count("Client TLS handshake failed") < 1000:  # the file has them all
        assert time.monotonic() < deadline, "the log file lacks some failed handshakes"
        time.sleep(0.05)
    assert proxy.stop() == 0
    assert len(proxy.stderr().splitlines()) <= 3, proxy.stderr()


@pytest.fixture
def mount() -> Iterator[Callable[..., None]]:
    """Mount a tmpfs (root only): a small disk that can fill up, or a read-only folder."""
    mounted: list[Path] = []

    def mount_tmpfs(path: Path, *options: str) -> None:
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join(["mode=0700", *options]), "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (root only): {result.stderr.strip()}")
        mounted.append(path)

    yield mount_tmpfs
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 4096)
                out.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_a_full_log_disk_is_one_line_and_the_proxy_keeps_serving(
    home: Path,
    upstream: Upstream,
    quiet_proxy: Callable[[], QuietProxy],
    mount: Callable[..., None],
) -> None:
    assert run_cli(home, "ca").returncode == 0
    folder = home / ".local" / "state" / "claude-proxy" / "log"
    mount(folder, "size=64k")
    filler = fill(folder)
    proxy = quiet_proxy()
    with proxy.client() as client:
        for number in range(200):
            assert client.get(f"https://api.anthropic.com/full/{number}").status_code == 200
        said = proxy.stderr().splitlines()
        assert len(said) == 1 and "cannot write the log file" in said[0], said
        filler.unlink()  # space again
        assert client.get("https://api.anthropic.com/space-again").status_code == 200
    assert proxy.stop() == 0
    assert len(upstream.seen.requests) == 201
    said = proxy.stderr().splitlines()
    assert len(said) == 2 and "is written again" in said[1], said
    assert "/space-again" in (folder / "claude-proxy.log").read_text()


def test_an_unwritable_log_folder_at_start_is_one_line_and_the_proxy_serves(
    home: Path,
    upstream: Upstream,
    quiet_proxy: Callable[[], QuietProxy],
    mount: Callable[..., None],
) -> None:
    assert run_cli(home, "ca").returncode == 0
    folder = home / ".local" / "state" / "claude-proxy" / "log"
    if os.geteuid() == 0:  # root writes anywhere: a read-only file system stops it
        mount(folder, "ro")
    else:
        folder.mkdir(parents=True)
        folder.chmod(0o500)
    proxy = quiet_proxy()
    with proxy.client() as client:
        assert client.get("https://api.anthropic.com/no-log").status_code == 200
    assert proxy.stop() == 0
    said = proxy.stderr().splitlines()
    assert len(said) == 1, said
    assert said[0].startswith("claude-proxy: cannot write the log file ")
    assert upstream.seen.requests == [("GET", "/no-log", "api.anthropic.com")]
