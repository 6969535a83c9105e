"""Making the CA is all or nothing: an interrupted creation never leaves a permanent exit 4."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from claude_proxy.errors import ExitCode, ProxyError
from claude_proxy.state import ca
from tests.conftest import EXECUTABLE, start_proxy
from tests.upstream import Upstream


class Killed(BaseException):
    """The process dies here: no handler of ours runs (a kill, a power cut)."""


def interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int, error: BaseException) -> list[str]:
    """Make the `step`-th file operation of a creation raise `error`; returns the steps seen."""
    seen: list[str] = []

    def wrap(owner: object, name: str) -> None:
        original: Callable[..., object] = getattr(owner, name)

        def instead(*args: object, **kwargs: object) -> object:
            seen.append(name)
            if len(seen) == step and (name != "rmtree" or isinstance(error, Killed)):
                raise error
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, instead)

    wrap(Path, "write_bytes")  # mitmproxy writes each file with it
    wrap(os, "fsync")
    wrap(os, "replace")
    wrap(shutil, "rmtree")
    return seen


@pytest.fixture
def small_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ca, "KEY_SIZE", 1024)  # the same steps, made faster


def test_a_creation_interrupted_at_any_step_leaves_no_permanent_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    small_keys: None,
) -> None:  # fmt: skip
    with monkeypatch.context() as counting:
        steps = interrupt_at(counting, 0, OSError())
        ca.ensure_ca(tmp_path / "counting")
    assert len(steps) >= 12  # six files written, each synced and moved, and more
    for step in range(1, len(steps) + 1):
        for error in (OSError(errno.ENOSPC, "No space left on device"), Killed()):
            confdir = tmp_path / f"{step}-{type(error).__name__}"
            raised: BaseException | None = None
            with monkeypatch.context() as failing:
                interrupt_at(failing, step, error)
                try:
                    ca.ensure_ca(confdir)
                except (ProxyError, Killed) as e:
                    raised = e
            if isinstance(raised, ProxyError):  # reported in one line, nothing kept
                assert raised.exit_code == ExitCode.CA
                assert "No space left on device" in str(raised)
                assert not confdir.exists() or not list(confdir.iterdir())
            finished = ca.key_path(confdir).exists()
            assert raised is not None or finished  # a failure after the key is in place is moot
            made = ca.load_ca(confdir).sha256 if finished else None
            debris = (confdir / ca.STAGING).exists() and not finished
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                authority = ca.ensure_ca(confdir)  # the next start: a complete CA, never exit 4
            assert sorted(p.name for p in confdir.iterdir()) == sorted(ca.CA_FILES)
            if finished:  # the key was in place: that CA stays, whatever else was left
                assert authority.sha256 == made
            assert ("unfinished CA creation" in caplog.text) == debris  # said when it clears


def test_a_damaged_ca_without_traces_of_a_creation_is_still_left_alone(
    tmp_path: Path, small_keys: None
) -> None:
    confdir = tmp_path / "ca"
    ca.ensure_ca(confdir)
    ca.key_path(confdir).unlink()  # the key is gone: the certificate may be trusted somewhere
    before = {p.name: p.read_bytes() for p in confdir.iterdir()}
    with pytest.raises(ProxyError, match="never replaced automatically") as raised:
        ca.ensure_ca(confdir)
    assert raised.value.exit_code == ExitCode.CA
    assert {p.name: p.read_bytes() for p in confdir.iterdir()} == before


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, str], None]]:
    """A small tmpfs (root only), which a test can fill up and then grow."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> None:
        remount = path in mounted
        path.mkdir(parents=True, exist_ok=True)
        options = f"remount,size={size}" if remount else f"size={size},mode=0700"
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                capture_output=True, text=True)  # fmt: skip
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (root only): {result.stderr.strip()}")
        if not remount:
            mounted.append(path)

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_full_disk_while_the_ca_is_made_is_one_line_then_the_next_start_makes_it(
    home: Path, tmp_path: Path, upstream: Upstream, upstream_ca_file: Path,
    tmpfs: Callable[[Path, str], None],
) -> None:  # fmt: skip
    xdg = tmp_path / "xdg"
    tmpfs(xdg, "8k")  # room for two of the CA's six files
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(xdg))
    full = subprocess.run([str(EXECUTABLE), "ca"], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert full.returncode == ExitCode.CA
    assert len(full.stderr.strip().splitlines()) == 1
    assert "No space left on device" in full.stderr
    tmpfs(xdg, "1m")  # space again
    proxy = start_proxy(home, upstream, upstream_ca_file, env={"XDG_CONFIG_HOME": str(xdg)})
    assert proxy.stop() == 0
    assert sorted(p.name for p in (xdg / "claude-proxy").iterdir()) == sorted(
        [*ca.CA_FILES, "config.toml"]  # the example policy, written at the first start
    )
