"""Where the proxy listens: both loopback addresses with one port, IPv4 alone where IPv6 is not."""

from __future__ import annotations

import errno
import socket

import pytest

from claude_proxy.proxy import listeners


def test_both_loopback_addresses_where_the_machine_has_them() -> None:
    assert listeners.loopback_hosts() == ("127.0.0.1", "::1")


@pytest.mark.parametrize("code", [errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT])
def test_a_machine_without_ipv6_loopback_listens_on_ipv4_alone(
    monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    real = socket.socket

    class NoIPv6(real):  # type: ignore[misc, valid-type]
        def bind(self, address: object) -> None:
            if self.family == socket.AF_INET6:
                raise OSError(code, "no IPv6 here")
            super().bind(address)

    monkeypatch.setattr(socket, "socket", NoIPv6)
    assert listeners.loopback_hosts() == ("127.0.0.1",)


def test_port_zero_is_one_free_port_on_every_host() -> None:
    specs = listeners.mode_specs(("127.0.0.1", "::1"), 0, 0)
    http_ports = {spec.rsplit(":", 1)[1] for spec in specs if spec.startswith("regular@")}
    socks_ports = {spec.rsplit(":", 1)[1] for spec in specs if spec.startswith("socks5@")}
    assert len(specs) == 4 and len(http_ports) == len(socks_ports) == 1
    assert http_ports != {"0"} and socks_ports != {"0"}
    port = int(http_ports.pop())
    for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
        with socket.socket(family) as probe:
            probe.bind((host, port))  # free on both, as promised


def test_no_socks_listener_when_none_is_asked_for() -> None:
    assert listeners.mode_specs(("127.0.0.1",), 9051, None) == ["regular@127.0.0.1:9051"]
    assert listeners.format_address("::1", 9051) == "[::1]:9051"
