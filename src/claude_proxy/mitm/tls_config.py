"""mitmproxy's TLS settings addon, with the client's ALPN protocol chosen from the first hello.

mitmproxy 12.3's `TlsConfig` leaves the client's protocol to OpenSSL's ALPN callback, which picks
from the offers of the hello it is answering (the second one, after a HelloRetryRequest), while
the upstream is offered every protocol of the first hello, h3 included, which the TCP path
cannot serve. `GuardedTlsConfig` pins the client's protocol to the one proxy/tls_guard.py chose
from the first hello (or none), and offers the upstream that protocol only, so that the upstream
may agree or not, never pick another one.

It lives here, not with the proxy's addons, because it works through a contract inside
`TlsConfig` that no hook documents: the `client_alpn` entry of the `AppData` that
`tls_start_client` attaches to the OpenSSL connection and that `alpn_select_callback` obeys. A
release that stopped obeying it would let OpenSSL choose again, silently;
tests/test_mitm_internals.py checks that the contract is still there.

Not reported upstream; the issue one would file: "TlsConfig: the client's ALPN is chosen from
the ClientHello OpenSSL answers (the second, after HelloRetryRequest), while the upstream is
offered the first hello's protocols, including ones the TCP path cannot serve (h3)". Without it:
tests/test_tlsguard.py::test_the_client_protocol_comes_from_the_first_hello_and_only_it_goes_upstream
(its `mitmproxy` case shows TlsConfig's own choice) and, end to end,
tests/test_tls.py::test_a_supported_alpn_is_chosen_and_served.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, tls
from mitmproxy.addons import tlsconfig

from claude_proxy.proxy.tls_guard import NO_ALPN, choose_alpn, supported_alpns

logger = logging.getLogger(__name__)


# The options from which TlsConfig.configure loads the CA.
STORE_OPTIONS = ("certs", "confdir", "key_size", "cert_passphrase", "emudhra", "emudhra_old")


class GuardedTlsConfig(tlsconfig.TlsConfig):
    """mitmproxy's TlsConfig, with the ALPN protocol chosen from the first hello only.

    Also: mitmproxy's `running` loads the CA again, whatever `configure` loaded (its own FIXME:
    `configure` is not always told of confdir), and each load checks the RSA key, about 50 ms of
    every start. Here `running` loads it only when `configure` has not, for the options in force.
    Without it: tests/test_tlsguard.py (`test_the_ca_is_loaded_once_at_start`). Not reported
    upstream (the issue: "TlsConfig.running reloads the certificate store unconditionally").
    """

    loaded_for: tuple[object, ...] | None = None  # the STORE_OPTIONS the CA was loaded with

    def configure(self, updated: set[str]) -> None:
        store = self.certstore
        super().configure(updated)
        if self.certstore is not store:
            self.loaded_for = store_options()

    def running(self) -> None:
        if self.certstore is None or self.loaded_for != store_options():
            super().running()
            self.loaded_for = store_options()

    def tls_start_client(self, tls_start: tls.TlsData) -> None:
        super().tls_start_client(tls_start)
        try:
            if tls_start.ssl_conn is not None:
                pin_client_alpn(tls_start)
        except Exception as e:
            logger.error("no TLS with the client: choosing its protocol failed: %r", e)
            tls_start.ssl_conn = None  # mitmproxy then closes the connection

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        super().tls_start_server(tls_start)
        try:
            if tls_start.ssl_conn is not None:
                offer_upstream(tls_start)
        except Exception as e:
            logger.error("no TLS with the upstream: choosing its protocols failed: %r", e)
            tls_start.ssl_conn = None


def store_options() -> tuple[object, ...]:
    return tuple(repr(getattr(ctx.options, name, None)) for name in STORE_OPTIONS)


def pin_client_alpn(tls_start: tls.TlsData) -> None:
    """OpenSSL agrees to exactly the protocol chosen from the first hello, or to none."""
    assert tls_start.ssl_conn is not None
    app_data: tlsconfig.AppData = tls_start.ssl_conn.get_app_data()
    forced = app_data["client_alpn"]  # mitmproxy forces http/1.1 in some modes
    offers = tls_start.conn.alpn_offers if forced is None else [forced]
    app_data["client_alpn"] = choose_alpn(offers, ctx.options.http2) or NO_ALPN


def offer_upstream(tls_start: tls.TlsData) -> None:
    """The upstream is offered the protocol agreed with the client: it may agree or not, never
    pick another one."""
    assert tls_start.ssl_conn is not None
    client = tls_start.context.client
    if client.tls_established:
        offers = [client.alpn] if client.alpn else []
    else:
        offers = [o for o in client.alpn_offers if o in supported_alpns(ctx.options.http2)]
    if offers:
        tls_start.ssl_conn.set_alpn_protos(offers)
    elif tls_start.conn.alpn_offers:  # pyOpenSSL cannot unset what TlsConfig offered
        raise ValueError("the upstream would be offered protocols the client did not agree to")
    tls_start.conn.alpn_offers = offers
