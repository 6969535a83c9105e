"""Test-only mitmproxy script: every module loaded once the proxy runs, one name a line, written
to $CLAUDE_PROXY_TEST_LOADED (then renamed into place, so the test reads it whole)."""

import os
import sys


def running() -> None:
    path = os.environ["CLAUDE_PROXY_TEST_LOADED"]
    with open(path + ".part", "w") as out:
        out.write("".join(f"{name}\n" for name in sorted(sys.modules)))
    os.replace(path + ".part", path)
