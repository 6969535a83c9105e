"""The one exception that carries a message for the user and the exit code that goes with it."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # an unexpected error; the traceback is in the log
    USAGE = 2  # bad command line, rule or mitmproxy option
    ADDRESS = 3  # cannot listen: port in use, address not available, or not allowed
    CA = 4  # the CA is missing, unreadable or damaged
    STATE = 5  # a folder the proxy must write (state, logs) cannot be written
    MITMPROXY = 6  # not the mitmproxy version claude-proxy is tested with


class ProxyError(Exception):
    """A problem the user can fix; `str(self)` says what it is and how."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code
