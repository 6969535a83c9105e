"""The mitmproxy addon that enforces the allowlist at every point a destination is named.

Every hook fails closed: mitmproxy lets traffic through when a hook raises, so each hook catches
its own errors and refuses. The addon also owns the `next_layer` decision (mitmproxy's NextLayer
addon is not loaded), so no connection is relayed as raw TCP or TLS uninspected, except the
client's own TLS to a pass-through destination of the user's policy (passthrough.py).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from mitmproxy import connection, ctx, exceptions, http, tls
from mitmproxy.net.http.http1 import expected_http_body_size
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import layer, layers, mode_specs, server_hooks
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.layers.tls import parse_client_hello

from claude_proxy.mitm.client_tls import GuardedClientTLSLayer
from claude_proxy.mitm.connections import Connections
from claude_proxy.policy import rules
from claude_proxy.policy.addresses import is_loopback
from claude_proxy.policy.rules import Decision, Policy
from claude_proxy.proxy import answers, passthrough, upstream_failures, wellformed
from claude_proxy.proxy.admission import CloseTunnel, Limits
from claude_proxy.proxy.held_bodies import Held
from claude_proxy.record.decisions import (
    FAILURE,
    REFUSED,
    SENT_DOWN,
    SENT_UP,
    Recorder,
    count_body,
    printable,
)

logger = logging.getLogger(__name__)

UNSUPPORTED_OPTIONS = ("ignore_hosts", "allow_hosts", "tcp_hosts", "udp_hosts")
SAFE_TLS_VERSIONS = ("TLS1_2", "TLS1_3")
# mitmproxy options whose other values would weaken a check: name → (is the value safe?, why)
GUARDED_OPTIONS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "validate_inbound_headers": (
        bool,
        "must stay on: malformed headers would be forwarded to the upstream",
    ),
    "rawtcp": (
        lambda v: not v,
        "must stay off: bytes after a non-WebSocket 101 would be relayed unchecked",
    ),
    "ssl_insecure": (lambda v: not v, "must stay off: upstream certificates are always verified"),
    "upstream_cert": (
        lambda v: not v,
        "must stay off: it connects upstream before a request has been checked",
    ),
    "store_streamed_bodies": (
        lambda v: not v,
        "must stay off: it keeps every streamed body in memory",
    ),
    "proxy_debug": (lambda v: not v, "must stay off: it logs request details"),
    "tls_version_client_min": (
        lambda v: v in SAFE_TLS_VERSIONS,
        "must be TLS1_2 or TLS1_3",
    ),
    "tls_version_server_min": (
        lambda v: v in SAFE_TLS_VERSIONS,
        "must be TLS1_2 or TLS1_3",
    ),
}
PASS = "PASS"  # how pass-through tunnels appear in the decision log
DECISION = "claude_proxy.decision"  # flow.metadata: (decision, host, port) of an allowed request
GENERATION = "claude_proxy.generation"  # flow.metadata: (policy generation, scheme) of a decision
CLOSED = "claude_proxy.closed"  # flow.metadata: its connection was closed for it (logged once)
MAX_REFUSED_BODY = 64 * 1024  # a refused request with a larger body is closed, not answered
Destination = tuple[str, int]


class Enforcer:
    """Decides every point where a destination is named: CONNECT, SOCKS5, the TLS ClientHello
    inside a tunnel, every request, every upstream connection.

    `service.build_master` gives it what it works with: the recorder that writes each decision,
    the client limits that build its HTTP layers, and mitmproxy's connections (to close a
    tunnel a new policy refuses). Left out (unit tests): a recorder that only logs, default
    limits, and no connection to close.
    """

    def __init__(
        self,
        recorder: Recorder | None = None,
        limits: Limits | None = None,
        connections: Connections | None = None,
    ) -> None:
        self.recorder = recorder or Recorder()
        self.limits = limits or Limits(Held(), self.recorder)
        self.connections = connections
        self.policy = Policy((), source="no policy yet")  # refuses everything until one is given
        self.generation = 0  # how many policies there have been
        self.tunnels: dict[str, Destination] = {}  # client connection id → its CONNECT target
        self.spliced: set[str] = set()  # client connection ids of pass-through tunnels
        # flow id → an allowed request or WebSocket outside any tunnel (`GET http://…`), while
        # it is open: it has no tunnel to close, so a new policy decides it on its own
        self.untunnelled = OpenFlows()
        self.in_flight = 0  # allowed requests whose response has not ended

    def use_policy(self, new: Policy) -> None:
        """From now on every decision, in open tunnels too, is made by `new`; an open tunnel it
        refuses is closed at once (a WebSocket, an upload still streaming, a request waiting)."""
        self.policy = new
        self.generation += 1
        if self.tunnels or self.untunnelled:
            try:
                self.close_refused()
            except Exception:
                logger.exception("closing the tunnels the new policy refuses failed")

    def open_client(self, client_id: str) -> connection.Client | None:
        """A client connection still open, or None (also before the proxy runs)."""
        return self.connections.client(client_id) if self.connections is not None else None

    def close_client(self, client_id: str, why: str) -> None:
        """Close a client connection at once, as mitmproxy's own idle timeout does."""
        if self.connections is not None:
            self.connections.close(client_id, why)

    def close_refused(self) -> None:
        """Close each open tunnel, and each flow outside a tunnel, the policy now refuses, each
        on its own: a pass-through relay asks nothing afterwards, so one that a failure here
        skipped would stay open."""
        for client_id, (host, port) in list(self.tunnels.items()):
            close = functools.partial(self._close_if_refused, client_id, host, port)
            self._fail_closed(client_id, close)
        for flow_id, (flow, host, port) in list(self.untunnelled.items()):
            close = functools.partial(self._close_flow_if_refused, flow_id, flow, host, port)
            self._fail_closed(flow.client_conn.id, close)

    def _fail_closed(self, client_id: str, close: Callable[[], None]) -> None:
        """Decide one connection again; one that could not be decided is closed all the same."""
        try:
            close()
        except Exception:
            logger.exception("closing the connections the new policy refuses: one failed")
            try:
                self.close_client(client_id, "closed: the policy changed")
            except Exception:
                logger.exception("closing a connection failed")

    def _close_if_refused(self, client_id: str, host: str, port: int) -> None:
        decision = self.decide(host, port)
        spliced = client_id in self.spliced
        if decision.allowed and decision.inspect != spliced:
            return
        if (client := self.open_client(client_id)) is None:
            return
        why = f"closed: the policy now refuses {host}:{port}"
        if decision.allowed:  # allowed, but inspected where it was passed through, or back
            why = f"closed: the policy now {'inspects' if spliced else 'passes through'} it"
        socks = client.proxy_mode.type_name == "socks5"
        self.recorder.line(
            PASS if spliced else ("SOCKS5" if socks else "CONNECT"),
            host,
            port,
            "-",
            None,
            Decision(False, f"{why} ({decision.reason})" if not decision.allowed else why),
            started=time.time(),
            client=client,
        )
        self.close_client(client_id, why)

    def _close_flow_if_refused(
        self, flow_id: str, flow: http.HTTPFlow, host: str, port: int
    ) -> None:
        if flow.metadata.get(CLOSED):  # closed already (a new pin): its connection is going
            del self.untunnelled[flow_id]
            return
        again = self.recheck(flow, host, port)
        if again is None or again.allowed:
            return
        del self.untunnelled[flow_id]
        why = f"closed: the policy now refuses {host}:{port}"
        refused = Decision(False, f"{why} ({again.reason})", again.rule, origin=again.origin)
        self.close_flow(flow, host, port, refused, why)

    def close_flow(
        self, flow: http.HTTPFlow, host: str, port: int, refused: Decision, why: str
    ) -> None:
        """Close the client connection of an open flow (a request, a WebSocket) that a new policy
        or pin refuses, with one line for it, a WebSocket's too (its request was logged when it
        opened). Closed even when the line fails: the next check is at the next change."""
        flow.metadata[CLOSED] = True
        if flow.metadata.pop(DECISION, None) is not None:
            self.in_flight -= 1  # ended here: _finish will not count it
        try:
            self.recorder.decision(flow, refused, host=host, port=port, status=None)
        finally:
            self.close_client(flow.client_conn.id, why)

    def load(self, loader: object) -> None:
        add = loader.add_option  # type: ignore[attr-defined]
        add(
            "sandbox_remote_clients",
            bool,
            False,
            "Accept clients from other machines and listen on non-loopback addresses. Anyone who "
            "can reach the port can then use the proxy.",
        )

    def configure(self, updated: set[str]) -> None:
        for name in UNSUPPORTED_OPTIONS:
            if name in updated and getattr(ctx.options, name, None):
                raise exceptions.OptionsError(
                    f"{name} is not supported: claude-proxy inspects every connection"
                )
        for name in updated & GUARDED_OPTIONS.keys():
            safe, why = GUARDED_OPTIONS[name]
            if not safe(getattr(ctx.options, name)):
                raise exceptions.OptionsError(f"{name} {why}")
        if "connection_strategy" in updated and ctx.options.connection_strategy != "lazy":
            raise exceptions.OptionsError(
                "connection_strategy must be lazy: "
                "no upstream connection before a request is checked"
            )
        if updated & {"mode", "listen_host", "sandbox_remote_clients"}:
            check_listen(
                ctx.options.mode, ctx.options.listen_host, ctx.options.sandbox_remote_clients
            )

    # Connections

    def client_connected(self, client: connection.Client) -> None:
        try:
            if not ctx.options.sandbox_remote_clients and not is_loopback(client.peername[0]):
                client.error = "claude-proxy accepts loopback clients only"
        except Exception:
            logger.exception("refusing a client: the check failed")
            client.error = "internal error"

    def client_disconnected(self, client: connection.Client) -> None:
        self.tunnels.pop(client.id, None)
        self.spliced.discard(client.id)
        self.untunnelled.client_gone(client.id)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        host, port = flow.request.host, flow.request.port
        try:
            host = requested_host(flow.request)
            decision = self.open_tunnel(flow.client_conn, host, port)
            if decision.allowed:
                if flow.request.host != host:
                    flow.request.host = host  # the A-label the client sent, not the U-label
                self.recorder.decision(flow, decision, host=host, port=port, status=200)
                return
        except Exception:
            logger.exception("refusing a CONNECT: the check failed")
            self.tunnels.pop(flow.client_conn.id, None)
            decision = Decision(False, "internal error in the policy check")
        self.refuse(flow, host, port, decision)

    def open_tunnel(self, client: connection.Client, host: str, port: int) -> Decision:
        """Decide a tunnel's destination (CONNECT or SOCKS5) and remember it for what follows."""
        try:
            if client.id in self.tunnels:
                return Decision(False, "CONNECT inside a tunnel")
            decision = self.decide(host, port)
            if decision.allowed:
                self.tunnels[client.id] = (rules.normalize_host(host), port)
            return decision
        except Exception:
            logger.exception("refusing a tunnel: the check failed")
            return Decision(False, "internal error in the policy check")

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        try:
            nextlayer.layer = self._next_layer(nextlayer)
        except Exception:
            logger.exception("closing a tunnel: the layer decision failed")
            nextlayer.layer = CloseTunnel(nextlayer.context)

    def _next_layer(self, nextlayer: layer.NextLayer) -> layer.Layer | None:
        context = nextlayer.context
        target = self.tunnels.get(context.client.id)
        if target is None:
            if len(context.layers) == 1 and type(context.layers[0]) is layers.modes.HttpProxy:
                return self.limits.http_layer(context, HTTPMode.regular, self.recheck_waiting)
            return CloseTunnel(context)
        if context.client.tls:
            # Inside our TLS only HTTP goes, so that every request is checked.
            return self.limits.http_layer(context, HTTPMode.transparent, self.recheck_waiting)
        data = nextlayer.data_client()
        if len(data) < 3:
            return None  # wait for more bytes
        if not starts_like_tls_record(data):
            return self.close_tunnel(context, target, "it does not start with TLS")
        try:
            hello = parse_client_hello(data)
        except ValueError:
            return self.close_tunnel(context, target, "malformed TLS ClientHello")
        if hello is None:
            return None  # the ClientHello is not complete yet
        decision = self.decide(*target)  # again: the policy may have changed since the CONNECT
        if not decision.allowed:
            return self.close_tunnel(context, target, decision.reason)
        if not decision.inspect:
            return self.splice(context, target, hello, decision)
        if hello.sni is not None and not names_target(hello.sni, target, port_allowed=False):
            return self.close_tunnel(context, target, f"SNI {hello.sni} does not name {target[0]}")
        server_tls = layers.ServerTLSLayer(context)
        server_tls.child_layer = GuardedClientTLSLayer(context, self.recorder)
        return server_tls

    def splice(
        self, context: Context, target: Destination, hello: tls.ClientHello, decision: Decision
    ) -> layer.Layer:
        """A pass-through tunnel: the client's TLS goes to the upstream as it is."""
        started = time.time()
        client = context.client
        if reason := passthrough.hello_refusal(hello, target[0]):
            refused = Decision(False, reason)
            self.recorder.line(PASS, *target, "-", "-", refused, started=started, client=client)
            return CloseTunnel(context)
        self.recorder.line(PASS, *target, "-", "-", decision, started=started, client=client)
        self.spliced.add(context.client.id)
        self.limits.tunnel_spliced(context)
        # Bytes relayed, never kept. A policy that no longer passes it through closes it at
        # once (close_refused): the relay itself asks nothing.
        return layers.TCPLayer(context, ignore=True)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Backstop: no upstream connection the policy (and the tunnel) would not allow."""
        try:
            address = data.server.address
            target = self.tunnels.get(data.client.id)
            if address is None:
                data.server.error = "claude-proxy: no destination"
            elif target is not None and (rules.normalize_host(address[0]), address[1]) != target:
                data.server.error = "claude-proxy: not the CONNECT destination"
            elif not (decision := self.decide(*address, self.upstream_scheme(data))).allowed:
                data.server.error = f"claude-proxy: {decision.reason}"
        except Exception:
            logger.exception("refusing an upstream connection: the check failed")
            data.server.error = "claude-proxy: internal error"
        if data.server.error:
            logger.warning("BLOCK upstream connection: %s", printable(data.server.error))

    # Requests

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        status = 403
        try:
            target = self.tunnels.get(flow.client_conn.id)
            host, port = target or (requested_host(flow.request), flow.request.port)
            # Inside a tunnel there is TLS; outside, the request's own scheme says how it travels.
            scheme = rules.HTTPS if target else flow.request.scheme
            if problem := wellformed.malformed(flow.request, body_follows(flow)):
                status, decision = 400, Decision(False, f"malformed request: {problem}")
            else:
                target_path = flow.request.data.path.decode("ascii", "replace")
                decision = self.decide_request(host, port, scheme, flow.request.method, target_path)
            if decision.allowed and (
                mismatch := misnamed(flow, (rules.normalize_host(host), port))
            ):
                decision = Decision(False, mismatch)
            if (
                decision.allowed
                and (override := wellformed.overrides(flow.request))
                and self.policy.decides_requests(host, port, scheme)
            ):
                reason = f"{override} would change the method or path a rule decided on"
                decision = Decision(False, reason, decision.rule, origin=decision.origin)
            if decision.allowed:
                wellformed.strip_hop_headers(flow.request)
        except Exception:
            logger.exception("refusing a request: the check failed")
            host, port = flow.request.host, flow.request.port
            decision = Decision(False, "internal error in the policy check")
        if not decision.allowed:
            self.refuse_request(flow, host, port, decision, status)
            return
        flow.metadata[DECISION] = (decision, host, port)
        flow.metadata[GENERATION] = (self.generation, scheme)
        flow.request.stream = count_body(flow, SENT_UP)
        self.in_flight += 1
        if target is None:
            self.untunnelled.add(flow, host, port)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None or DECISION not in flow.metadata:
            return
        try:
            raw = wellformed.switches_to_raw(flow)
        except Exception:
            logger.exception("closing a response: the upgrade check failed")
            raw = True
        if raw:
            # Only a WebSocket may follow a 101: anything else would be an unchecked relay.
            _, host, port = flow.metadata[DECISION]
            flow.metadata[DECISION] = (
                Decision(False, "the upstream switched to a protocol other than WebSocket"),
                host,
                port,
            )
            flow.kill()
            return
        flow.response.stream = count_body(flow, SENT_DOWN)  # SSE and large bodies pass as they come

    def response(self, flow: http.HTTPFlow) -> None:
        # The proxy's own answer to a refusal on the way upstream carries why
        # (upstream_failures.py).
        refused = flow.metadata.pop(REFUSED, None)
        status = flow.response.status_code if flow.response else None
        self._finish(flow, status, Decision(False, refused) if refused else None)
        self.untunnelled.response(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        self.untunnelled.request(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.untunnelled.ended(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        """The exchange ended without a whole response: the client left, the upstream broke off,
        or a refusal on the way upstream (a forbidden address, the backstop) that the client
        could not be told. The row says which, with the status the client got, if any."""
        message = flow.error.msg if flow.error else ""
        refused = flow.metadata.pop(REFUSED, None) or upstream_failures.refusal(message)
        if refused is None:
            flow.metadata.setdefault(FAILURE, printable(message or "the exchange failed"))
        # Every allowed response streams: once it has come, its head has gone to the client.
        status = flow.response.status_code if flow.response else None
        self._finish(flow, status, Decision(False, refused) if refused else None)
        self.untunnelled.ended(flow)

    def _finish(
        self, flow: http.HTTPFlow, status: int | None, refused: Decision | None = None
    ) -> None:
        allowed = flow.metadata.pop(DECISION, None)
        if allowed is not None:
            self.in_flight -= 1
            decision, host, port = allowed
            if not decision.allowed:  # refused since (a switch to raw bytes): nothing was sent
                status = None
                flow.metadata.pop(FAILURE, None)
            self.recorder.decision(flow, refused or decision, host=host, port=port, status=status)

    # Helpers

    def recheck(self, flow: http.HTTPFlow, host: str, port: int) -> Decision | None:
        """A request decided under an earlier policy (it waited: for a probe), decided again; None
        when the policy has not changed since."""
        generation, scheme = flow.metadata.get(GENERATION, (self.generation, rules.HTTPS))
        if generation == self.generation:
            return None
        target = flow.request.data.path.decode("ascii", "replace")
        return self.decide_request(host, port, scheme, flow.request.method, target)

    def recheck_waiting(
        self, flow: http.HTTPFlow, waited: str = "while it waited for its connection"
    ) -> bool:
        """A request that waited (for its upstream connection, or for its body), decided again
        under the policy in force now: True when that refuses it (its refusal is then its
        response, and logged)."""
        allowed = flow.metadata.get(DECISION)
        if allowed is None:
            return False
        _, host, port = allowed
        again = self.recheck(flow, host, port)
        if again is None or again.allowed:
            return False
        del flow.metadata[DECISION]
        self.in_flight -= 1
        reason = f"the policy changed {waited}: {again.reason}"
        self.refuse(flow, host, port, Decision(False, reason, again.rule, origin=again.origin))
        return True

    def decide(self, host: str, port: int, scheme: str = rules.HTTPS) -> Decision:
        try:
            return self.policy.decide(host, port, scheme)
        except Exception:
            logger.exception("refusing %s:%d: the policy failed", printable(host), port)
            return Decision(False, "internal error in the policy")

    def decide_request(
        self, host: str, port: int, scheme: str, method: str, target: str
    ) -> Decision:
        try:
            return self.policy.decide_request(host, port, scheme, method, target)
        except Exception:
            logger.exception("refusing %s:%d: the policy failed", printable(host), port)
            return Decision(False, "internal error in the policy")

    def upstream_scheme(self, data: server_hooks.ServerConnectionHookData) -> str:
        """How traffic travels on this upstream connection; a pass-through carries TLS as bytes."""
        return rules.HTTPS if data.client.id in self.spliced else scheme_of(data.server)

    def refuse(
        self, flow: http.HTTPFlow, host: str, port: int, decision: Decision, status: int = 403
    ) -> None:
        flow.response = answers.refusal(
            flow.request.method, host, port, decision, status, source=self.policy.source
        )
        self.recorder.decision(flow, decision, host=host, port=port, status=status)

    def refuse_request(
        self,
        flow: http.HTTPFlow,
        host: str,
        port: int,
        decision: Decision,
        status: int = 403,
        *,
        advice: str | None = None,
    ) -> None:
        """Refuse a request, here or in a later check (the pin, the server-fetch check) of one
        this Enforcer let through, which then no longer counts as in flight. A body still to
        come and too large to read just to refuse it is not read: the client is closed instead
        (mitmproxy would read it whole before it answers). One decision line either way."""
        if flow.metadata.pop(DECISION, None) is not None:
            self.in_flight -= 1  # the Enforcer will not finish it
        if flow.request.raw_content is None and refused_body_too_large(
            flow.request, body_follows(flow)
        ):
            flow.kill()
            closed = Decision(False, f"{decision.reason}; closed without reading the request body")
            self.recorder.decision(flow, closed, host=host, port=port, status=None)
            return
        flow.request.stream = False  # mitmproxy refuses a response set while the request streams
        flow.response = answers.refusal(
            flow.request.method, host, port, decision, status, source=self.policy.source,
            advice=advice,
        )  # fmt: skip
        self.recorder.decision(flow, decision, host=host, port=port, status=status)

    def close_tunnel(self, context: Context, target: Destination, why: str) -> CloseTunnel:
        refused = Decision(False, why)
        client = context.client
        started = client.timestamp_start
        self.recorder.line("-", *target, "-", None, refused, started=started, client=client)
        return CloseTunnel(context)


def requested_host(request: http.Request) -> str:
    """The host exactly as the client wrote it: mitmproxy turns A-labels into Unicode in `.host`."""
    if not request.data.authority:
        return request.host
    try:
        host, _ = rules.split_host_port(request.data.authority.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return request.host  # refused by the policy as it is: not ASCII, or not host[:port]
    return host


class OpenFlows(dict[str, tuple[http.HTTPFlow, str, int]]):
    """Flows a client may still send on, flow id → (flow, host, port): from their request until
    both its body and its response have ended, a WebSocket until its end, any until its client
    goes. What a new policy (Enforcer.untunnelled) or pin (OrgGuard.carrying) decides again; the
    addon that keeps one passes it these hooks."""

    def add(self, flow: http.HTTPFlow, host: str, port: int) -> None:
        self[flow.id] = (flow, host, port)

    def response(self, flow: http.HTTPFlow) -> None:
        if not still_sending(flow):
            self.pop(flow.id, None)

    def request(self, flow: http.HTTPFlow) -> None:
        """Its body has ended: if its response had already, nothing more is sent."""
        if flow.response is not None and not still_sending(flow):
            self.pop(flow.id, None)

    def ended(self, flow: http.HTTPFlow) -> None:
        """A WebSocket's end, or an error."""
        self.pop(flow.id, None)

    def client_gone(self, client_id: str) -> None:
        if self:
            for flow_id, (flow, _, _) in list(self.items()):
                if flow.client_conn.id == client_id:
                    del self[flow_id]


def still_sending(flow: http.HTTPFlow) -> bool:
    """Whether a client may still send on this flow after its response: a WebSocket until its
    end, and a request whose body still streams (an upstream may answer before it has all)."""
    return flow.websocket is not None or flow.request.timestamp_end is None


def scheme_of(server: connection.Server) -> str:
    return rules.HTTPS if server.tls else rules.HTTP


def misnamed(flow: http.HTTPFlow, target: Destination) -> str | None:
    """Why the request names another destination than `target`, or None when it does not.

    Host header, HTTP/2 :authority and an absolute-form URL's host must each name the target.
    """
    hosts = flow.request.headers.get_all("host")
    if len(hosts) > 1:
        return "more than one Host header"
    authority = flow.request.data.authority.decode("ascii", "backslashreplace")
    named = {"Host header": hosts[0] if hosts else "", "authority": authority}
    for what, value in named.items():
        if value and not names_target(value, target):
            return f"{what} {printable(value)} does not name {target[0]}"
    return None


def names_target(authority: str, target: Destination, *, port_allowed: bool = True) -> bool:
    """Whether `host[:port]` names `target`; a name that cannot be parsed names nothing."""
    try:
        host, port = rules.split_host_port(authority)
        if port is not None and (not port_allowed or port != target[1]):
            return False
        return rules.normalize_host(host) == target[0]
    except ValueError:
        return False


def body_follows(flow: http.HTTPFlow) -> bool | None:
    """Whether the HTTP layer saw a body follow the head; None where it did not say."""
    value = flow.metadata.get(wellformed.BODY_FOLLOWS)
    return None if value is None else bool(value)


def refused_body_too_large(request: http.Request, follows: bool | None = None) -> bool:
    """Whether a refused request announces a body too large to read just to refuse it.

    mitmproxy reads an HTTP/2 body without content-length as size 0: its size is unknown.
    """
    h2_or_h3 = request.is_http2 or request.is_http3
    if follows and h2_or_h3 and "content-length" not in request.headers:
        return True
    try:
        size = expected_http_body_size(request)
    except ValueError:
        return True
    return size is None or size < 0 or size > MAX_REFUSED_BODY


def check_listen(modes: Sequence[str], listen_host: str, remote_ok: bool) -> None:
    for spec in modes:
        try:
            mode = mode_specs.ProxyMode.parse(spec)
        except ValueError as e:
            raise exceptions.OptionsError(f"Cannot parse mode {spec!r}: {e}") from e
        if not isinstance(mode, mode_specs.RegularMode | mode_specs.Socks5Mode):
            raise exceptions.OptionsError(
                f"mode {spec!r} is not supported: claude-proxy runs as a regular HTTP(S) proxy "
                "and a SOCKS5 proxy"
            )
        host = mode.listen_host(listen_host)
        if not remote_ok and not is_loopback(host):
            raise exceptions.OptionsError(
                f"listening on {host or 'all addresses'!r} would let other machines use the proxy; "
                "use 127.0.0.1, or pass --expose-to-network if that is really meant"
            )
