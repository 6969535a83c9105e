"""mitmproxy's HTTP layer and streams, with bounded waits on the upstream.

mitmproxy bounds none of them (only `tcp_timeout` of silence, then a close without a status). Here
each step has its own limit, and a step that runs out ends in a 504 that names it. A response
whose head has arrived is never cut: an SSE stream may pause for minutes.

The limits live in the HTTP layer (mitmproxy's own wakeups, no task of our own): a stream asks
for a check while it waits for a connection or for a response head. A connection that runs out is
closed, and the stream answers once mitmproxy reports the failure; a response head that runs out is
abandoned upstream (HTTP/1 closes, HTTP/2 resets only that stream) and answered at once.

A mitmproxy wakeup cannot be cancelled: it sleeps out its delay, and holds what it names. So the
layer keeps one alarm (a deadline.Deadline) for all its streams, which asks for a new wakeup
only when a check is due before every one pending; a wakeup names no stream. A keep-alive
connection with thousands of requests has a wakeup or two pending, never one per request (each
would hold its request for minutes).

What mitmproxy 12.3 lacks, and the part here that makes up for it. Each part has a test that fails
when that part alone is removed; tests/test_sansio_timed.py runs the waits on mitmproxy's own
HttpLayer too, beside ours. tests/test_mitm_internals.py checks that every private name and
overridden signature used here exists in the installed mitmproxy and h2.

- `TimedHttpLayer.make_stream` (our streams in place of mitmproxy's) and its alarm in
  `_handle_event`: mitmproxy bounds no wait on an upstream. Without them no wait ends:
  test_sansio_timed.py `test_a_connect_that_never_completes_gets_504_naming_the_step`,
  `test_a_response_head_that_never_comes_gets_504`,
  `test_a_request_waiting_for_a_free_connection_slot_gets_504_within_the_connect_limit`.
  Upstream: mitmproxy/mitmproxy#1095 (a connect timeout); for the response head, not reported:
  "no limit on the wait for a response head but tcp_timeout, which closes without a status".
- `TimedHttpStream.handle_protocol_error`, over `HttpStream.handle_protocol_error`: the 504 naming
  the step, and the proxy's own 502 for an upstream failure (mitmproxy answers an HTML 502, or an
  HTTP/2 reset). Without it: the 504 tests above (a 502 instead), and test_upstream_failures.py
  `test_an_unreachable_upstream_gets_the_proxy_answer`.
- `_rearm` checking at the shorter of the connect and TLS limits:
  `test_a_tls_limit_shorter_than_the_connect_limit_counts`. `_check_in` waking within half of
  mitmproxy's `tcp_timeout`, which counts a wakeup as activity: without it mitmproxy closes a
  connection waiting on its upstream without a status (test_timeouts.py
  `test_response_limit_beyond_the_idle_timeout`).
- `_give_up_waiting`, which edits `HttpLayer.waiting_for_establishment` and `command_sources`:
  mitmproxy's connection handler opens at most five connections to one destination at once
  (mitmproxy/mitmproxy#8322) and cannot cancel a wait for one; a request waiting for a slot would
  wait without end. Without it:
  `test_a_request_waiting_for_a_free_connection_slot_gets_504_within_the_connect_limit`.
- `TimedHttpLayer.register_connection`, over `HttpLayer.register_connection`: mitmproxy keeps a
  failed upstream connection and fails every later request to that destination on the same client
  connection at once with its first error, though a timeout may pass and a name resolve again.
  Without it: `test_a_retry_after_a_failed_connection_gets_a_new_connection`, and
  test_upstream_failures.py `test_a_retry_on_the_same_connection_tries_the_upstream_again`. Not
  reported upstream: "a failed upstream connection fails every later request on its client
  connection". It also closes a connection that opens after every stream that waited for it gave
  up, which would hold one of the five slots: test_limits.py
  `test_a_stream_waiting_for_a_free_upstream_connection_gets_504_in_time`. Not reported upstream:
  "HTTP/2 to HTTP/1: a connection no stream waits for any more is opened and kept".
- `TimedHttpLayer.client_gave_up`, which reads the h2 stream's state: mitmproxy does not pass an
  HTTP/2 client's reset on to a stream waiting for its connection, and sends the request once the
  connection comes. Without it: test_limits.py
  `test_a_stream_cancelled_while_it_waits_for_a_connection_is_never_sent`. Not reported upstream:
  "an HTTP/2 stream reset while it waits for its upstream connection is still sent upstream".
- The recheck when a stream's connection comes (`recheck`): a request that waited is decided again
  under the policy in force; mitmproxy has no such point. Without it:
  `test_a_request_that_waited_for_its_connection_is_decided_again`. (Our own need: nothing to
  report upstream.)
- `TimedHttpStream.check_invalid`, over `HttpStream.check_invalid`: tells the Enforcer whether an
  HTTP/2 body follows its head (test_smuggling.py `test_h2_get_with_data_and_no_length_is_refused`),
  and answers a malformed response head with the proxy's own 502 instead of mitmproxy's
  (`test_an_unreachable_upstream_gets_the_proxy_answer[badheader-http1.1]`).
- `TimedHttpStream.check_killed`, over `HttpStream.check_killed`: records why a client that left
  while its stream waited is gone (test_upstream_failures.py
  `test_a_client_that_leaves_mid_request_body`).
- The counts of what streams hold, which read `HttpStream._paused` and `_paused_event_queue`:
  mitmproxy queues a request body in memory without limit while its stream waits, and holds any
  number of HTTP/2 streams waiting on their upstream. Without the held bodies: test_limits.py
  `test_http2_streams_holding_bodies_are_reset`; without the stream cost:
  `test_an_http2_stream_flood_is_held_within_the_memory_budget`. Not reported upstream: "no bound
  on the request bodies and HTTP/2 streams held while they wait for an upstream connection".
- `TimedHttpStream.handle_event` dropping a stream that mitmproxy ended without dropping (an
  invalid request, a killed flow), which would stay, with its flow, until the client leaves
  (the limit of mitmproxy/mitmproxy#4456). Without it: test_limits.py
  `test_http2_streams_that_end_in_odd_ways_give_their_budget_back`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

import h2.stream
from mitmproxy import connection, flow, http
from mitmproxy.proxy import commands, context, events, layer, layers
from mitmproxy.proxy.layers.http import (
    DropStream,
    ErrorCode,
    GetHttpConnection,
    GetHttpConnectionCompleted,
    HttpErrorHook,
    HTTPMode,
    HttpResponseHook,
    HttpStream,
    RegisterHttpConnection,
    RequestData,
    RequestHeaders,
    RequestProtocolError,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
    SendHttp,
)
from mitmproxy.proxy.layers.http._http2 import Http2Server

from claude_proxy.policy.rules import Decision
from claude_proxy.proxy import answers, upstream_failures
from claude_proxy.proxy.deadline import Deadline
from claude_proxy.proxy.held_bodies import Held
from claude_proxy.proxy.upstream_timeouts import (
    CANCELLED_ON_WAIT,
    CONNECT,
    REFUSED_ON_WAIT,
    RESPONSE,
    SLOT,
    STREAM_OVERHEAD,
    TLS,
    Recheck,
    Step,
)
from claude_proxy.proxy.wellformed import BODY_FOLLOWS
from claude_proxy.record.decisions import (
    FAILURE,
    REFUSED,
    Recorder,
    loggable_path,
    printable,
)
from claude_proxy.record.throttle import Throttle

logger = logging.getLogger(__name__)

EXPIRED = 0.01  # seconds: a timer this close to its deadline counts as expired
ERROR_LOG_SECONDS = 60.0  # a failing timer logs one line at most this often


class TimedHttpLayer(layers.HttpLayer):
    """mitmproxy's HTTP layer, whose streams bound their waits on the upstream."""

    def __init__(
        self,
        context: context.Context,
        mode: HTTPMode,
        held: Held,
        recorder: Recorder,
        recheck: Recheck | None = None,
        failures: Throttle | None = None,
    ) -> None:
        super().__init__(context, mode)
        self.held = held  # what its streams hold while they wait, counted for the whole proxy
        self.recorder = recorder
        # The line a failing timer writes: shared by every connection (Limits gives its own).
        self.failures = failures or Throttle(ERROR_LOG_SECONDS)
        self.recheck = recheck
        self.checks: dict[TimedHttpStream, float] = {}  # stream → when to check it (monotonic)
        self.earliest: float | None = None  # no later than the earliest check; may be stale
        self.alarm = Deadline()  # set to `earliest`: it keeps few wakeups pending

    def make_stream(self, stream_id: int) -> layer.CommandGenerator[None]:
        self.streams[stream_id] = TimedHttpStream(self.context.fork(), stream_id, self)
        yield from self.event_to_child(self.streams[stream_id], events.Start())

    def check_at(self, stream: TimedHttpStream, at: float) -> None:
        self.checks[stream] = at
        if self.earliest is None or at < self.earliest:
            self.earliest = at

    def forget(self, stream: TimedHttpStream) -> None:
        self.checks.pop(stream, None)

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        # An alarm of a layer inside a tunnel passes through this one: mitmproxy routes it.
        if isinstance(event, events.Wakeup) and event.command in self.alarm.pending:
            if (yield from self.alarm.passed(event)):
                yield from self._check_due()
        else:
            yield from super()._handle_event(event)
        if self.earliest is not None and (self.alarm.at is None or self.earliest < self.alarm.at):
            yield from self.alarm.set(self.earliest - time.monotonic())

    def _check_due(self) -> layer.CommandGenerator[None]:
        now = time.monotonic()
        for stream in [s for s, at in self.checks.items() if at <= now + EXPIRED]:
            self.checks.pop(stream, None)
            if self.streams.get(stream.stream_id) is stream:
                yield from self.event_to_child(stream, CheckDue())
        self.earliest = min(self.checks.values(), default=None)

    def register_connection(self, command: RegisterHttpConnection) -> layer.CommandGenerator[None]:
        waiting = self.waiting_for_establishment.get(command.connection)
        orphan = waiting is not None and not waiting  # every stream that waited has given up
        yield from super().register_connection(command)
        if orphan and not command.err and self.exclusive(command.connection):
            # Nothing will use it, and it holds one of the client's five slots.
            yield commands.CloseConnection(command.connection)
        if command.err:
            # mitmproxy fails every later request on a failed connection at once; a timeout may
            # pass, a name resolve again, so a retry on this client connection (kept alive after
            # the answer) gets a new upstream connection instead.
            self.connections.pop(command.connection, None)

    def client_gave_up(self, stream_id: int) -> bool:
        """Whether an HTTP/2 client has reset a stream whose request it had sent whole (mitmproxy
        has stopped following such a stream, and does not pass its reset on)."""
        server = self.connections.get(self.context.client)
        if not isinstance(server, Http2Server):
            return False
        stream = server.h2_conn.streams.get(stream_id)
        return stream is None or stream.state_machine.state is h2.stream.StreamState.CLOSED

    def exclusive(self, server: connection.Connection) -> bool:
        """Whether an upstream connection can serve only the stream it was opened for: an
        HTTP/1 upstream for an HTTP/2 client (mitmproxy opens one per stream, never reused)."""
        return self.context.client.alpn == b"h2" and server.alpn != b"h2"


class CheckDue(events.Event):
    """From the HTTP layer to a stream whose check is due."""


class TimedHttpStream(HttpStream):
    def __init__(self, context: context.Context, stream_id: int, clock: TimedHttpLayer) -> None:
        super().__init__(context, stream_id)
        self.clock = clock  # the HTTP layer: it checks this stream when asked to
        self.broken = False  # the timer code failed: this stream goes on without limits
        self.body_follows = False
        self.waiting: str | None = None  # "connection" or "response"
        self.since = 0.0
        self.timed_out: tuple[Step, str] | None = None
        self.held = 0  # request-body bytes queued while paused, counted in the proxy's Held
        self.cost = 0  # what this HTTP/2 stream itself holds, counted in the proxy's Held
        self.refused = False  # refused when its upstream connection came: it has its answer
        self.dropped = False  # the HTTP layer has forgotten this stream
        self.ended = False  # ended for holding too much: every later event is dropped

    def handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        for command in self._handle(event):
            if isinstance(command, DropStream) and command.stream_id == self.stream_id:
                self.dropped = True
                self._release()
            yield command
        if (
            not self.dropped
            and self.client_state == self.state_errored
            and self.server_state == self.state_errored
        ):
            # mitmproxy ends some streams without dropping them (an invalid request, a killed
            # flow): each would stay, with its flow and what it counts, until the client leaves.
            self.dropped = True
            self._release()
            yield DropStream(self.stream_id)

    def _release(self) -> None:
        if self.cost or self.held:
            self.clock.held.release(self.context.client.id, self.cost + self.held)
            self.cost = self.held = 0

    def _handle(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self.ended:
            return
        if isinstance(event, RequestHeaders):
            self.body_follows = not event.end_stream
            if self.context.client.alpn == b"h2":
                cost = stream_cost(event.request)
                if too_much := self.clock.held.add(self.context.client.id, cost, pausable=False):
                    yield from self._refuse_stream(event, too_much)
                    return
                self.cost = cost
        if (
            isinstance(event, GetHttpConnectionCompleted)
            and self.waiting == "connection"
            and (server := event.reply[0]) is not None
        ):
            if self.clock.client_gave_up(self.stream_id) or any(
                isinstance(e, RequestProtocolError) for e in self._paused_event_queue
            ):
                # The client cancelled it (or left) while it waited: send nothing of it.
                event = GetHttpConnectionCompleted(event.command, (None, CANCELLED_ON_WAIT))
            elif self.clock.recheck is not None and self.clock.recheck(self.flow):
                # The policy changed while it waited and now refuses it (the flow has its
                # refusal): fail the wait, so that it answers inside mitmproxy's own handling.
                self.refused = True
                event = GetHttpConnectionCompleted(event.command, (None, REFUSED_ON_WAIT))
            if event.reply[0] is None and self.clock.exclusive(server):
                yield commands.CloseConnection(server)  # opened for this stream alone
        if isinstance(event, CheckDue):  # the layer has forgotten this check already
            yield from self._guarded(self._expire())
            return
        if self._paused is not None and isinstance(event, RequestData):
            # mitmproxy queues it in memory until the stream goes on: count it, within limits.
            # Flow control pauses a whole connection: on HTTP/2 this stream may wait for another
            # stream's upstream connection to close (mitmproxy opens five per destination), and
            # that one's body would never come. There the held limits alone apply.
            pausable = self.context.client.alpn != b"h2"
            if too_much := self.clock.held.add(self.context.client.id, len(event.data), pausable):
                yield from self._end_held(too_much)
                return
            self.held += len(event.data)
        yield from super().handle_event(event)
        if self.held:
            self._recount_held(event)
        if not self.broken:
            try:
                self._rearm()
            except Exception as e:
                self._broke(e)

    def _recount_held(self, event: events.Event) -> None:
        if not self._paused_event_queue:
            count = 0
        elif isinstance(event, events.CommandCompleted):  # went on, then paused again
            count = sum(len(e.data) for e in self._paused_event_queue if isinstance(e, RequestData))
        else:
            return
        self.clock.held.release(self.context.client.id, self.held - count)
        self.held = count

    def _end_held(self, too_much: str) -> layer.CommandGenerator[None]:
        """End the stream, forwarding nothing: HTTP/1 closes the client, HTTP/2 resets it."""
        self.ended = True
        self._stop_checking()
        self.clock.held.release(self.context.client.id, self.held)
        self.held = 0
        self._paused_event_queue.clear()
        reason = f"request body arrived faster than it could be passed on: {too_much}"
        request = self.flow.request
        if self.flow.metadata.get("claude_proxy.decision") is None:  # else the error hook logs it
            self.clock.recorder.decision(
                self.flow,
                Decision(False, reason),
                host=request.host,
                port=request.port,
                status=None,
            )
        # The Enforcer reads a refusal made on the way upstream from the error's prefix.
        self.flow.error = flow.Error(f"claude-proxy: {reason}")
        self.flow.live = False
        self.client_state = self.server_state = self.state_errored
        hook = HttpErrorHook(self.flow)
        hook.blocking = False  # the stream stays paused where it was: nothing waits for the hook
        yield hook
        yield SendHttp(
            ResponseProtocolError(self.stream_id, "killed", ErrorCode.KILL), self.context.client
        )
        yield DropStream(self.stream_id)

    def _refuse_stream(self, event: RequestHeaders, too_much: str) -> layer.CommandGenerator[None]:
        """Answer 503 to a stream that would hold more than the limits, and forget it."""
        self.ended = True
        request = event.request
        reason = f"too many requests waiting at once: {too_much}"
        self.clock.recorder.line(
            request.method,
            request.host,
            request.port,
            loggable_path(request.path),
            503,
            Decision(False, reason),
            started=time.time(),
            client=self.context.client,
        )
        body = (
            f"claude-proxy refused this request: {printable(reason)}.\n"
            "This is a limit of the sandbox's proxy, not a network fault: send fewer requests "
            "at once.\n"
        )
        response = answers.proxy_answer(
            503, request.method, body, kind="refused", error="connection_limit_reached",
            details=reason,
        )  # fmt: skip
        yield SendHttp(
            ResponseHeaders(self.stream_id, response, end_stream=False), self.context.client
        )
        if response.raw_content:
            yield SendHttp(ResponseData(self.stream_id, response.raw_content), self.context.client)
        yield SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)
        yield DropStream(self.stream_id)

    def _guarded(self, steps: Iterator[commands.Command]) -> layer.CommandGenerator[None]:
        """A bug here must not break the stream (mitmproxy would log a traceback per event)."""
        if self.broken:
            return
        try:
            yield from steps
        except Exception as e:
            self._broke(e)

    def _broke(self, e: Exception) -> None:
        self.broken = True
        self._stop_checking()
        if (skipped := self.clock.failures.allow()) is not None:
            more = f" ({skipped} more since the last line)" if skipped else ""
            logger.error("upstream timeouts failed, a request goes without them: %r%s", e, more)

    def check_invalid(self, request: bool) -> layer.CommandGenerator[bool]:
        if request:
            # Only the stream knows whether a body follows the head (HTTP/2 says so in its frames,
            # not in a header): the Enforcer reads it from the flow.
            self.flow.metadata[BODY_FOLLOWS] = self.body_follows
        elif problem := upstream_failures.invalid_head(self.flow, self.context.options):
            # mitmproxy would refuse it with its own 502 (HTML, or an HTTP/2 reset): ours instead.
            yield commands.CloseConnection(self.flow.server_conn)
            req = self.flow.request
            failure = upstream_failures.malformed_response(req.host, req.port, problem)
            yield from self._answer(
                upstream_failures.answer(req.method, req.host, req.port, failure), failure.what
            )
            return True
        return (yield from super().check_invalid(request))

    def handle_protocol_error(
        self, event: RequestProtocolError | ResponseProtocolError
    ) -> layer.CommandGenerator[None]:
        # A connection we closed on a timeout fails like any other: answer with the reason.
        if self.timed_out and isinstance(event, ResponseProtocolError):
            step, reason = self.timed_out
            response = answers.timeout(self.flow.request.method, step, reason)
            yield from self._answer(response, reason)
            return
        if self.refused and isinstance(event, ResponseProtocolError):
            yield from self._send_answer()  # the refusal the Enforcer made when the wait ended
            return
        try:
            failure = upstream_failures.of_event(event, self.flow)
        except Exception:
            logger.exception("describing an upstream failure failed")
            failure = None
        if failure is not None and failure.error and self._can_answer(event):
            request = self.flow.request
            response = upstream_failures.answer(request.method, request.host, request.port, failure)
            yield from self._answer(response, failure.what, refused=failure.refused)
            return
        if failure is not None:  # the error hook records why
            self.flow.metadata[REFUSED if failure.refused else FAILURE] = failure.what
        yield from super().handle_protocol_error(event)

    def check_killed(self, emit_error_hook: bool) -> layer.CommandGenerator[bool]:
        # mitmproxy fails a flow whose client left while the stream waited here (the error is
        # queued): the error hook records why.
        left = [e for e in self._paused_event_queue if isinstance(e, RequestProtocolError)]
        if left:
            try:
                self.flow.metadata.setdefault(
                    FAILURE, upstream_failures.of_event(left[0], self.flow).what
                )
            except Exception:
                logger.exception("describing why a client left failed")
        return (yield from super().check_killed(emit_error_hook))

    def _can_answer(self, event: RequestProtocolError | ResponseProtocolError) -> bool:
        """Whether the client can still get an answer of ours: nothing of a response has gone
        to it, and it has not left (mitmproxy's check_killed looks at the same queue)."""
        return (
            isinstance(event, ResponseProtocolError)
            and event.code.http_status_code() is not None
            and self.flow.response is None
            and self.flow.error is None
            and self.client_state != self.state_errored
            and not any(isinstance(e, RequestProtocolError) for e in self._paused_event_queue)
        )

    def _waiting_for(self) -> str | None:
        if self.timed_out:
            return None
        if self._paused is not None:
            return "connection" if isinstance(self._paused.command, GetHttpConnection) else None
        if (
            self.client_state == self.state_done
            and self.server_state == self.state_wait_for_response_headers
        ):
            return "response"
        return None

    def _rearm(self) -> None:
        waiting = self._waiting_for()
        if waiting == self.waiting:
            return
        self.waiting, self.since = waiting, time.time()
        self._stop_checking()
        if waiting == "connection":  # which of the two steps it waits in: seen at the check
            self._check_in(min(limit(self.context, CONNECT), limit(self.context, TLS)))
        elif waiting is not None:
            self._check_in(limit(self.context, RESPONSE))

    def _check_in(self, seconds: float) -> None:
        # A wakeup counts as activity for mitmproxy's idle timeout (tcp_timeout): waking at least
        # twice within it keeps a connection waiting on the upstream from a close without status.
        idle = getattr(self.context.options, "tcp_timeout", 600)
        self.clock.check_at(self, time.monotonic() + min(seconds, max(idle / 2, 0.5)))

    def _stop_checking(self) -> None:
        self.clock.forget(self)

    def _expire(self) -> layer.CommandGenerator[None]:
        now = time.time()
        server = None
        if self.waiting == "connection":
            if (server := self._pending_connection()) is None:  # not seen yet: look again later
                self._check_in(limit(self.context, CONNECT))
                return
            if server.timestamp_tcp_setup is not None:
                step, since = TLS, server.timestamp_tcp_setup
            elif server.timestamp_start is not None:
                step, since = CONNECT, server.timestamp_start
            else:  # mitmproxy has not started connecting: it waits for a free connection slot
                step, since = SLOT, self.since
        else:
            step, since = RESPONSE, self.since
        seconds = limit(self.context, step)
        if (remaining := since + seconds - now) > EXPIRED:
            # While it connects (or waits to), its next step may begin at any moment and end
            # before this one.
            soonest = min(limit(self.context, TLS), limit(self.context, CONNECT))
            self._check_in(min(remaining, soonest) if step in (CONNECT, SLOT) else remaining)
            return
        if server is None:
            reason = timed_out(step, self.flow.request.host, self.flow.request.port, seconds)
            self.timed_out = (step, reason)
            # Abandon the request upstream: HTTP/1 closes the connection, HTTP/2 resets the stream.
            yield SendHttp(
                RequestProtocolError(self.stream_id, reason, ErrorCode.CANCEL), self.context.server
            )
            # Fail the stream as mitmproxy would, so that it answers (and pauses for the response
            # hook) inside its own event handling.
            failed = ResponseProtocolError(self.stream_id, reason, ErrorCode.GENERIC_SERVER_ERROR)
            yield from super().handle_event(failed)
            return
        host, port = server.address or ("?", 0)
        if step is SLOT:
            yield from self._give_up_waiting(server, timed_out(step, host, port, seconds))
            return
        for stream in self._streams_waiting_on(server):  # they all share this connection's fate
            stream.timed_out = (step, timed_out(step, host, port, seconds))
        yield commands.CloseConnection(server)

    def _give_up_waiting(
        self, server: connection.Server, reason: str
    ) -> layer.CommandGenerator[None]:
        """Stop waiting for a connection that has not begun, and answer 504.

        The connection stays (others may wait on it, and mitmproxy cannot cancel one still waiting
        for its slot); this stream leaves its list, so that it is never sent when it opens.
        """
        assert self._paused is not None
        asked = self._paused.command
        parent = self._http_layer()
        waiting = parent.waiting_for_establishment.get(server, [])
        waiting[:] = [command for command in waiting if command is not asked]
        parent.command_sources.pop(asked, None)
        self.timed_out = (SLOT, reason)
        assert isinstance(asked, GetHttpConnection)
        yield from super().handle_event(GetHttpConnectionCompleted(asked, (None, reason)))

    def _answer(
        self, response: http.Response, reason: str, refused: bool = False
    ) -> layer.CommandGenerator[None]:
        """Answer the client ourselves (the upstream gave no response head), as mitmproxy would
        answer a response: its hook first, where the decision is logged with `reason`."""
        self.flow.response = response
        self.flow.metadata[REFUSED if refused else FAILURE] = reason
        yield from self._send_answer()

    def _send_answer(self) -> layer.CommandGenerator[None]:
        """Send the flow's response, made here, in place of the upstream's, and end the stream."""
        self._stop_checking()
        self.server_state = self.client_state = self.state_errored
        yield HttpResponseHook(self.flow)  # addons see it as any answer (the decision log does)
        response = self.flow.response
        assert response is not None  # made here; a response hook may replace it, not remove it
        yield SendHttp(
            ResponseHeaders(self.stream_id, response, end_stream=False), self.context.client
        )
        if response.raw_content:
            yield SendHttp(ResponseData(self.stream_id, response.raw_content), self.context.client)
        yield SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)
        self.flow.live = False
        yield DropStream(self.stream_id)

    def _http_layer(self) -> TimedHttpLayer:
        parent = self.context.layers[self.context.layers.index(self) - 1]
        assert isinstance(parent, TimedHttpLayer)
        return parent

    def _pending_connection(self) -> connection.Server | None:
        """The upstream connection this stream waits for."""
        asked = self._paused.command if self._paused else None
        for server, waiting in self._http_layer().waiting_for_establishment.items():
            if any(command is asked for command in waiting):
                return server if isinstance(server, connection.Server) else None
        return None

    def _streams_waiting_on(self, server: connection.Server) -> Iterable[TimedHttpStream]:
        parent = self._http_layer()
        for command in parent.waiting_for_establishment.get(server, ()):
            if isinstance(stream := parent.command_sources.get(command), TimedHttpStream):
                yield stream


def stream_cost(request: http.Request) -> int:
    head = len(request.data.method) + len(request.data.path) + len(request.data.authority)
    head += sum(len(name) + len(value) for name, value in request.headers.fields)
    return head + STREAM_OVERHEAD


def limit(context: context.Context, step: Step) -> int:
    return int(getattr(context.options, step.option, step.default))


def timed_out(step: Step, host: str, port: int, seconds: int) -> str:
    return f"{step.doing.format(printable(f'{host}:{port}'))} timed out after {seconds} s"
