"""Merging a few keys into a JSON settings document, and taking back exactly those keys.

Pure: documents in, documents out. Every key is a path of object members, such as
("sandbox", "network", "httpProxyPort").
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Key = tuple[str, ...]
Document = dict[str, Any]


class _Absent:
    """A key that does not exist (JSON has no value for that: `null` is a value)."""

    def __repr__(self) -> str:
        return "absent"


ABSENT: Any = _Absent()


class SettingsError(ValueError):
    """The document cannot be merged into; the message says why, `at` says where (LINE:COLUMN)."""

    def __init__(self, message: str, at: str = "") -> None:
        super().__init__(message)
        self.at = at


@dataclass(frozen=True)
class Change:
    key: Key
    written: Any
    previous: Any = ABSENT  # ABSENT: setup added the key, so undo removes it

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": list(self.key), "written": self.written}
        if self.previous is not ABSENT:
            out["previous"] = self.previous
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Change:
        return cls(tuple(data["key"]), data["written"], data.get("previous", ABSENT))


def dotted(key: Key) -> str:
    return ".".join(key)


def same(a: Any, b: Any) -> bool:
    """JSON equality: `true` is not `1`, and ABSENT equals only itself."""
    if a is ABSENT or b is ABSENT:
        return a is b
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def show(value: Any) -> str:
    return "absent" if value is ABSENT else json.dumps(value)


def parse(text: str) -> Document:
    """The document in `text`; an empty file is an empty object."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SettingsError(e.msg, at=f"{e.lineno}:{e.colno}") from None
    if not isinstance(value, dict):
        raise SettingsError(f"the top level is {_kind(value)}, not an object")
    return value


def render(document: Document, original: str = "") -> str:
    """JSON text for `document`, indented like `original` (two spaces if it says nothing)."""
    found = re.search(r'^([ \t]+)"', original, re.MULTILINE)
    return json.dumps(document, indent=found[1] if found else 2, ensure_ascii=False) + "\n"


def merge(
    document: Document, *, wanted: Mapping[Key, Any], defaults: Mapping[Key, Any] | None = None
) -> tuple[Document, list[Change], list[Key]]:
    """Set every `wanted` key, and every `defaults` key that is missing.

    Returns the new document, the changes (with the values they replaced) and the objects it had
    to create. Raises SettingsError, before changing anything, if a key's parent is not an object.
    """
    new = copy.deepcopy(document)
    changes: list[Change] = []
    created: list[Key] = []
    fill_in = dict(defaults or {})
    for key, value in [*wanted.items(), *fill_in.items()]:
        parent = _parent(new, key, created)
        previous = parent.get(key[-1], ABSENT)
        if (key in fill_in and previous is not ABSENT) or same(previous, value):
            continue
        parent[key[-1]] = copy.deepcopy(value)
        changes.append(Change(key, value, previous))
    return new, changes, created


def revert(
    document: Document, changes: Iterable[Change], created: Iterable[Key]
) -> tuple[Document, list[str]]:
    """Undo `changes` where the document still holds what was written; say what was left."""
    new = copy.deepcopy(document)
    notes: list[str] = []
    for change in changes:
        parent = _find(new, change.key[:-1])
        current = ABSENT if parent is None else parent.get(change.key[-1], ABSENT)
        if current is ABSENT:
            notes.append(f"{dotted(change.key)} is gone already")
        elif not same(current, change.written):
            notes.append(
                f"{dotted(change.key)} is now {show(current)}, not the {show(change.written)} "
                "setup wrote: left as it is"
            )
        elif change.previous is ABSENT:
            del parent[change.key[-1]]  # type: ignore[union-attr]
        else:
            parent[change.key[-1]] = copy.deepcopy(change.previous)  # type: ignore[index]
    for key in sorted(created, key=len, reverse=True):
        parent = _find(new, key[:-1])
        if parent is not None and parent.get(key[-1], ABSENT) == {}:
            del parent[key[-1]]  # an object setup made, now empty again
    return new, notes


def combine(earlier: Iterable[Change], later: Iterable[Change], document: Document) -> list[Change]:
    """One record of two setup runs: undo must restore what the user had before the first.

    `document` is what the later run started from. An earlier change whose value the user has
    replaced since is theirs now and is forgotten.
    """
    later_by_key = {c.key: c for c in later}
    result: list[Change] = []
    for old in earlier:
        new = later_by_key.pop(old.key, None)
        parent = _find(document, old.key[:-1])
        current = ABSENT if parent is None else parent.get(old.key[-1], ABSENT)
        ours = same(current, old.written)
        if new is None:
            if ours:
                result.append(old)
        else:
            result.append(Change(old.key, new.written, old.previous) if ours else new)
    result.extend(later_by_key.values())
    return result


def _parent(document: Document, key: Key, created: list[Key]) -> Document:
    node = document
    for depth in range(1, len(key)):
        name = key[depth - 1]
        if name not in node:
            node[name] = {}
            created.append(key[:depth])
        elif not isinstance(node[name], dict):
            where = dotted(key[:depth])
            raise SettingsError(f"{where} is {_kind(node[name])}, not an object")
        node = node[name]
    return node


def _find(document: Document, key: Key) -> Document | None:
    node: Any = document
    for name in key:
        if not isinstance(node, dict) or not isinstance(node.get(name), dict):
            return None
        node = node[name]
    return node


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return f"`{json.dumps(value)}`"
    if value is None:
        return "`null`"
    return "a number"
