"""Merging a few keys into a JSON settings document, and taking back exactly those keys.

Pure: documents in, documents out. Every key is a path of object members, such as
("sandbox", "network", "httpProxyPort"). Three kinds of edit, each undone on its own: a value
set (`Change`), a key removed (a `Change` whose `written` is ABSENT), and members appended to an
array (`Added`: the user's own members stay where they were).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping, Sequence
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
    written: Any  # ABSENT: setup removed the key, so undo puts `previous` back
    previous: Any = ABSENT  # ABSENT: setup added the key, so undo removes it

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": list(self.key)}
        if self.written is not ABSENT:
            out["written"] = self.written
        if self.previous is not ABSENT:
            out["previous"] = self.previous
        return out


@dataclass(frozen=True)
class Added:
    """Members setup appended to the array at `key` (none of them was there before)."""

    key: Key
    members: tuple[Any, ...]

    def to_json(self) -> dict[str, Any]:
        return {"key": list(self.key), "added": list(self.members)}


Edit = Change | Added


def edit_from_json(data: Mapping[str, Any]) -> Edit:
    raw = data["key"]
    if not isinstance(raw, list) or not raw or not all(isinstance(name, str) for name in raw):
        raise ValueError(f"not a key: {raw!r}")
    key = tuple(raw)
    if "added" in data:
        return Added(key, tuple(data["added"]))
    return Change(key, data.get("written", ABSENT), data.get("previous", ABSENT))


def dotted(key: Key) -> str:
    return ".".join(key)


class RawNumber:
    """A JSON number with a fraction or an exponent, kept as written: read as a float, `1e999`
    would be written back as `Infinity` (which no JSON parser reads) and `1e5` as `100000.0`."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RawNumber) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return self.text


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(text: str) -> Any:
    """JSON text to values, numbers kept as written; NaN and Infinity refused."""
    return json.loads(text, parse_float=RawNumber, parse_constant=_no_constant)


def dumps(value: Any, **options: Any) -> str:
    """Values to JSON text, each RawNumber as it was written."""
    raw: dict[str, str] = {}

    def mark(o: object) -> str:
        if not isinstance(o, RawNumber):
            raise TypeError(f"{type(o).__name__} is not JSON")
        key = f"\ue000{len(raw)}\ue000"
        raw[key] = o.text
        return key

    text = json.dumps(value, default=mark, ensure_ascii=False, **options)
    for key, number in raw.items():
        text = text.replace(json.dumps(key, ensure_ascii=False), number, 1)
    return text


def same(a: Any, b: Any) -> bool:
    """JSON equality: `true` is not `1`, and ABSENT equals only itself."""
    if a is ABSENT or b is ABSENT:
        return a is b
    return dumps(a, sort_keys=True) == dumps(b, sort_keys=True)


def show(value: Any) -> str:
    return "absent" if value is ABSENT else dumps(value)


def parse(text: str) -> Document:
    """The document in `text`; an empty file is an empty object."""
    if not text.strip():
        return {}
    try:
        value = loads(text)
    except json.JSONDecodeError as e:
        raise SettingsError(e.msg, at=f"{e.lineno}:{e.colno}") from None
    except ValueError as e:  # NaN, Infinity
        raise SettingsError(str(e)) from None
    if not isinstance(value, dict):
        raise SettingsError(f"the top level is {_kind(value)}, not an object")
    return value


def render(document: Document, original: str = "") -> str:
    """JSON text for `document`, indented like `original` (two spaces if it says nothing)."""
    found = re.search(r'^([ \t]+)"', original, re.MULTILINE)
    return dumps(document, indent=found[1] if found else 2) + "\n"


def merge(
    document: Document,
    *,
    wanted: Mapping[Key, Any],
    defaults: Mapping[Key, Any] | None = None,
    members: Mapping[Key, Sequence[Any]] | None = None,
    remove: Iterable[Key] = (),
) -> tuple[Document, list[Edit], list[Key]]:
    """Set every `wanted` key, every `defaults` key that is missing, append every one of `members`
    missing from its array, and remove the `remove` keys that are there.

    Returns the new document, the edits (with the values they replaced) and the objects and arrays
    it had to create. Raises SettingsError, before changing anything, if a key's parent is not an
    object or an array's key holds something else.
    """
    new = copy.deepcopy(document)
    edits: list[Edit] = []
    created: list[Key] = []
    fill_in = dict(defaults or {})
    for key, value in [*wanted.items(), *fill_in.items()]:
        parent = _parent(new, key, created)
        previous = parent.get(key[-1], ABSENT)
        if (key in fill_in and previous is not ABSENT) or same(previous, value):
            continue
        parent[key[-1]] = copy.deepcopy(value)
        edits.append(Change(key, value, previous))
    for key, wanted_members in (members or {}).items():
        parent = _parent(new, key, created)
        array = parent.get(key[-1], ABSENT)
        if array is ABSENT:
            array = parent[key[-1]] = []
            created.append(key)
        elif not isinstance(array, list):
            raise SettingsError(f"{dotted(key)} is {_kind(array)}, not an array")
        added = [m for m in dict.fromkeys(wanted_members) if not any(same(m, x) for x in array)]
        if added:
            array.extend(copy.deepcopy(added))
            edits.append(Added(key, tuple(added)))
    for key in remove:
        holder = _find(new, key[:-1])
        if holder is not None and key[-1] in holder:
            edits.append(Change(key, ABSENT, holder.pop(key[-1])))
    return new, edits, created


def revert(
    document: Document, edits: Iterable[Edit], created: Iterable[Key]
) -> tuple[Document, list[str]]:
    """Undo `edits` (last first) where the document still holds what was written; say what was
    left."""
    new = copy.deepcopy(document)
    notes: list[str] = []
    for edit in reversed(list(edits)):
        if isinstance(edit, Added):
            notes += _take_out(new, edit)
            continue
        parent = _find(new, edit.key[:-1])
        current = ABSENT if parent is None else parent.get(edit.key[-1], ABSENT)
        if parent is None and edit.written is ABSENT:
            notes.append(f"{dotted(edit.key[:-1])} is gone: {dotted(edit.key)} not put back")
        elif not same(current, edit.written):
            if current is ABSENT:
                notes.append(f"{dotted(edit.key)} is gone already")
            elif edit.written is ABSENT:
                notes.append(f"{dotted(edit.key)} is set again ({show(current)}): left as it is")
            else:
                notes.append(
                    f"{dotted(edit.key)} is now {show(current)}, not the {show(edit.written)} "
                    "setup wrote: left as it is"
                )
        elif edit.previous is ABSENT:
            del parent[edit.key[-1]]  # type: ignore[union-attr]
        else:
            parent[edit.key[-1]] = copy.deepcopy(edit.previous)  # type: ignore[index]
    for key in sorted(created, key=len, reverse=True):
        parent = _find(new, key[:-1])
        if parent is not None and parent.get(key[-1], ABSENT) in ({}, []):
            del parent[key[-1]]  # an object or array setup made, now empty again
    return new, notes


def _take_out(document: Document, edit: Added) -> list[str]:
    parent = _find(document, edit.key[:-1])
    array = None if parent is None else parent.get(edit.key[-1])
    if not isinstance(array, list):
        return [f"{dotted(edit.key)} is gone already"]
    notes = []
    for member in edit.members:
        at = next((i for i, x in enumerate(array) if same(x, member)), None)
        if at is None:
            notes.append(f"{show(member)} is gone from {dotted(edit.key)} already")
        else:
            del array[at]
    return notes


def combine(earlier: Iterable[Edit], later: Iterable[Edit], document: Document) -> list[Edit]:
    """One record of two setup runs: undo must restore what the user had before the first.

    `document` is what the later run started from. An earlier edit whose value the user has
    replaced since (or a member the user has taken out) is theirs now and is forgotten.
    """
    later_changes = {e.key: e for e in later if isinstance(e, Change)}
    later_added = {e.key: e for e in later if isinstance(e, Added)}
    result: list[Edit] = []
    for old in earlier:
        parent = _find(document, old.key[:-1])
        current = ABSENT if parent is None else parent.get(old.key[-1], ABSENT)
        if isinstance(old, Added):
            present = current if isinstance(current, list) else []
            kept = tuple(m for m in old.members if any(same(m, x) for x in present))
            more = later_added.pop(old.key, None)
            members = kept + (more.members if more else ())
            if members:
                result.append(Added(old.key, members))
            continue
        new = later_changes.pop(old.key, None)
        ours = same(current, old.written)
        if new is None:
            if ours:
                result.append(old)
        else:
            result.append(Change(old.key, new.written, old.previous) if ours else new)
    result.extend(later_changes.values())
    result.extend(later_added.values())
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
    found: Document = node
    return found


def _find(document: Document, key: Key) -> Document | None:
    node: Any = document
    for name in key:
        if not isinstance(node, dict) or not isinstance(node.get(name), dict):
            return None
        node = node[name]
    found: Document = node
    return found


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
