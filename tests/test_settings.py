"""Merging into a settings document and taking back exactly what was merged (pure functions)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from claude_proxy.cli import claude_settings
from claude_proxy.cli.claude_settings import ABSENT, Added, Change

DENY = ("permissions", "deny")
EXCLUDED = ("sandbox", "excludedCommands")


def merge(document: dict[str, Any], **kwargs: Any) -> tuple[dict[str, Any], list[Any], list[Any]]:
    kwargs.setdefault("wanted", {})
    return claude_settings.merge(document, **kwargs)


@pytest.mark.parametrize(
    ("before", "wanted", "after", "added"),
    [
        ({}, ["a", "b"], {"permissions": {"deny": ["a", "b"]}}, ("a", "b")),
        ({"permissions": {"deny": ["x"]}}, ["a"], {"permissions": {"deny": ["x", "a"]}}, ("a",)),
        (
            {"permissions": {"deny": ["a", "x"]}},
            ["a", "b"],
            {"permissions": {"deny": ["a", "x", "b"]}},
            ("b",),
        ),
        ({"permissions": {"deny": ["a"]}}, ["a"], {"permissions": {"deny": ["a"]}}, None),
        ({}, ["a", "a"], {"permissions": {"deny": ["a"]}}, ("a",)),
    ],
    ids=["new-array", "appended", "only-the-missing", "all-there", "asked-twice"],
)
def test_members_are_appended_where_missing(
    before: dict[str, Any], wanted: list[str], after: dict[str, Any], added: tuple[str, ...] | None
) -> None:
    new, edits, _ = merge(before, members={DENY: wanted})
    assert new == after
    assert edits == ([Added(DENY, added)] if added else [])


@pytest.mark.parametrize(
    "before",
    [
        {},
        {"permissions": {"allow": ["Bash(ls:*)"]}},
        {"permissions": {"deny": ["Read(~/.ssh/**)"]}},
        {"permissions": {"deny": []}},
    ],
    ids=["nothing", "sibling-key", "users-member", "empty-array"],
)
def test_undo_of_members_restores_the_document(before: dict[str, Any]) -> None:
    new, edits, created = merge(before, members={DENY: ["a", "b"]})
    back, notes = claude_settings.revert(new, edits, created)
    assert back == before and notes == []


def test_undo_keeps_members_the_user_added_and_says_which_of_ours_are_gone() -> None:
    new, edits, created = merge({}, members={DENY: ["a", "b"]})
    new["permissions"]["deny"] = ["mine", "b"]  # the user took "a" out and added their own
    back, notes = claude_settings.revert(new, edits, created)
    assert back == {"permissions": {"deny": ["mine"]}}
    assert notes == ['"a" is gone from permissions.deny already']


def test_an_array_key_that_holds_something_else_is_refused() -> None:
    with pytest.raises(
        claude_settings.SettingsError, match=r"permissions\.deny is a string, not an array"
    ):
        merge({"permissions": {"deny": "all"}}, members={DENY: ["a"]})


def test_removed_keys_come_back_on_undo() -> None:
    before = {"sandbox": {"excludedCommands": ["docker"], "enabled": False}}
    new, edits, created = merge(
        before, wanted={("sandbox", "enabled"): True}, remove=[EXCLUDED, ("sandbox", "nothing")]
    )
    assert new == {"sandbox": {"enabled": True}}
    assert Change(EXCLUDED, ABSENT, ["docker"]) in edits
    back, notes = claude_settings.revert(new, edits, created)
    assert back == before and notes == []


def test_a_removed_key_set_again_by_the_user_is_left_alone() -> None:
    new, edits, created = merge({"sandbox": {"excludedCommands": ["docker"]}}, remove=[EXCLUDED])
    new["sandbox"]["excludedCommands"] = ["make"]
    back, notes = claude_settings.revert(new, edits, created)
    assert back == {"sandbox": {"excludedCommands": ["make"]}}
    assert notes == ['sandbox.excludedCommands is set again (["make"]): left as it is']


def test_record_round_trip() -> None:
    edits = [
        Change(("a",), 1),
        Change(("b",), ABSENT, [1]),
        Change(("c",), True, False),
        Added(DENY, ("x", "y")),
    ]
    assert [claude_settings.edit_from_json(e.to_json()) for e in edits] == edits


@pytest.mark.parametrize("bad", [{"key": []}, {"key": [1]}, {"key": "deny"}])
def test_a_damaged_record_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        claude_settings.edit_from_json(bad)


def test_two_runs_undo_to_what_was_there_before_the_first() -> None:
    original = {"permissions": {"deny": ["mine"]}}
    first, first_edits, created = merge(original, members={DENY: ["a", "b"]})
    second, second_edits, more = merge(copy.deepcopy(first), members={DENY: ["b", "c"]})
    combined = claude_settings.combine(first_edits, second_edits, first)
    back, notes = claude_settings.revert(second, combined, [*created, *more])
    assert back == original and notes == []


def test_a_member_the_user_took_out_between_runs_is_forgotten() -> None:
    first, first_edits, _ = merge({}, members={DENY: ["a", "b"]})
    first["permissions"]["deny"].remove("a")
    combined = claude_settings.combine(first_edits, [], first)
    assert combined == [Added(DENY, ("b",))]


def test_numbers_are_written_back_as_they_were_written() -> None:
    """1e999 read as a float comes back as Infinity, which no JSON parser (Node's) accepts."""
    text = '{\n  "a": 1e999,\n  "b": 1.50,\n  "c": 1E5,\n  "d": -0.0,\n  "e": 12\n}\n'
    document = claude_settings.parse(text)
    assert claude_settings.render(document, text) == text
    new, edits, _ = merge(document, wanted={("a",): 2})
    assert '"a": 2,' in claude_settings.render(new, text)
    back, _ = claude_settings.revert(new, edits, [])
    assert claude_settings.render(back, text) == text


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_constants_that_are_not_json_are_refused(constant: str) -> None:
    with pytest.raises(claude_settings.SettingsError, match=f"{constant} is not JSON"):
        claude_settings.parse(f'{{"a": {constant}}}')
