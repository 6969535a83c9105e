"""Anthropic accounts: credentials, their keyed fingerprints, the organizations seen, the pin.

No mitmproxy here, and a credential never reaches a file or a message: only its fingerprint, an
HMAC-SHA256 keyed by a per-install secret. State files are written atomically, mode 0600, in the
platform's state folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import hmac
import json
import os
import secrets
import shlex
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from claude_proxy.state import files

ANTHROPIC_DOMAINS = ("anthropic.com", "claude.ai", "claude.com")  # each with every subdomain
CREDENTIAL_HEADERS = ("x-api-key", "authorization")
OAUTH_PREFIX = (
    "sk-ant-oat"  # Claude Code's subscription login: Authorization: Bearer sk-ant-oat01-…
)
KEY_FILE = "fingerprint.key"
ORGS_FILE = "organizations.json"
PIN_FILE = "pin.json"
LOCK_FILE = "pin.lock"
KEY_BYTES = 32
SHOWN = 12  # fingerprint characters shown in logs, refusals and tables
MAX_CREDENTIALS = 1000  # fingerprints remembered; the least recently seen is forgotten first
VERSION = 1


class StateError(Exception):
    """A state file that cannot be read or written; the message names it and what to do."""


def is_anthropic_host(host: str) -> bool:
    host = host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in ANTHROPIC_DOMAINS)


# Credentials


@dataclass(frozen=True)
class Credential:
    """A key or token as a request carries it; its value stays in memory only."""

    header: str  # "x-api-key" or "authorization", lower case
    value: str = field(repr=False)

    @property
    def secret(self) -> str:
        """What names the account: the token of `Bearer TOKEN`, else the whole value."""
        value = self.value.strip()
        scheme, _, token = value.partition(" ")
        if self.header == "authorization" and scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return value

    @property
    def oauth(self) -> bool:
        return self.header == "authorization" and self.secret.startswith(OAUTH_PREFIX)


def credentials(fields: Iterable[tuple[str, str]]) -> list[Credential]:
    """Every credential among a request's header fields, (name, value) pairs, in order."""
    return [Credential(n.lower(), v) for n, v in fields if n.lower() in CREDENTIAL_HEADERS]


def carries_cookie(fields: Iterable[tuple[str, str]]) -> bool:
    return any(name.lower() == "cookie" for name, _ in fields)


def fingerprint(key: bytes, credential: Credential) -> str:
    secret = credential.secret.encode("utf-8", "surrogateescape")
    return hmac.new(key, secret, hashlib.sha256).hexdigest()


def short(fingerprint: str) -> str:
    return fingerprint[:SHOWN]


def organization(value: object) -> str | None:
    """`value` as an organization id (a UUID, canonical lower case), or None if it is not one."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        return None


def timestamp(when: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if when is None else when, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# Organizations seen


@dataclass
class Sighting:
    organization: str
    first_seen: str
    last_seen: str
    count: int = 1


@dataclass
class Ledger:
    """Fingerprint → the organization Anthropic's answers named for it."""

    entries: dict[str, Sighting] = field(default_factory=dict)
    limit: int = MAX_CREDENTIALS

    def organization_of(self, fingerprint: str) -> str | None:
        seen = self.entries.get(fingerprint)
        return seen.organization if seen else None

    def record(self, fingerprint: str, organization: str, when: str) -> bool:
        """Count one answer; True when the fingerprint is new or its organization changed."""
        seen = self.entries.get(fingerprint)
        if seen is None:
            self._make_room()
            self.entries[fingerprint] = Sighting(organization, when, when)
            return True
        changed = seen.organization != organization
        seen.organization, seen.last_seen, seen.count = organization, when, seen.count + 1
        return changed

    def merge(self, other: Ledger) -> None:
        """Take the fingerprints only `other` knows (another process saved them)."""
        for fp, seen in other.entries.items():
            if fp not in self.entries and len(self.entries) < self.limit:
                self.entries[fp] = seen

    def _make_room(self) -> None:
        while len(self.entries) >= self.limit:
            oldest = min(self.entries, key=lambda fp: self.entries[fp].last_seen)
            del self.entries[oldest]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "credentials": {
                fp: {
                    "organization": s.organization,
                    "first_seen": s.first_seen,
                    "last_seen": s.last_seen,
                    "count": s.count,
                }
                for fp, s in self.entries.items()
            },
        }

    @classmethod
    def from_json(cls, document: object) -> Ledger:
        if not isinstance(document, dict) or not isinstance(document.get("credentials"), dict):
            raise ValueError("no credentials object")
        ledger = cls()
        for fp, item in document["credentials"].items():
            org = organization(item.get("organization")) if isinstance(item, dict) else None
            if org is None or len(fp) != 64:
                raise ValueError(f"bad entry {fp[:SHOWN]!r}")
            first, last, count = item.get("first_seen"), item.get("last_seen"), item.get("count")
            if not (isinstance(first, str) and isinstance(last, str) and isinstance(count, int)):
                raise ValueError(f"bad entry {fp[:SHOWN]!r}")
            ledger.entries[fp] = Sighting(org, first, last, count)
        return ledger


def load_ledger(state: Path) -> Ledger:
    """The organizations seen; none when the file does not exist yet."""
    path = state / ORGS_FILE
    fix = (
        f"; move it aside (mv {shlex.quote(str(path))} {shlex.quote(str(path))}.damaged): it "
        "only records the organizations seen, and the proxy starts it again"
    )
    try:
        document = _read_json(path)
    except StateError as e:
        raise StateError(f"{e}{fix}" if "damaged" in str(e) else str(e)) from None
    if document is None:
        return Ledger()
    try:
        return Ledger.from_json(document)
    except ValueError as e:
        raise StateError(f"{path} is damaged: {e}{fix}") from None


def save_ledger(state: Path, ledger: Ledger) -> None:
    _write_json(state / ORGS_FILE, ledger.to_json())


# The pin


@dataclass(frozen=True)
class Pin:
    """Only this organization's credentials may reach Anthropic.

    `organization` None: pin whichever organization the next answer names (`pin --first-seen`).
    """

    organization: str | None
    since: str
    first_seen: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "organization": self.organization,
            "since": self.since,
            "first_seen": self.first_seen,
        }

    def describe(self) -> str:
        if self.organization is None:
            return "the first organization an answer names (none yet)"
        how = ", the first one seen" if self.first_seen else ""
        return f"{self.organization} (since {self.since}{how})"


PIN_FIX = "; `claude-proxy pin ORG_UUID` or `claude-proxy pin --off` rewrites it"


def load_pin(state: Path) -> Pin | None:
    try:
        document = _read_json(state / PIN_FILE)
    except StateError as e:
        raise StateError(f"{e}{PIN_FIX}" if "damaged" in str(e) else str(e)) from None
    if document is None:
        return None
    if not isinstance(document, dict) or not isinstance(document.get("since"), str):
        raise StateError(f"{state / PIN_FILE} is damaged: not a pin{PIN_FIX}")
    named, first_seen = document.get("organization"), document.get("first_seen") is True
    if named is None and first_seen:
        return Pin(None, document["since"], first_seen=True)
    if (org := organization(named)) is None:
        raise StateError(f"{state / PIN_FILE} is damaged: no valid organization{PIN_FIX}")
    return Pin(org, document["since"], first_seen)


def save_pin(state: Path, pin: Pin | None) -> None:
    """Set (or with None, remove) the pin."""
    with _locked(state):
        _save_pin(state, pin)


def settle_first_seen(state: Path, organization: str) -> Pin | None:
    """Turn a waiting `--first-seen` pin into a pin on `organization`; the pin as it now is."""
    with _locked(state):
        pin = load_pin(state)
        if pin is not None and pin.organization is None:
            pin = Pin(organization, timestamp(), first_seen=True)
            _save_pin(state, pin)
        return pin


def _save_pin(state: Path, pin: Pin | None) -> None:
    path = state / PIN_FILE
    if pin is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    _write_json(path, {"version": VERSION, **pin.to_json()})


# The fingerprint key


def load_key(state: Path) -> bytes:
    """The per-install fingerprint key, made on first use (0600) and never replaced."""
    path = state / KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        _make_key(path)
        return load_key(state)
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}") from None
    if len(key) != KEY_BYTES:
        raise StateError(
            f"{path} is damaged ({len(key)} bytes, not {KEY_BYTES}); move it aside to make a new "
            "one (the organizations seen so far are then learned again)"
        )
    return key


def probe_proof(state: Path) -> bytes | None:
    """What `claude-proxy status` shows to be recognised as itself: derived from the fingerprint
    key, which the agent's sandbox and file tools may not read. None while there is no key."""
    try:
        return _probe_proof(state / KEY_FILE)
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=4)
def _probe_proof(path: Path) -> bytes:
    key = path.read_bytes()  # a missing key raises: nothing is cached until it exists
    if len(key) != KEY_BYTES:
        raise ValueError("damaged key")
    return hmac.new(key, b"claude-proxy status probe", hashlib.sha256).digest()


def _make_key(path: Path) -> None:
    partial = _write_partial(path, secrets.token_bytes(KEY_BYTES))
    try:
        os.link(partial, path)  # atomic, and never over a key another process just made
    except FileExistsError:
        pass
    finally:
        partial.unlink()


# Files


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise StateError(f"{path} is damaged: not JSON") from None


def _write_json(path: Path, document: object) -> None:
    data = (json.dumps(document, indent=1, sort_keys=True) + "\n").encode()
    try:
        _private_folder(path.parent)
        files.write_atomically(path, data, 0o600)
    except OSError as e:
        raise StateError(f"cannot write {path}: {e.strerror}") from None


def _write_partial(path: Path, data: bytes) -> Path:
    """`data` in a new 0600 file beside `path`, flushed to disk."""
    try:
        _private_folder(path.parent)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    except OSError as e:
        raise StateError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        Path(name).unlink(missing_ok=True)
        raise StateError(f"cannot write {path}: {e.strerror}") from None
    return Path(name)


def _private_folder(folder: Path) -> None:
    """The state folder, 0700 (on Linux the log folder inside it may have made it 0755)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_mode & 0o077:
        folder.chmod(0o700)


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    """The pin's read-modify-write, one process at a time (the CLI and the proxy)."""
    try:
        _private_folder(state)
        fd = os.open(state / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise StateError(f"cannot write in {state}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
