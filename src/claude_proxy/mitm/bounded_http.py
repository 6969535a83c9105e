"""mitmproxy's HTTP/1 and HTTP/2 servers with a bounded request head and deadlines.

A head (request line and header fields, or an HTTP/2 header block) may be at most `max_head`
bytes with at most `max_headers` fields, and must be complete within `head_timeout` seconds of its
first byte (for a connection's first request: of the connection's start). A kept-alive connection
waits at most `idle_timeout` seconds for its next request. A refusal answers 414, 431 or 408 where
an answer is possible (else closes, in HTTP/2 with a GOAWAY), writes one BLOCK line, and drops what
was buffered. Nothing here runs while a request or its response is in flight.

What mitmproxy 12.3 lacks, and the part here that makes up for it. Each part has a test that fails
when that part alone is removed; tests/test_sansio_bounded.py runs each limit on mitmproxy's own
server too, beside ours. tests/test_mitm_internals.py checks that every private name and overridden
signature used here exists in the installed mitmproxy and h11.

- `BoundedReceiveBuffer`, a subclass of h11's private `ReceiveBuffer`, as `Http1Server.buf`:
  mitmproxy's HTTP/1 server parses any head that has arrived whole, however large and with however
  many fields. Without it a 70 KB head, or one of 257 fields, arriving at once is passed on instead
  of answered 431: `test_an_http1_head_over_the_limits_arriving_at_once_gets_431`, and
  test_bounded_http.py `test_receive_buffer_hands_out_bounded_heads_only`. Not reported upstream:
  "HTTP/1 server: no limit on the size or the field count of a request head".
- `BoundedHttp1Server._handle_event` (its deadlines and `over_limit`): mitmproxy has no deadline for
  a request head and none for a kept-alive connection but `tcp_timeout` (600 s of silence, which a
  trickle resets), and buffers a head that has not ended without limit. Without the deadlines:
  `test_a_first_head_not_complete_in_time_gets_408`,
  `test_a_connection_that_never_sends_is_closed_at_the_head_deadline`,
  `test_a_kept_alive_connection_idle_for_its_limit_is_closed_without_an_answer`; without
  `over_limit`: `test_an_endless_request_line_gets_414_once_past_the_limit` and the 431 tests. Not
  reported upstream: "no request-head timeout: a client that trickles a head holds its connection
  and its buffer for as long as it likes".
- `BoundedHttp1Server.read_body`, over `Http1Server.read_body`, with `TrailerDroppingReader`:
  mitmproxy's HTTP/1 server raises NotImplementedError("HTTP trailers are not implemented yet") on a
  chunked request with trailers: a traceback, and a client waiting for an answer that never comes.
  Without it: `test_http1_request_trailers_end_the_message`. Upstream: mitmproxy/mitmproxy#2474
  (HTTP trailers; HTTP/1 support is still missing).
- `FrameGuard`, in `BoundedHttp2Server._handle_event`: h2 checks a frame's length only once all of
  it has arrived (frames of 128 KiB here), and takes a header block of 64 CONTINUATION frames.
  Without it: `test_an_http2_header_block_over_the_limit_is_refused_before_it_arrives`. Not reported
  upstream: "HTTP/2 server: a header block is buffered whole, up to megabytes, before any limit".
- `BoundedHttp2Server.handle_h2_event`, over `Http2Server.handle_h2_event`: the field count of an
  HTTP/2 head, answered 431 on its own stream. Without it:
  `test_an_http2_request_with_too_many_fields_gets_431_on_its_stream`. Not reported upstream (as
  for HTTP/1).
- `BoundedHttp2Server.follow_unsent`, which reads `BufferedH2Connection.stream_buffers`: mitmproxy
  queues what waits for an HTTP/2 client's flow-control window without limit and reads on from the
  upstream, so a client that stops reading makes it hold the whole response. Without it:
  `test_an_http2_client_that_does_not_read_stops_the_reading_of_its_upstream`. Not reported
  upstream: "HTTP/2 server: no backpressure from a client's flow-control window to the upstream".
- The HTTP/2 deadlines (`follow_phase`, `on_deadline`), ending in a GOAWAY: as for HTTP/1. Without
  them: `test_a_silent_http2_client_gets_goaway_at_the_head_deadline`.
- `max_concurrent_streams = MAX_STREAMS`: h2 (4.x, as locked) already advertises 100 of its own
  accord, so no test fails when this line alone goes
  (`test_an_http2_client_may_open_at_most_a_hundred_streams` passes on mitmproxy's server too); it
  keeps the bound should h2's default change.
- `BoundedHttpLayer`, which puts the bounded servers where mitmproxy's `HttpLayer` puts its own:
  without it none of the above applies
  (`test_the_bounded_layer_serves_its_client_with_the_bounded_servers`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h11
from h11._receivebuffer import ReceiveBuffer
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import ErrorCode, HTTPMode, ReceiveHttp, RequestProtocolError
from mitmproxy.proxy.layers.http._http1 import Http1Server
from mitmproxy.proxy.layers.http._http2 import Http2Server

from claude_proxy.mitm.timed_http import TimedHttpLayer
from claude_proxy.proxy import answers
from claude_proxy.proxy.deadline import Deadline
from claude_proxy.proxy.held_bodies import Held
from claude_proxy.proxy.upstream_timeouts import Recheck
from claude_proxy.record.decisions import Recorder
from claude_proxy.record.throttle import Throttle

MAX_HEAD = 64 * 1024
MAX_HEADERS = 256
MAX_STREAMS = 100  # HTTP/2 streams open at once on one client connection
# Response bytes waiting for an HTTP/2 client's flow-control window, above which the upstream
# connections serving it are not read (and again below the low mark): a client that does not
# read makes the proxy hold this much, not the whole response.
UNSENT_HIGH = 4 * 1024 * 1024
UNSENT_LOW = 1024 * 1024
Phase = Literal["head", "idle"] | None


@dataclass(frozen=True)
class Bounds:
    head_timeout: float = 30
    idle_timeout: float = 120
    max_head: int = MAX_HEAD
    max_headers: int = MAX_HEADERS


class BoundedReceiveBuffer(ReceiveBuffer):
    """Hands out no head that is too large or has too many fields; remembers why instead."""

    def __init__(self, bounds: Bounds) -> None:
        super().__init__()
        self.bounds = bounds
        self.refusal: tuple[int, str] | None = None

    def maybe_extract_lines(self) -> list[bytearray] | None:
        if self.refusal:
            return None
        size = len(self)
        lines = super().maybe_extract_lines()
        if lines is None:
            return None
        if size - len(self) > self.bounds.max_head:
            self.refusal = (431, f"request head larger than {self.bounds.max_head // 1024} KiB")
        elif len(lines) > self.bounds.max_headers + 1:  # the request line, then the fields
            self.refusal = (431, f"more than {self.bounds.max_headers} header fields")
        else:
            return lines
        return None


def arm(
    deadline: Deadline, bounds: Bounds, phase: Phase, head_started: float
) -> layer.CommandGenerator[None]:
    """Set `deadline` for a phase: a head due `head_timeout` after it started, or idle time."""
    if phase == "head":
        yield from deadline.set(bounds.head_timeout - (time.monotonic() - head_started))
    elif phase == "idle":
        yield from deadline.set(bounds.idle_timeout)
    else:
        deadline.clear()


class TrailerDroppingReader:
    """A body reader whose end carries no trailers: mitmproxy's HTTP/1 server raises on them
    (one traceback and a hung client per attempt). Trailers never change where a message ends."""

    def __init__(self, inner: Callable[[ReceiveBuffer], object]) -> None:
        self.inner = inner

    def __call__(self, buf: ReceiveBuffer) -> object:
        return self._drop(self.inner(buf))

    def read_eof(self) -> object:
        return self._drop(self.inner.read_eof())  # type: ignore[attr-defined]

    @staticmethod
    def _drop(event: object) -> object:
        if isinstance(event, h11.EndOfMessage) and event.headers:
            return h11.EndOfMessage()
        return event


class BoundedHttp1Server(Http1Server):
    def read_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if not isinstance(self.body_reader, TrailerDroppingReader):
            self.body_reader = TrailerDroppingReader(self.body_reader)  # type: ignore[assignment]
        yield from super().read_body(event)

    def __init__(self, context: Context, bounds: Bounds, recorder: Recorder) -> None:
        super().__init__(context)
        self.bounds = bounds
        self.recorder = recorder
        self.buf: BoundedReceiveBuffer = BoundedReceiveBuffer(bounds)
        self.deadline = Deadline()
        self.phase: Phase = None
        self.head_started = time.monotonic()

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup):
            if (yield from self.deadline.passed(event)):
                yield from self.on_deadline()
            return
        yield from super()._handle_event(event)
        if self.state in (self.passthrough, self.done):
            self.deadline.clear()  # a tunnel or WebSocket now, or closed
            return
        if isinstance(event, events.DataReceived) and (refusal := self.over_limit()):
            yield from self.refuse(*refusal)
            return
        yield from self.follow_phase()

    def over_limit(self) -> tuple[int | None, str] | None:
        if self.buf.refusal:
            return self.buf.refusal
        if len(self.buf) <= self.bounds.max_head:
            return None
        kib = self.bounds.max_head // 1024
        if self.state != self.read_headers:
            return None, f"more than {kib} KiB sent ahead of the request being served"
        if b"\n" not in bytes(self.buf):
            return 414, f"request line longer than {kib} KiB"
        return 431, f"request head larger than {kib} KiB"

    def follow_phase(self) -> layer.CommandGenerator[None]:
        """Waiting for a head (its first byte came, or it is the first) or idle between two."""
        phase: Phase = None
        if self.state == self.read_headers:
            phase = "head" if self.buf or self.stream_id == 1 else "idle"
        if phase == self.phase:
            return
        self.phase = phase
        if phase == "head" and self.stream_id != 1:  # the first request counts from the start
            self.head_started = time.monotonic()
        yield from arm(self.deadline, self.bounds, phase, self.head_started)

    def on_deadline(self) -> layer.CommandGenerator[None]:
        if self.phase == "head":
            timeout = self.bounds.head_timeout
            yield from self.refuse(408, f"request head not complete within {timeout:g} s")
        elif self.phase == "idle":  # housekeeping, not a refusal: no line
            self.state = self.done
            yield commands.CloseConnection(self.conn)

    def refuse(self, status: int | None, reason: str) -> layer.CommandGenerator[None]:
        in_flight = self.state != self.read_headers
        self.buf = BoundedReceiveBuffer(self.bounds)  # let go of what was buffered
        self.deadline.clear()
        self.recorder.block(None if in_flight else status, reason, self.context, self.head_started)
        if not in_flight and status is not None:
            yield commands.SendData(self.conn, answers.limit_bytes(status, reason))
        yield commands.CloseConnection(self.conn)
        if in_flight:
            code = ErrorCode.GENERIC_CLIENT_ERROR
            yield ReceiveHttp(RequestProtocolError(self.stream_id, reason, code))
        self.state = self.done


HEADERS, CONTINUATION = 0x1, 0x9
END_HEADERS = 0x4
PREFACE_SIZE = 24


class FrameGuard:
    """Follows the frame boundaries of what an HTTP/2 client sends, to refuse an oversized frame
    or header block before the h2 library buffers it: h2 checks a frame's length only once all of
    it has arrived (up to 16 MiB), and takes 64 CONTINUATION frames of 128 KiB each."""

    def __init__(self, max_frame: int, max_block: int) -> None:
        self.max_frame = max_frame
        self.max_block = max_block
        self.preface = PREFACE_SIZE  # bytes of the client preface still to pass
        self.header = b""  # a frame header received in part
        self.kind = 0  # the type of the frame whose payload is arriving
        self.payload_left = 0
        self.block: int | None = None  # bytes so far of a header block still open

    @property
    def head_pending(self) -> bool:
        return self.block is not None or (
            self.payload_left > 0 and self.kind in (HEADERS, CONTINUATION)
        )

    def feed(self, data: bytes) -> str | None:
        """Why the client is refused, or None."""
        view = memoryview(data)
        i = min(self.preface, len(view))
        self.preface -= i
        while i < len(view):
            if self.payload_left:
                step = min(self.payload_left, len(view) - i)
                self.payload_left -= step
                i += step
                continue
            need = 9 - len(self.header)
            self.header += bytes(view[i : i + need])
            i += need
            if len(self.header) < 9:
                break
            length, self.kind, flags = (
                int.from_bytes(self.header[:3]),
                self.header[3],
                self.header[4],
            )
            self.header = b""
            self.payload_left = length
            if length > self.max_frame:
                return f"HTTP/2 frame larger than {self.max_frame // 1024} KiB"
            if self.kind == HEADERS:
                self.block = length
            elif self.kind == CONTINUATION and self.block is not None:
                self.block += length
            else:
                continue
            if self.block > self.max_block:
                return f"HTTP/2 header block larger than {self.max_block // 1024} KiB"
            if flags & END_HEADERS:
                self.block = None
        return None


class BoundedHttp2Server(Http2Server):
    def __init__(self, context: Context, bounds: Bounds, recorder: Recorder, held: Held) -> None:
        super().__init__(context)
        self.bounds = bounds
        self.recorder = recorder
        self.held = held  # its upstream_control stops reading the upstreams serving a client
        # Streams at once, as the RFC recommends at the least (RFC 9113 §6.5.2): with the head
        # limit, what one connection's streams can hold is bounded before any budget applies.
        self.h2_conn.local_settings.max_concurrent_streams = MAX_STREAMS
        self.h2_conn.local_settings.acknowledge()  # sent with the preface, as mitmproxy's own are
        self.frames = FrameGuard(self.h2_conn.max_inbound_frame_size, bounds.max_head)
        self.deadline = Deadline()
        self.phase: Phase = None
        self.head_started = time.monotonic()
        self.served = False  # a request has come on this connection
        self.throttled = False  # its upstream connections are not read for now

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup):
            if (yield from self.deadline.passed(event)):
                yield from self.on_deadline()
            return
        if isinstance(event, events.DataReceived) and (why := self.frames.feed(event.data)):
            self.recorder.block(None, why, self.context, self.head_started)
            self.deadline.clear()
            yield from self.protocol_error(why, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            return
        yield from super()._handle_event(event)
        self.follow_unsent()
        yield from self.follow_phase()

    def follow_unsent(self) -> None:
        """Read its upstreams only while what waits for the client's window stays small."""
        control = self.held.upstream_control
        if control is None:
            return
        # mitmproxy's BufferedH2Connection: stream id → what waits for the client's window
        buffers: dict[int, Any] = getattr(self.h2_conn, "stream_buffers", None) or {}
        if not buffers and not self.throttled:
            return
        unsent = 0
        for queue in buffers.values():
            for chunk in queue:
                unsent += len(chunk.data)
        if unsent > (UNSENT_LOW if self.throttled else UNSENT_HIGH):
            # Again on every event while above: asyncio's stream reader resumes reading on its
            # own when its buffer drains, which may undo an earlier pause.
            self.throttled = True
            control(self.context.client.id, True)
        elif self.throttled:
            self.throttled = False
            control(self.context.client.id, False)

    def handle_h2_event(self, event: h2.events.Event) -> layer.CommandGenerator[bool]:
        if isinstance(event, h2.events.RequestReceived):
            self.served = True
            fields = sum(1 for name, _ in event.headers if not name.startswith(b":"))
            if fields > self.bounds.max_headers:
                reason = f"more than {self.bounds.max_headers} header fields"
                self.recorder.block(431, reason, self.context, self.head_started)
                self.refuse_stream(event.stream_id, 431, reason, ended=bool(event.stream_ended))
                return False
        elif isinstance(event, h2.exceptions.DenialOfServiceError):  # hpack: list over 64 KiB
            self.recorder.block(None, f"HTTP/2 {event}", self.context, self.head_started)
        return (yield from super().handle_h2_event(event))

    def refuse_stream(self, stream_id: int, status: int, reason: str, *, ended: bool) -> None:
        response = answers.limit(status, reason)
        fields = [(k.lower(), v) for k, v in response.headers.fields if k.lower() != b"connection"]
        self.h2_conn.send_headers(stream_id, [(b":status", b"%d" % status), *fields])
        self.h2_conn.send_data(stream_id, response.content or b"", end_stream=True)
        if not ended:  # the body it still means to send is not wanted
            self.h2_conn.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)

    def follow_phase(self) -> layer.CommandGenerator[None]:
        phase: Phase = None
        if self.h2_conn.state_machine.state is not h2.connection.ConnectionState.CLOSED:
            if self.frames.head_pending or not self.served:
                phase = "head"
            elif self.h2_conn.open_inbound_streams == 0:
                phase = "idle"
        if phase == self.phase:
            return
        self.phase = phase
        if phase == "head" and self.served:
            self.head_started = time.monotonic()
        yield from arm(self.deadline, self.bounds, phase, self.head_started)

    def on_deadline(self) -> layer.CommandGenerator[None]:
        if self.phase == "head":
            reason = f"request head not complete within {self.bounds.head_timeout:g} s"
            self.recorder.block(None, reason, self.context, self.head_started)
            yield from self.goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, reason)
        elif self.phase == "idle":
            yield from self.goaway(h2.errors.ErrorCodes.NO_ERROR, "idle")

    def goaway(self, code: h2.errors.ErrorCodes, why: str) -> layer.CommandGenerator[None]:
        self.h2_conn.close_connection(code, why.encode())
        yield commands.SendData(self.conn, self.h2_conn.data_to_send())
        yield from self.close_connection(why)


class BoundedHttpLayer(TimedHttpLayer):
    """The HTTP layer with bounded servers for the client connection (and timed upstream waits)."""

    def __init__(
        self,
        context: Context,
        mode: HTTPMode,
        bounds: Bounds,
        held: Held,
        recorder: Recorder,
        recheck: Recheck | None = None,
        failures: Throttle | None = None,
    ) -> None:
        super().__init__(context, mode, held, recorder, recheck, failures)
        self.bounds = bounds

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            client = self.context.client
            if client.alpn == b"h2":
                server: layer.Layer = BoundedHttp2Server(
                    self.context.fork(), self.bounds, self.recorder, self.held
                )
            else:
                server = BoundedHttp1Server(self.context.fork(), self.bounds, self.recorder)
            self.connections.setdefault(client, server)
        yield from super()._handle_event(event)
