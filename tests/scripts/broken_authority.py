"""Test-only mitmproxy script: parsing a CONNECT authority fails as an import does when the
descriptors are all taken (the layer handling that client crashes)."""

import errno

from mitmproxy.net.http.http1 import read


def _broken(*args: object, **kwargs: object) -> object:
    raise OSError(errno.EMFILE, "Too many open files (simulated)")


read.url.parse_authority = _broken  # type: ignore[assignment]
