"""This machine's own addresses."""

from __future__ import annotations

import ipaddress
import socket


def this_machines_address() -> str | None:
    """A non-loopback address of this machine (a UDP connect sends nothing), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))
        except OSError:
            return None
        own = probe.getsockname()[0]
    return None if ipaddress.ip_address(own).is_loopback else own


REFUSED_CONNECTS = [
    b"mozilla.org:443",
    b"127.0.0.1:443",  # IPv4 literal
    b"[::1]:443",  # IPv6 literal
    b"2130706433:443",  # 127.0.0.1 as a decimal number
    b"0x7f.1:443",  # hex and short forms of an IPv4 address
    b"api.anthropic.com.evil.example:443",  # merely starts like an allowed name
    b"evilanthropic.com:443",  # merely ends like one
    b"anthropic.com.:8443",  # allowed host, other port
    b"api.anthropic.com:80",
    b"api.anthropic.com:8443",
    b"user@api.anthropic.com:443",  # userinfo
    b"api%2eanthropic.com:443",  # percent-encoding
    "\u0430pi.anthropic.com:443".encode(),  # Cyrillic a: a Unicode look-alike
    b"xn--pi-7kc.anthropic.com.evil.example:443",
    b"mitm.it:443",  # mitmproxy's onboarding host
    b"mitm.it:80",
    b"localhost:443",
]
