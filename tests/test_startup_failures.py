"""A start that cannot go on says so in one line, with its fix and its own exit code.

The real `claude-proxy run`, with a folder made read-only by a bind mount in a private mount
namespace (the suite runs as root, which file modes do not stop).
"""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests import conftest
from tests.conftest import ProxyProcess

STATE = 5  # the exit code for a folder that cannot be written


@pytest.fixture(autouse=True)
def needs_unshare() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is needed; .ci/run installs it")


def read_only(tmp_path: Path, folder: Path) -> Path:
    """A stand-in for the claude-proxy executable that sees `folder` read-only."""
    wrapper = tmp_path / "read-only-claude-proxy"
    wrapper.write_text(
        "#!/bin/sh\n"
        "exec unshare --mount --propagation private sh -c "
        '\'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"\' '
        f'"{folder}" "{conftest.EXECUTABLE}" "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return wrapper


def make_ca(home: Path) -> Path:
    run = subprocess.run(
        [str(conftest.EXECUTABLE), "ca"],
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return home / ".config" / "claude-proxy"


def test_a_read_only_config_folder_without_config_toml_starts_with_the_defaults(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    confdir = make_ca(home)
    assert not (confdir / "config.toml").exists()
    monkeypatch.setattr(conftest, "EXECUTABLE", read_only(tmp_path, confdir))
    proxy = ProxyProcess(home, ["run", "--port", "0"], {}).wait_listening()
    assert proxy.stop() == 0
    assert not (confdir / "config.toml").exists()
    assert "Traceback" not in proxy.log_text()


def test_a_read_only_state_folder_is_one_line_and_its_own_exit_code(
    home: Path, tmp_path: Path
) -> None:
    make_ca(home)
    state = home / ".local" / "state" / "claude-proxy"
    state.mkdir(parents=True, exist_ok=True)
    (state / "fingerprint.key").unlink(missing_ok=True)
    run = subprocess.run(
        [str(read_only(tmp_path, state)), "run", "--port", "0", "--socks-port", "0", "--quiet"],
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = run.stderr.splitlines()
    assert run.returncode == STATE, run.stderr
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("claude-proxy: cannot start: cannot write "), lines[0]
    assert str(state) in lines[0] and "Read-only file system" in lines[0]
    assert "must be writable" in lines[0]
