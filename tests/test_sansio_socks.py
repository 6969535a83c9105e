"""The SOCKS5 layer sans I/O, in mitmproxy's Playbook style: each exchange once with the proxy's
layer (`ours`) and once with mitmproxy's own `Socks5Proxy` (`mitmproxy`), which shows what the
proxy would answer without mitm/socks5.py. The same answers end to end are in tests/test_socks.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mitmproxy import connection
from mitmproxy.proxy import layer
from mitmproxy.proxy.commands import CloseConnection, SendData
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.events import DataReceived
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.mode_servers import Socks5Instance
from mitmproxy.test import taddons

from claude_proxy.defaults import SOCKS_PROBE_METHOD
from claude_proxy.mitm import socks5
from claude_proxy.mitm.socks5 import CheckedSocks5Proxy
from claude_proxy.policy.rules import DEFAULT_RULES, Decision, Policy
from claude_proxy.proxy.enforcer import Enforcer
from claude_proxy.proxy.socks import SocksPolicy
from claude_proxy.record.decisions import Recorder
from claude_proxy.state import accounts, paths
from tests.support.playbook import Playbook
from tests.support.sansio import client_context
from tests.support.socks import socks_request

GREETING = b"\x05\x01\x00"  # SOCKS5, one method: no authentication
NO_AUTH = b"\x05\x00"
SUCCEEDED = b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
NOT_ALLOWED = b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"
NO_ACCEPTABLE_METHOD = b"\x05\xff"
PROBE_GREETING = bytes([5, 2, 0, SOCKS_PROBE_METHOD])


class Recorded:
    """The Enforcer's tunnel decision, with each question it was asked."""

    def __init__(self, enforcer: Enforcer) -> None:
        self.enforcer = enforcer
        self.asked: list[tuple[str, int]] = []

    def __call__(self, client: connection.Client, host: str, port: int) -> Decision:
        self.asked.append((host, port))
        return self.enforcer.open_tunnel(client, host, port)


@pytest.fixture
def tctx() -> Context:
    context = client_context()
    context.options.connection_strategy = "lazy"  # as the service sets it
    return context


@pytest.fixture
def decide() -> Iterator[Recorded]:
    enforcer = Enforcer()
    with taddons.context(enforcer) as tctx:
        tctx.configure(enforcer, listen_host="127.0.0.1")
        enforcer.use_policy(Policy.from_texts(DEFAULT_RULES))
        yield Recorded(enforcer)


@pytest.fixture
def over_cap() -> set[str]:
    """Client ids the client cap refused."""
    return set()


@pytest.fixture
def policy(decide: Recorded, over_cap: set[str]) -> SocksPolicy:
    return SocksPolicy(decide, lambda client_id: client_id in over_cap, Recorder())


Make = Callable[[Context], layer.Layer]


@pytest.fixture(params=["ours", "mitmproxy"])
def make(request: pytest.FixtureRequest, policy: SocksPolicy) -> Make:
    if request.param == "ours":
        return lambda context: CheckedSocks5Proxy(context, policy)
    return modes.Socks5Proxy


def ours(make: Make) -> bool:
    return make is not modes.Socks5Proxy


def test_a_refused_target_gets_0x02_and_a_close(
    tctx: Context, make: Make, decide: Recorded, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    client = tctx.client
    playbook = (
        Playbook(make(tctx))
        >> DataReceived(client, GREETING)
        << SendData(client, NO_AUTH)
        >> DataReceived(client, socks_request("mozilla.org", 443))
    )
    if ours(make):
        assert (
            playbook
            << SendData(client, NOT_ALLOWED)
            << CloseConnection(client)
            << CloseConnection(client)  # mitmproxy's own, after its 0x04 was held back: a no-op
            >> DataReceived(client, b"\x16\x03\x01")
            << None  # nothing more is read
        )
        assert decide.asked == [("mozilla.org", 443)]
        assert 'BLOCK SOCKS5 mozilla.org:443 - - "mozilla.org is not on the allowlist"' in (
            caplog.text
        )
    else:  # mitmproxy says "succeeded" before any hook has seen the target
        assert playbook << SendData(client, SUCCEEDED)
        assert decide.asked == []


def test_an_allowed_target_succeeds_once_decided(
    tctx: Context, make: Make, decide: Recorded, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    client = tctx.client
    request = socks_request("api.anthropic.com", 443)
    playbook = Playbook(make(tctx))
    assert (
        playbook
        >> DataReceived(client, GREETING)
        << SendData(client, NO_AUTH)
        >> DataReceived(client, request[:-1])  # the port's last byte still to come
        << None
    )
    assert decide.asked == []
    assert playbook >> DataReceived(client, request[-1:]) << SendData(client, SUCCEEDED)
    assert tctx.server.address == ("api.anthropic.com", 443)
    if ours(make):
        assert decide.asked == [("api.anthropic.com", 443)]
        assert decide.enforcer.tunnels[client.id] == ("api.anthropic.com", 443)
        assert "ALLOW SOCKS5 api.anthropic.com:443" in caplog.text
    else:
        assert decide.asked == [] and client.id not in decide.enforcer.tunnels


def test_a_client_over_the_cap_gets_no_acceptable_method(
    tctx: Context, make: Make, over_cap: set[str]
) -> None:
    over_cap.add(tctx.client.id)
    client = tctx.client
    playbook = Playbook(make(tctx))
    if ours(make):
        assert (
            playbook
            >> DataReceived(client, GREETING)
            << SendData(client, NO_ACCEPTABLE_METHOD)
            << CloseConnection(client)
        )
        assert playbook >> DataReceived(client, socks_request("api.anthropic.com", 443)) << None
    else:  # mitmproxy takes every client
        assert playbook >> DataReceived(client, GREETING) << SendData(client, NO_AUTH)


@pytest.fixture
def proof(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """The status probe's proof, from a key in a fresh state folder."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    accounts.load_key(paths.state_dir())
    found = accounts.probe_proof(paths.state_dir())
    assert found is not None
    return found


def test_the_probe_method_with_the_right_proof_is_a_probe(
    tctx: Context, make: Make, proof: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="claude_proxy")
    client = tctx.client
    playbook = Playbook(make(tctx))
    if not ours(make):  # mitmproxy knows no such method, and picks "no authentication"
        assert playbook >> DataReceived(client, PROBE_GREETING) << SendData(client, NO_AUTH)
        return
    assert (
        playbook
        >> DataReceived(client, PROBE_GREETING)
        << SendData(client, bytes([5, SOCKS_PROBE_METHOD]))
        >> DataReceived(client, bytes([len(proof)]) + proof)
        << SendData(client, b"\x01\x00")
        >> DataReceived(client, socks_request("api.anthropic.com", 443))
        << SendData(client, SUCCEEDED)
    )
    assert "probe: ALLOW SOCKS5 api.anthropic.com:443" in caplog.text


def test_the_probe_method_with_a_wrong_proof_is_refused_and_closed(
    tctx: Context, make: Make, proof: bytes
) -> None:
    client = tctx.client
    wrong = bytes(b ^ 1 for b in proof)
    playbook = Playbook(make(tctx))
    if not ours(make):
        assert playbook >> DataReceived(client, PROBE_GREETING) << SendData(client, NO_AUTH)
        return
    assert (
        playbook
        >> DataReceived(client, PROBE_GREETING + bytes([len(wrong)]) + wrong)
        << SendData(client, bytes([5, SOCKS_PROBE_METHOD]) + b"\x01\x01")
        << CloseConnection(client)
    )
    assert playbook >> DataReceived(client, socks_request("api.anthropic.com", 443)) << None


def test_only_the_probe_method_and_no_proof_is_refused(tctx: Context, make: Make) -> None:
    """A client that offers the private method alone and shows nothing proves nothing."""
    client = tctx.client
    greeting = bytes([5, 1, SOCKS_PROBE_METHOD])
    playbook = Playbook(make(tctx))
    if not ours(make):
        assert (
            playbook
            >> DataReceived(client, greeting)
            << SendData(client, NO_ACCEPTABLE_METHOD + b"\x00\x01" + bytes(6))
            << CloseConnection(client)
        )
        return
    assert (
        playbook
        >> DataReceived(client, greeting + b"\x00")
        << SendData(client, bytes([5, SOCKS_PROBE_METHOD]) + b"\x01\x01")
        << CloseConnection(client)
    )


def test_install_makes_it_the_socks5_listeners_top_layer(policy: SocksPolicy) -> None:
    original = Socks5Instance.make_top_layer
    try:
        socks5.install(policy)
        top = Socks5Instance.make_top_layer(None, client_context())  # type: ignore[arg-type]
    finally:
        Socks5Instance.make_top_layer = original  # type: ignore[method-assign]
    assert isinstance(top, CheckedSocks5Proxy) and top.policy is policy
