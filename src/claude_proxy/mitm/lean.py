"""mitmproxy's addons package, without importing every default addon at start.

`mitmproxy/addons/__init__.py` imports all of mitmproxy's default addons, to offer
`default_addons()`: the onboarding web app (with Flask), proxy authentication (with ldap3),
client and server playback, HAR export and some thirty more. The proxy runs six of them, named in
`proxy/service.py::build_master`, and never calls `default_addons()`; the others cost a large
part of every start's CPU (docs/performance.md, start-up). `install` registers the package without
running its `__init__.py`, so that an addon module is imported only when something names it
(`from mitmproxy.addons import proxyserver` still works: a package's submodules do not need its
`__init__` to have run). Without it: tests/test_cli_startup.py
(`test_run_does_not_import_the_addons_it_does_not_use`). Not reported upstream (the issue one
would file: "import the default addons lazily, e.g. inside default_addons()").

It must run before anything imports mitmproxy.addons, and changes nothing once that has happened.
"""

from __future__ import annotations

import importlib.util
import sys

PACKAGE = "mitmproxy.addons"


def install() -> None:
    if PACKAGE in sys.modules:
        return  # imported whole already (a test process, a user's script): nothing to save
    import mitmproxy

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        return  # not a package any more: the import then fails where it is named, loudly
    package = importlib.util.module_from_spec(spec)  # its __path__, not its __init__ run
    sys.modules[PACKAGE] = package
    mitmproxy.addons = package  # type: ignore[attr-defined]
