"""mitmproxy's internals are reached through one door, `claude_proxy/mitm/`, and no other.

Outside it, the proxy uses mitmproxy's addon API (hooks, flows, connections, its addon classes)
and writes its own layers on `layer.Layer`; it does not import a private module, read a private
name of mitmproxy, h11, h2 or asyncio, subclass one of mitmproxy's own layers, servers or
handlers, or replace an attribute of theirs. Each of those lives in mitm/, where
tests/test_mitm_internals.py checks that what it relies on is still there.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "src" / "claude_proxy"
DOOR = PACKAGE / "mitm"
FOREIGN = ("mitmproxy", "h11", "h2", "hpack", "asyncio")
# mitmproxy classes that are its public extension points: an addon class, and the base of a layer
# an addon hands to `next_layer`.
PUBLIC_BASES = ("mitmproxy.proxy.layer.Layer", "mitmproxy.addons.")
PUBLIC_UNDERSCORED = {"_asdict", "_replace", "_fields", "_make"}  # namedtuple's public API
# argparse's, which cli/ reads to list subcommands for help and completion: not mitmproxy's.
ARGPARSE = {"_actions", "_SubParsersAction"}


def outside_the_door() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if DOOR not in p.parents)


def imported_names(tree: ast.Module) -> dict[str, str]:
    """Local name → the dotted name it stands for, for every import of a foreign package."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return {k: v for k, v in names.items() if v.split(".")[0] in FOREIGN}


def dotted(node: ast.expr, names: dict[str, str]) -> str | None:
    """The full foreign name an expression like `modes.Socks5Proxy` stands for, or None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in names:
        return None
    return ".".join([names[node.id], *reversed(parts)])


def private(name: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in name.split("."))


@functools.cache
def defined_privates(root: Path) -> frozenset[str]:
    """The private names the proxy's own code defines (functions, attributes, constants)."""
    names: set[str] = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return frozenset(name for name in names | PUBLIC_UNDERSCORED | ARGPARSE if private(name))


def trespasses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = imported_names(tree)
    ours = defined_privates(PACKAGE)
    found: list[str] = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(PACKAGE)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in FOREIGN:
                for alias in node.names:
                    if private(f"{node.module}.{alias.name}"):
                        found.append(f"{where}: imports {node.module}.{alias.name}")
        elif isinstance(node, ast.Attribute):
            full = dotted(node, names)
            if full is not None and private(full):
                found.append(f"{where}: reads {full}")
            elif full is None and names and private(node.attr) and node.attr not in ours:
                # In a module that imports mitmproxy, h11, h2 or asyncio: whose private is it?
                found.append(f"{where}: reads ._{node.attr.lstrip('_')}, defined by none of ours")
        elif isinstance(node, ast.ClassDef):
            for base in node.bases:
                full = dotted(base, names)
                if full and full.startswith("mitmproxy.") and not full.startswith(PUBLIC_BASES):
                    found.append(f"{where}: {node.name} subclasses {full}")
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and dotted(target.value, names):
                    found.append(f"{where}: replaces {dotted(target, names)}")
    return found


@pytest.mark.parametrize("path", outside_the_door(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_outside_mitm_reaches_into_mitmproxy(path: Path) -> None:
    assert trespasses(path) == []


def test_the_check_finds_each_kind_of_trespass(tmp_path: Path) -> None:
    """The check above would notice each thing it forbids."""
    module = tmp_path / "module.py"
    module.write_text(
        "import asyncio\n"
        "from h11._receivebuffer import ReceiveBuffer\n"
        "from mitmproxy.proxy import server\n"
        "from mitmproxy.proxy.layers import modes\n"
        "from mitmproxy.proxy import layer\n"
        "from mitmproxy.addons import tlsconfig\n"
        "class A(modes.Socks5Proxy): pass\n"
        "class B(layer.Layer): pass\n"
        "class C(tlsconfig.TlsConfig): pass\n"
        "server.ConnectionHandler.layer = None\n"
        "x = asyncio.selector_events.BaseSelectorEventLoop._accept_connection\n"
        "def f(loop): return loop._add_reader\n"
        "class D:\n"
        "    def _mine(self): return self._mine\n"
    )
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path
    try:
        found = trespasses(module)
    finally:
        PACKAGE = saved
    assert [line.split(": ", 1)[1] for line in found] == [
        "imports h11._receivebuffer.ReceiveBuffer",
        "A subclasses mitmproxy.proxy.layers.modes.Socks5Proxy",
        "replaces mitmproxy.proxy.server.ConnectionHandler.layer",
        "reads asyncio.selector_events.BaseSelectorEventLoop._accept_connection",
        "reads ._add_reader, defined by none of ours",
    ]
