"""No allowed name may lead to this machine, the local network or a metadata service."""

from __future__ import annotations

import ipaddress

import pytest

from claude_proxy.policy import addresses
from tests.conftest import ProxyFactory, ProxyProcess, curl
from tests.support.net import this_machines_address
from tests.upstream import Upstream


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.5", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "unique-local"),
        ("169.254.169.254", "link-local"),
        ("fd00:ec2::254", "unique-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("0.0.0.0", "this network"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "reserved"),
        ("::ffff:192.168.1.1", "private, embedded"),
        ("::ffff:127.0.0.1", "loopback, embedded"),
        ("::127.0.0.1", "loopback, embedded"),  # IPv4-compatible
        ("::ffff:0:127.0.0.1", "loopback, embedded"),  # IPv4-translated (SIIT)
        ("::ffff:0:a9fe:a9fe", "link-local (cloud metadata lives here), embedded"),
        ("64:ff9b::a00:1", "private, embedded"),  # NAT64 of 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata lives here), embedded"),
        ("2002:c0a8:101::1", "private, embedded"),  # 6to4 of 192.168.1.1
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", None),  # Teredo of public addresses
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "documentation (TEST-NET-1), embedded"),
        ("8.8.8.8", None),
        ("203.0.113.10", "documentation (TEST-NET-3)"),
        ("192.0.2.1", "documentation (TEST-NET-1)"),
        ("198.51.100.7", "documentation (TEST-NET-2)"),
        ("198.19.255.1", "benchmarking"),
        ("2001:db8::5", "documentation"),
        ("::ffff:192.0.2.1", "documentation (TEST-NET-1), embedded"),
        ("2606:4700::1111", None),
        ("172.32.0.1", None),
        ("100.128.0.1", None),
    ],
)
def test_forbidden_ranges(address: str, why: str | None) -> None:
    found = addresses.forbidden(ipaddress.ip_address(address))
    if why is None:
        assert found is None
    else:
        assert found is not None and found.startswith(why)


def test_addresses_of_this_machine() -> None:
    assert addresses.is_this_machine(ipaddress.ip_address("127.0.0.1"))
    assert not addresses.is_this_machine(ipaddress.ip_address("203.0.113.10"))
    if (own := this_machines_address()) is not None:
        assert addresses.is_this_machine(ipaddress.ip_address(own))


RESOLVES = {
    "loop.internal.example": "127.0.0.1",
    "private.internal.example": "10.0.0.5",
    "router.internal.example": "192.168.1.1",
    "metadata.internal.example": "169.254.169.254",
    "metadata6.internal.example": "fd00:ec2::254",
    "cgnat.internal.example": "100.64.0.1",
    "zero.internal.example": "0.0.0.0",
    "mapped.internal.example": "::ffff:192.168.1.1",
    "nat64.internal.example": "64:ff9b::a00:1",
    "mixed.internal.example": "203.0.113.10,10.0.0.1",
    "docs.internal.example": "192.0.2.5",  # a documentation range: some networks use them
    "bench.internal.example": "198.18.0.9",
    "claude.ai": "127.0.0.1",  # an allowed default name
}
if (OWN := this_machines_address()) is not None:
    RESOLVES["self.internal.example"] = OWN


@pytest.fixture(scope="module")
def fenced(module_proxy: ProxyFactory) -> ProxyProcess:
    resolve = ";".join(f"{name}={address}" for name, address in RESOLVES.items())
    return module_proxy(
        "--allow",
        "*.internal.example",
        "--allow",
        "127.0.0.1",
        env={"CLAUDE_PROXY_TEST_RESOLVE": resolve},
    )


@pytest.mark.parametrize("name", sorted(RESOLVES))
def test_allowed_name_resolving_to_a_forbidden_address_is_refused(
    fenced: ProxyProcess, upstream: Upstream, name: str
) -> None:
    result = curl(fenced, "-i", f"https://{name}/")
    assert result.returncode == 0, result.stderr
    statuses = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("HTTP/")]
    assert statuses == ["200", "502"], result.stdout  # the CONNECT, then the request
    forbidden = RESOLVES[name].split(",")[-1]
    assert f"{name} resolves to {forbidden}" in result.stdout
    assert "proxy-status: claude-proxy; error=destination_ip_prohibited;" in result.stdout.lower()
    log = fenced.log_text()
    assert f"BLOCK upstream connection: {name} resolves to {forbidden}" in log
    assert f'BLOCK GET {name}:443 / 502 "{name} resolves to {forbidden}' in log
    assert upstream.seen.connections == 0


def test_allowed_name_resolving_to_a_public_address_goes_through(
    fenced: ProxyProcess, upstream: Upstream
) -> None:
    result = curl(fenced, "https://api.anthropic.com/ok")
    assert result.returncode == 0, result.stderr
    assert upstream.seen.requests == [("GET", "/ok", "api.anthropic.com")]


def test_a_rule_naming_the_ip_literal_allows_it(fenced: ProxyProcess, upstream: Upstream) -> None:
    result = curl(fenced, "https://127.0.0.1/literal")
    assert result.returncode == 0, result.stderr
    assert upstream.seen.requests == [("GET", "/literal", "127.0.0.1")]
