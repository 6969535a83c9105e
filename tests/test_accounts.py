"""Accounts, fingerprints, state files, the probe's wire format; the `orgs` and `pin` commands."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from claude_proxy.cli import main, status_cmd
from claude_proxy.cli.diagnostics import Check
from claude_proxy.proxy import org_probe
from claude_proxy.state import accounts, paths
from claude_proxy.state.accounts import Credential, Ledger, Pin, StateError
from tests.support.files import mode

ORG_A = "0a0a0a0a-aaaa-4aaa-8aaa-00000000000a"
ORG_B = "0b0b0b0b-bbbb-4bbb-8bbb-00000000000b"
KEY = "sk-ant-api03-unit-test-key"
TOKEN = "sk-ant-oat01-unit-test-token"


@pytest.mark.parametrize(
    ("host", "anthropic"),
    [
        ("api.anthropic.com", True),
        ("anthropic.com", True),
        ("API.Anthropic.COM.", True),
        ("claude.ai", True),
        ("downloads.claude.ai", True),
        ("platform.claude.com", True),
        ("claude.com", True),
        ("evilanthropic.com", False),
        ("anthropic.com.evil.example", False),
        ("claude.ai.example", False),
        ("example.com", False),
    ],
)
def test_anthropic_hosts(host: str, anthropic: bool) -> None:
    assert accounts.is_anthropic_host(host) is anthropic


@pytest.mark.parametrize(
    ("fields", "found"),
    [
        ([("X-Api-Key", KEY)], [("x-api-key", KEY, False)]),
        ([("Authorization", f"Bearer {TOKEN}")], [("authorization", TOKEN, True)]),
        ([("authorization", f"bearer  {KEY} ")], [("authorization", KEY, False)]),
        (
            [("Authorization", "Basic dXNlcjpwdw==")],
            [("authorization", "Basic dXNlcjpwdw==", False)],
        ),
        (
            [("x-api-key", KEY), ("authorization", f"Bearer {TOKEN}")],
            [("x-api-key", KEY, False), ("authorization", TOKEN, True)],
        ),
        (
            [("x-api-key", KEY), ("x-api-key", "other")],
            [("x-api-key", KEY, False), ("x-api-key", "other", False)],
        ),
        ([("cookie", "a=b"), ("host", "api.anthropic.com")], []),
    ],
)
def test_credentials_in_headers(
    fields: list[tuple[str, str]], found: list[tuple[str, str, bool]]
) -> None:
    assert [(c.header, c.secret, c.oauth) for c in accounts.credentials(fields)] == found


def test_cookie_is_noticed() -> None:
    assert accounts.carries_cookie([("Cookie", "sessionKey=x")])
    assert not accounts.carries_cookie([("x-api-key", KEY)])


def test_a_credential_never_shows_its_value() -> None:
    assert KEY not in repr(Credential("x-api-key", KEY))


def test_fingerprint_is_keyed_and_names_the_secret_not_the_header() -> None:
    one, two = b"1" * 32, b"2" * 32
    by_key = accounts.fingerprint(one, Credential("x-api-key", KEY))
    assert by_key == accounts.fingerprint(one, Credential("authorization", f"Bearer {KEY}"))
    assert by_key != accounts.fingerprint(two, Credential("x-api-key", KEY))
    assert by_key != accounts.fingerprint(one, Credential("x-api-key", KEY + "x"))
    assert len(by_key) == 64 and int(by_key, 16) >= 0
    assert accounts.short(by_key) == by_key[:12]


def test_key_is_made_once_private_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = accounts.load_key(state)
    assert len(key) == 32
    assert mode(state / accounts.KEY_FILE) == 0o600 and mode(state) == 0o700
    assert accounts.load_key(state) == key
    assert [p.name for p in state.iterdir()] == [accounts.KEY_FILE]  # no partial file left


def test_damaged_key_is_an_error_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / accounts.KEY_FILE).write_bytes(b"short")
    with pytest.raises(StateError, match=r"damaged.*move it aside"):
        accounts.load_key(tmp_path)
    assert (tmp_path / accounts.KEY_FILE).read_bytes() == b"short"


@pytest.mark.parametrize(
    ("value", "org"),
    [
        (ORG_A, ORG_A),
        (ORG_A.upper(), ORG_A),
        (f" {ORG_A} ", ORG_A),
        (ORG_A.replace("-", ""), ORG_A),
        ("org-123", None),
        ("", None),
        (None, None),
        (42, None),
        ("0" * 100, None),
    ],
)
def test_organization_ids_are_uuids(value: object, org: str | None) -> None:
    assert accounts.organization(value) == org


def test_ledger_counts_answers_and_notices_new_or_changed() -> None:
    ledger = Ledger()
    assert ledger.record("f" * 64, ORG_A, "2026-01-01T00:00:00Z") is True
    assert ledger.record("f" * 64, ORG_A, "2026-01-02T00:00:00Z") is False
    seen = ledger.entries["f" * 64]
    assert (seen.count, seen.first_seen, seen.last_seen) == (
        2,
        "2026-01-01T00:00:00Z",
        "2026-01-02T00:00:00Z",
    )
    assert ledger.record("f" * 64, ORG_B, "2026-01-03T00:00:00Z") is True
    assert ledger.organization_of("f" * 64) == ORG_B
    assert ledger.organization_of("e" * 64) is None


def test_ledger_forgets_the_least_recently_seen_first() -> None:
    ledger = Ledger(limit=2)
    ledger.record("a" * 64, ORG_A, "2026-01-02T00:00:00Z")
    ledger.record("b" * 64, ORG_A, "2026-01-01T00:00:00Z")
    ledger.record("c" * 64, ORG_B, "2026-01-03T00:00:00Z")
    assert sorted(ledger.entries) == ["a" * 64, "c" * 64]


def test_ledger_file_round_trip_private(tmp_path: Path) -> None:
    ledger = Ledger()
    ledger.record("a" * 64, ORG_A, "2026-01-01T00:00:00Z")
    accounts.save_ledger(tmp_path, ledger)
    assert accounts.load_ledger(tmp_path) == ledger
    assert mode(tmp_path / accounts.ORGS_FILE) == 0o600
    assert accounts.load_ledger(tmp_path / "none") == Ledger()


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "[]",
        '{"credentials": {"short": {}}}',
        '{"credentials": {"' + "a" * 64 + '": {"organization": "x"}}}',
    ],
)
def test_damaged_ledger_is_an_error(tmp_path: Path, text: str) -> None:
    (tmp_path / accounts.ORGS_FILE).write_text(text)
    with pytest.raises(StateError, match="damaged"):
        accounts.load_ledger(tmp_path)


def test_ledger_merge_takes_only_what_it_lacks() -> None:
    mine, theirs = Ledger(), Ledger()
    mine.record("a" * 64, ORG_A, "t1")
    theirs.record("a" * 64, ORG_B, "t0")
    theirs.record("b" * 64, ORG_B, "t0")
    mine.merge(theirs)
    assert mine.organization_of("a" * 64) == ORG_A and mine.organization_of("b" * 64) == ORG_B


def test_pin_set_read_and_lifted(tmp_path: Path) -> None:
    assert accounts.load_pin(tmp_path) is None
    accounts.save_pin(tmp_path, Pin(ORG_A, "2026-01-01T00:00:00Z"))
    assert accounts.load_pin(tmp_path) == Pin(ORG_A, "2026-01-01T00:00:00Z")
    assert mode(tmp_path / accounts.PIN_FILE) == 0o600
    accounts.save_pin(tmp_path, None)
    assert accounts.load_pin(tmp_path) is None
    accounts.save_pin(tmp_path, None)  # lifting no pin is fine


def test_first_seen_pin_settles_once(tmp_path: Path) -> None:
    assert accounts.settle_first_seen(tmp_path, ORG_A) is None  # no pin: nothing to settle
    assert accounts.load_pin(tmp_path) is None
    accounts.save_pin(tmp_path, Pin(None, "t", first_seen=True))
    settled = accounts.settle_first_seen(tmp_path, ORG_B)
    assert settled is not None and settled.organization == ORG_B and settled.first_seen
    assert accounts.load_pin(tmp_path) == settled
    assert accounts.settle_first_seen(tmp_path, ORG_A) == settled  # later answers change nothing


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "{}",
        '{"organization": "acme", "since": "t"}',
        '{"organization": null, "since": "t"}',
    ],
)
def test_damaged_pin_is_an_error(tmp_path: Path, text: str) -> None:
    (tmp_path / accounts.PIN_FILE).write_text(text)
    with pytest.raises(StateError, match="damaged"):
        accounts.load_pin(tmp_path)


# The probe's wire format


def test_probe_for_an_api_key_carries_only_the_key() -> None:
    data = org_probe.request("api.anthropic.com", 443, Credential("x-api-key", KEY))
    assert data == (
        b"GET /v1/models?limit=1 HTTP/1.1\r\n"
        b"Host: api.anthropic.com\r\n"
        b"x-api-key: " + KEY.encode() + b"\r\n"
        b"anthropic-version: 2023-06-01\r\n"
        b"Accept: application/json\r\n"
        b"User-Agent: claude-proxy-organization-check\r\n"
        b"Connection: close\r\n\r\n"
    )


def test_probe_for_an_oauth_token_asks_the_profile() -> None:
    data = org_probe.request(
        "api.anthropic.com", 8443, Credential("authorization", f"Bearer {TOKEN}")
    )
    head = data.decode().split("\r\n")
    assert head[:4] == [
        "GET /api/oauth/profile HTTP/1.1",
        "Host: api.anthropic.com:8443",
        f"authorization: Bearer {TOKEN}",
        "anthropic-beta: oauth-2025-04-20",
    ]


def test_probe_refuses_a_value_that_would_split_the_request() -> None:
    with pytest.raises(org_probe.ProbeError, match="not a valid header value"):
        org_probe.request("api.anthropic.com", 443, Credential("x-api-key", "k\r\nX-Evil: 1"))


def read(data: bytes, reader_call: str, headers: dict[str, str] | None = None) -> object:
    async def go() -> object:
        reader = asyncio.StreamReader(limit=org_probe.MAX_HEAD)
        reader.feed_data(data)
        reader.feed_eof()
        if reader_call == "head":
            return await org_probe.read_head(reader)
        return await org_probe.read_body(reader, headers or {})

    return asyncio.run(go())


def test_probe_answer_head_and_bodies() -> None:
    head = b"HTTP/1.1 200 OK\r\nAnthropic-Organization-Id: " + ORG_A.encode() + b"\r\n\r\n"
    assert read(head, "head") == (200, {"anthropic-organization-id": ORG_A})
    assert read(b"5\r\nhello\r\n0\r\n\r\n", "body", {"transfer-encoding": "chunked"}) == b"hello"
    assert read(b"hello", "body", {"content-length": "5"}) == b"hello"
    assert read(b"hello", "body") == b"hello"  # until the server closes


@pytest.mark.parametrize(
    ("data", "headers"),
    [
        (b"", {"content-length": str(org_probe.MAX_BODY + 1)}),
        (b"x" * (org_probe.MAX_BODY + 1), {}),
        (b"%x\r\n" % (org_probe.MAX_BODY + 1), {"transfer-encoding": "chunked"}),
    ],
)
def test_probe_answer_size_is_bounded(data: bytes, headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="too large"):
        read(data, "body", headers)


def test_probe_answer_must_be_http() -> None:
    with pytest.raises(ValueError, match="not an HTTP/1 response"):
        read(b"SSH-2.0-x\r\n\r\n", "head")


@pytest.mark.parametrize(
    ("status", "body", "org"),
    [
        (200, json.dumps({"organization": {"uuid": ORG_A}}).encode(), ORG_A),
        (200, json.dumps({"organization": {"uuid": "acme"}}).encode(), None),
        (200, b"[]", None),
        (200, b"{", None),
        (401, json.dumps({"organization": {"uuid": ORG_A}}).encode(), None),
    ],
)
def test_profile_names_the_organization(status: int, body: bytes, org: str | None) -> None:
    assert org_probe.organization_in(status, body) == org


# Commands


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("XDG_STATE_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    return paths.state_dir()


def test_pin_refuses_what_is_not_an_organization(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main.main(["pin", "acme"]) == 2
    assert "'acme' is not an organization id" in capsys.readouterr().err
    assert accounts.load_pin(state) is None


def test_pin_commands_write_the_pin(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main.main(["pin", ORG_A.upper()]) == 0
    pin = accounts.load_pin(state)
    assert pin is not None and pin.organization == ORG_A and not pin.first_seen
    assert "no credential of organization" in capsys.readouterr().err  # never seen: a warning
    assert main.main(["pin", "--first-seen"]) == 0
    waiting = accounts.load_pin(state)
    assert waiting is not None and waiting.organization is None and waiting.first_seen
    assert main.main(["pin", "--off"]) == 0
    assert accounts.load_pin(state) is None


def test_orgs_lists_fingerprints_and_the_pin(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = Ledger()
    ledger.record("a" * 64, ORG_A, "2026-01-01T00:00:00Z")
    ledger.record("b" * 64, ORG_B, "2026-01-02T00:00:00Z")
    accounts.save_ledger(state, ledger)
    accounts.save_pin(state, Pin(ORG_A, "2026-01-03T00:00:00Z"))
    assert main.main(["orgs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"pin: {ORG_A} (since 2026-01-03T00:00:00Z)"
    assert lines[1].split() == [
        "ORGANIZATION",
        "FINGERPRINT",
        "FIRST",
        "SEEN",
        "LAST",
        "SEEN",
        "COUNT",
    ]
    assert lines[2].split() == [ORG_A, "a" * 12, *["2026-01-01T00:00:00Z"] * 2, "1", "pinned"]
    assert lines[3].split() == [ORG_B, "b" * 12, *["2026-01-02T00:00:00Z"] * 2, "1"]
    assert main.main(["orgs", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["pin"] == {
        "organization": ORG_A,
        "since": "2026-01-03T00:00:00Z",
        "first_seen": False,
    }
    assert [
        (c["fingerprint"], c["organization"], c["pinned"]) for c in document["credentials"]
    ] == [
        ("a" * 64, ORG_A, True),
        ("b" * 64, ORG_B, False),
    ]


def test_status_says_whether_a_pin_is_set(state: Path) -> None:
    assert status_cmd.pin_check(state) == Check(
        True, "organization pin", "off: credentials of any organization reach Anthropic"
    )
    accounts.save_pin(state, Pin(ORG_A, "2026-01-03T00:00:00Z"))
    assert status_cmd.pin_check(state).detail == f"{ORG_A} (since 2026-01-03T00:00:00Z)"
    (state / accounts.PIN_FILE).write_text("{")
    check = status_cmd.pin_check(state)
    assert not check.ok and "damaged" in check.detail


def test_orgs_and_pin_do_not_import_mitmproxy(tmp_path: Path) -> None:
    """Commands that need no proxy stay fast: importing mitmproxy alone takes ~0.75 s."""
    code = (
        "import sys; from claude_proxy.cli import main; "
        "assert main.main(['pin', '--off']) == 0 and main.main(['orgs']) == 0; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mitmproxy'))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env["HOME"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
