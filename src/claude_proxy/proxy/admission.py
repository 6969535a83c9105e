"""What one client can make the proxy hold: bounded heads, deadlines, and a cap on clients.

mitmproxy buffers an unterminated request head without limit and keeps a connection for as long as
bytes trickle in. Here the HTTP layers that the Enforcer builds (`http_layer`) use servers that
bound the head (size, header count, time), and the Limits addon bounds what happens before them:
how many clients at once (below the open-files limit), how long a client may take to reach its
first request, how large a TLS ClientHello may grow. It also raises the listen backlog and keeps a
failing accept (out of descriptors) to one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import HTTPMode

from claude_proxy.mitm.bounded_http import BoundedHttpLayer, Bounds
from claude_proxy.mitm.connections import REGULAR, SOCKS5, Connections
from claude_proxy.mitm.timed_http import ERROR_LOG_SECONDS as TIMER_FAILURE_SECONDS
from claude_proxy.proxy import answers, memory
from claude_proxy.proxy.accept_gate import AcceptGate, descriptors_in_use, open_files_limit
from claude_proxy.proxy.held_bodies import Held
from claude_proxy.proxy.upstream_timeouts import Recheck
from claude_proxy.record.decisions import Recorder, Unadmitted
from claude_proxy.record.throttle import Throttle

logger = logging.getLogger(__name__)

HEAD_TIMEOUT = 30  # seconds for a request head, from its first byte; and for a client to get there
IDLE_TIMEOUT = 120  # seconds a kept-alive connection may wait for its next request
FDS_PER_CLIENT = 6  # its own descriptor and up to 5 upstream ones (mitmproxy's per-address limit)
SPARE_FDS = 32  # for log rotation, DNS lookups, certificates, the audit log
# Descriptors kept for refused clients: each holds one until its refusal is sent, and the
# clients admitted cannot take them. Never more than a quarter of what there is.
REFUSAL_RESERVE = 32
BACKLOG = 4096  # the kernel caps it at somaxconn (Linux 4096, macOS 128)
SOCKS_NO_METHOD = b"\x05\xff"  # SOCKS5: no acceptable method, the only refusal before a greeting
OVERLOAD_LINGER = 2  # seconds a refused client that does not send its request is kept at most
OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Overloaded(layer.Layer):
    """Answers 503 at once and closes: the proxy has as many clients as its descriptors allow.

    The descriptor goes back as soon as the request head has been read (closing with unread
    bytes would reset the connection and could destroy the answer before the client reads it),
    at once when the refusals' reserve is used up, and after OVERLOAD_LINGER seconds at most.
    """

    def __init__(self, context: Context, reason: str, at_once: bool = False) -> None:
        super().__init__(context)
        self.reason = reason
        self.at_once = at_once
        self.received = b""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        client = self.context.client
        if isinstance(event, events.Start):
            yield commands.SendData(client, answers.limit_bytes(503, self.reason))
            if self.at_once:
                yield commands.CloseConnection(client)
                return
            yield commands.CloseTcpConnection(client, half_close=True)
            yield commands.RequestWakeup(OVERLOAD_LINGER)
        elif isinstance(event, events.DataReceived):
            self.received = (self.received + event.data)[-4:]
            if b"\r\n\r\n" in self.received:  # all it sent is read: a close is a clean FIN
                yield commands.CloseConnection(client)
        elif isinstance(event, (events.ConnectionClosed, events.Wakeup)):
            yield commands.CloseConnection(client)


class CloseTunnel(layer.Layer):
    """Closes the client connection at once: nothing inside the tunnel goes anywhere."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield commands.CloseConnection(self.context.client)


class Limits:
    """What one client can make the proxy hold, and how many clients at once.

    `held` is the proxy's budget for what waiting requests hold; `connections` (mitmproxy's,
    from `service.build_master`) reaches the sockets, to stop reading a client or the upstreams
    serving it, and to close a client that missed its deadline. Without it (unit tests) nothing
    is paused or closed.
    """

    def __init__(
        self, held: Held, recorder: Recorder, connections: Connections | None = None
    ) -> None:
        self.held = held
        self.recorder = recorder
        self.connections = connections
        self.bounds = Bounds()
        self.cap = 1 << 20  # until `running` has measured the descriptors
        self.fd_limit = 0  # the open-files limit the cap was computed for
        self.fds_at_start = 0  # descriptors open before the first client
        self.reserve = 0  # descriptors kept for refused clients
        self.clients = 0  # every client connected, admitted or refused
        self.over_cap: set[str] = set()  # client ids to answer 503
        self.setup: dict[str, asyncio.TimerHandle] = {}  # client id → its deadline to get to HTTP
        self.cap_log = Throttle()
        self.errors = Throttle()
        self.timer_failures = Throttle(TIMER_FAILURE_SECONDS)  # the HTTP layers' timers
        self.accept_failures = 0
        self.gate = AcceptGate(lambda: open_files_limit() - SPARE_FDS)
        self.waves = memory.Waves()
        self.release_at: asyncio.TimerHandle | None = None  # a memory release is due
        self.socks_listeners: set[int] = set()  # descriptors of the SOCKS5 listening sockets

    def load(self, loader: Any) -> None:
        loader.add_option(
            "sandbox_head_timeout",
            int,
            HEAD_TIMEOUT,
            "Seconds a client has to send a complete request head, from its first byte; also "
            "how long a new connection (and a new tunnel, TLS handshake included) may take to "
            "start its first request. Answered 408, or closed.",
        )
        loader.add_option(
            "sandbox_idle_timeout",
            int,
            IDLE_TIMEOUT,
            "Seconds a kept-alive connection may wait for its next request before it is closed.",
        )

    def configure(self, updated: set[str]) -> None:
        if updated & {"sandbox_head_timeout", "sandbox_idle_timeout"}:
            head, idle = ctx.options.sandbox_head_timeout, ctx.options.sandbox_idle_timeout
            if head <= 0 or idle <= 0:
                raise exceptions.OptionsError(
                    "sandbox_head_timeout and sandbox_idle_timeout must be positive seconds"
                )
            self.bounds = Bounds(head_timeout=head, idle_timeout=idle)

    def running(self) -> None:
        preload()
        self.fds_at_start = descriptors_in_use()
        self.follow_limit()
        logger.debug(  # not INFO: startup errors are meant to be the only line on the console
            "accepting at most %d clients at once (open-files limit %d)", self.cap, self.fd_limit
        )
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(QuietLoopErrors(loop.get_exception_handler(), self))
        if self.connections is not None:
            self._listeners_changed()
            self.connections.on_listeners_changed(self._servers_changed)
        self.held.flow_control = self.set_reading
        self.held.upstream_control = self.set_upstream_reading

    def done(self) -> None:
        self.held.flow_control = None
        self.held.upstream_control = None
        if self.release_at is not None:
            self.release_at.cancel()

    async def _servers_changed(self) -> None:
        self._listeners_changed()

    def _listeners_changed(self) -> None:
        if self.connections is None:
            return
        listening = list(self.connections.listening())
        servers = [server for _, server in listening]
        raise_backlog(servers)
        self.socks_listeners = {
            sock.fileno() for mode, server in listening if mode == SOCKS5 for sock in server.sockets
        }
        self.gate.refuse = self.refuse_at_accept
        self.gate.install(asyncio.get_running_loop(), servers)

    # Clients past the cap, answered where they are accepted

    def refuse_at_accept(self, conn: socket.socket, listener: socket.socket) -> bool:
        """Past the cap, answer a new connection on its raw socket, before mitmproxy makes a
        connection of it: 503 (HTTP) or "no acceptable method" (SOCKS5). Through mitmproxy a
        refusal costs about half a millisecond, and a burst of hundreds waits for it in turn.
        False lets the connection through (mitmproxy's path refuses it, if it must)."""
        try:
            self.follow_limit()
            if self.clients - len(self.over_cap) + self.gate.unclaimed < self.cap:
                return False
            socks = listener.fileno() in self.socks_listeners
            reason = self.over_cap_reason()
            if (skipped := self.cap_log.allow()) is not None:
                more = f"; {skipped} more refused since the last line" if skipped else ""
                self.log_block(503, f"{reason}{more}", client=unadmitted(conn, socks))
            conn.setblocking(False)
            try:
                conn.send(SOCKS_NO_METHOD if socks else answers.limit_bytes(503, reason))
            except OSError:
                conn.close()
                return True
            if self.gate.refusing >= self.reserve:  # the reserve is used up: its descriptor now
                conn.close()
                return True
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
            # Closing with unread bytes would reset the connection, and the reset can destroy
            # the answer before the client reads it: its request is read first (2 s at most).
            self.gate.refusing += 1
            loop = asyncio.get_running_loop()
            timer = loop.call_later(OVERLOAD_LINGER, self._close_refused, loop, conn, None)
            loop.add_reader(conn.fileno(), self._read_refused, loop, conn, timer, socks)
            return True
        except Exception as e:  # mitmproxy's path still refuses it
            if self.errors.allow() is not None:
                logger.error("answering a client past the cap failed: %r", e)
            return False

    def _read_refused(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: socket.socket,
        timer: asyncio.TimerHandle,
        socks: bool,
    ) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data or socks or b"\r\n\r\n" in data:  # all it meant to send has come
            self._close_refused(loop, conn, timer)

    def _close_refused(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: socket.socket,
        timer: asyncio.TimerHandle | None,
    ) -> None:
        if conn.fileno() == -1:
            return  # closed already
        if timer is not None:
            timer.cancel()
        loop.remove_reader(conn.fileno())
        conn.close()
        self.gate.refusing -= 1
        self.gate.reopen()

    # Clients

    def client_connected(self, client: connection.Client) -> None:
        self.clients += 1
        self.gate.client_connected()
        self.waves.count(self.clients)
        try:
            self._admit(client)
        except Exception as e:  # fail closed: a client we cannot account for is refused
            self.over_cap.add(client.id)
            if self.errors.allow() is not None:
                logger.error("refusing a client: the limits check failed: %r", e)

    def _admit(self, client: connection.Client) -> None:
        if self.accept_failures:
            logger.warning(
                "accepting connections again after %d failed accepts", self.accept_failures
            )
            self.accept_failures = 0
        self.follow_limit()
        if self.clients - len(self.over_cap) > self.cap:  # refused clients take no admitted place
            self.over_cap.add(client.id)
            if (skipped := self.cap_log.allow()) is not None:
                more = f"; {skipped} more refused since the last line" if skipped else ""
                self.log_block(503, f"{self.over_cap_reason()}{more}", client=client)
            # A refused client that sends nothing costs its descriptor no longer than this.
            self._arm_setup(client, "no request within {} s of its refusal", OVERLOAD_LINGER)
            return
        self._arm_setup(client, "no request within {} s of connecting")

    def follow_limit(self) -> None:
        """The cap follows the open-files limit in force (it can change while the proxy runs)."""
        limit = open_files_limit()
        if limit != self.fd_limit:
            self.fd_limit = limit
            self.cap, self.reserve = client_cap(limit, self.fds_at_start)

    def refusals_pressed(self) -> bool:
        """Whether refused clients hold the whole reserve: the next one is closed at once."""
        return len(self.over_cap) > self.reserve

    def client_disconnected(self, client: connection.Client) -> None:
        self.clients -= 1
        self.gate.client_disconnected()
        if self.waves.count(self.clients) and self.release_at is None:
            # Memory follows the clients open, not the most there ever were.
            loop = asyncio.get_running_loop()
            self.release_at = loop.call_later(memory.DELAY, self._release, loop)
        self.over_cap.discard(client.id)
        self.held.disconnected(client.id)  # its streams, if paused still, will never go on
        self._cancel_setup(client.id)
        # The socket mitmproxy can leave open when it closes a client still sending is closed by
        # closing.install, the one fix for it.

    def _release(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.run_in_executor(None, memory.release).add_done_callback(self._released)

    def _released(self, done: asyncio.Future[None]) -> None:
        self.release_at = None
        if (e := done.exception()) is not None and self.errors.allow() is not None:
            logger.error("could not give memory back: %r", e)

    def server_connected(self, data: Any) -> None:
        self.gate.upstream_connected()

    def server_disconnected(self, data: Any) -> None:
        self.gate.upstream_disconnected()

    def set_upstream_reading(self, client_id: str, paused: bool) -> None:
        """Stop reading the upstream connections that serve a client, or read them again
        (response flow control: the client does not take what is sent to it)."""
        try:
            if self.connections is not None:
                self.connections.set_upstream_reading(client_id, paused)
        except Exception as e:  # the client's own window still bounds what it is sent
            if self.errors.allow() is not None:
                logger.error("could not pause or resume reading an upstream: %r", e)

    def set_reading(self, client_id: str, paused: bool) -> None:
        """Stop reading a client's socket, or read it again (held-body flow control)."""
        try:
            if self.connections is not None:
                self.connections.set_client_reading(client_id, paused)
        except Exception as e:  # the held-body limits still apply
            if self.errors.allow() is not None:
                logger.error("could not pause or resume reading a client: %r", e)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:  # the tunnel opens: its TLS and first request are due
            self._arm_setup(flow.client_conn, "no TLS handshake and request within {} s of CONNECT")

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """Runs after the Enforcer: a ClientHello it still waits for may not grow without end."""
        if nextlayer.layer is not None:
            return
        try:
            size = sum(len(e.data) for e in nextlayer.events if isinstance(e, events.DataReceived))
            if size > self.bounds.max_head:
                self.log_block(
                    None,
                    f"TLS ClientHello larger than {self.bounds.max_head // 1024} KiB",
                    client=nextlayer.context.client,
                )
                nextlayer.layer = CloseTunnel(nextlayer.context)
        except Exception:
            logger.exception("closing a tunnel: the ClientHello size check failed")
            nextlayer.layer = CloseTunnel(nextlayer.context)

    def http_layer(
        self, context: Context, mode: HTTPMode, recheck: Recheck | None = None
    ) -> layer.Layer:
        if mode is HTTPMode.regular and context.client.id in self.over_cap:
            # Its deadline stays: a refused client that never reads is still closed in time.
            return Overloaded(context, self.over_cap_reason(), at_once=self.refusals_pressed())
        built = BoundedHttpLayer(
            context, mode, self.bounds, self.held, self.recorder, recheck, self.timer_failures
        )
        self._cancel_setup(context.client.id)  # only once its own deadlines have taken over
        return built

    def over_cap_reason(self) -> str:
        return f"too many clients at once (at most {self.cap} for {self.fd_limit} open files)"

    # The deadline for a client to get to an HTTP layer (no layer exists yet to keep the time)

    def _arm_setup(self, client: connection.Client, why: str, seconds: float = 0) -> None:
        self._cancel_setup(client.id)
        seconds = seconds or self.bounds.head_timeout
        loop = asyncio.get_running_loop()
        self.setup[client.id] = loop.call_later(
            seconds, self._setup_expired, client.id, why.format(seconds)
        )

    def _cancel_setup(self, client_id: str) -> None:
        if timer := self.setup.pop(client_id, None):
            timer.cancel()

    def _setup_expired(self, client_id: str, why: str) -> None:
        self.setup.pop(client_id, None)
        if self.connections is None or (client := self.connections.client(client_id)) is None:
            return
        self.log_block(None, why, client=client)
        self.connections.close(client_id, why)

    def tunnel_spliced(self, context: Context) -> None:
        """A pass-through tunnel has no request to wait for: its deadline to get there ends."""
        self._cancel_setup(context.client.id)

    def log_block(
        self,
        status: int | None,
        reason: str,
        client: connection.Client | Unadmitted | None = None,
    ) -> None:
        self.recorder.block(status, reason, client=client)


def unadmitted(conn: socket.socket, socks: bool) -> Unadmitted | None:
    """A connection refused on its raw socket, for its decision row; None once its client has
    reset it (the kernel then keeps no peer address, and the refusal goes on without one)."""
    try:
        peer = conn.getpeername()
    except OSError:
        return None
    return Unadmitted((peer[0], peer[1]), SOCKS5 if socks else REGULAR)


def client_cap(limit: int, in_use: int) -> tuple[int, int]:
    """How many clients are admitted at once below `limit`, and the descriptors kept for the
    clients refused meanwhile (each holds one until its refusal is sent)."""
    budget = max(0, limit - in_use - SPARE_FDS)
    reserve = min(REFUSAL_RESERVE, budget // 4)
    return max(1, (budget - reserve) // FDS_PER_CLIENT), reserve


def preload() -> None:
    """Import now what serving clients would import on first use.

    An import opens files: one that first happens while the descriptors are all taken fails,
    and the layer that needed it crashes with its client left hanging.
    """
    import concurrent.futures.thread  # noqa: F401  (the loop's executor: memory release, DNS)
    import encodings.idna  # noqa: F401  (mitmproxy parses every CONNECT authority with it)


def raise_backlog(servers: list[asyncio.Server]) -> None:
    """asyncio listens with a backlog of 100: a burst of connects would wait in SYN retries."""
    for server in servers:
        for sock in server.sockets:
            # listen() again on the same socket changes its backlog (Linux and macOS).
            with socket.fromfd(sock.fileno(), sock.family, sock.type) as same:
                same.listen(BACKLOG)


Handler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


class QuietLoopErrors:
    """The event loop's error handler: no traceback per attempt for errors that repeat.

    An accept that fails for want of descriptors (asyncio retries it every second) is one line,
    then one summary line per LOG_EVERY seconds; any other error goes to the previous handler
    (mitmproxy's, with its traceback) at most once per LOG_EVERY seconds per kind.
    """

    def __init__(self, previous: Handler | None, limits: Limits) -> None:
        self.previous = previous
        self.limits = limits
        self.accept_log = Throttle()
        self.others: dict[tuple[str, str], Throttle] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in OUT_OF_RESOURCES:
            self.limits.accept_failures += 1
            if (skipped := self.accept_log.allow()) is None:
                return
            if self.limits.accept_failures == 1:
                logger.error(
                    "cannot accept connections: %s (open-files limit %d); retrying every second",
                    exc.strerror,
                    open_files_limit(),  # the one in force now: it may have changed since start
                )
            else:
                logger.error("accepts still failing: %d more since the last line", skipped + 1)
            return
        key = (str(context.get("message")), type(exc).__name__)
        if len(self.others) > 100:
            self.others.clear()
        if self.others.setdefault(key, Throttle()).allow() is None:
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)
