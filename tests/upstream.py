"""A local HTTPS upstream that counts what reaches it: TCP connections, SNI, requests.

It plays api.anthropic.com (and every other host: the routing script sends every upstream
connection here, so a leak to any host would be counted).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC11B85"
GATE_SECONDS = 5
ORG_HEADER = "anthropic-organization-id"
# What claude-proxy asks to learn the organization of an API key, and of an OAuth token.
PROFILE_PATH = "/api/oauth/profile"
PROBE_PATHS = ("/v1/models", PROFILE_PATH)


@dataclass
class Seen:
    connections: int = 0
    snis: list[str | None] = field(default_factory=list)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, Host
    headers: list[dict[str, str]] = field(default_factory=list)
    gate_waits: list[bool] = field(default_factory=list)  # False: the gate timed out
    bodies: list[bytes] = field(default_factory=list)  # request bodies, de-chunked
    raw: bytearray = field(default_factory=bytearray)  # every byte read, on every connection


@dataclass
class Account:
    """How the upstream answers a key or token, as Anthropic would for its organization."""

    organization: str | None  # in anthropic-organization-id and the OAuth profile; None: unnamed
    probe_gate: str = ""  # /v1/models and /api/oauth/profile wait for this gate before answering
    hang_up: bool = False  # a GET with it is not answered: the connection just closes


class Upstream(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: object, client_address: object) -> None:
        """A client (the proxy) that goes mid-response is what many tests do: no traceback."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    def __init__(self, tls: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.tls = tls
        self.lock = threading.Lock()
        self.finished = threading.Condition(self.lock)
        self.open_connections = 0
        self.record = Seen()  # what the handlers write; tests read it through `seen`
        self.markers: dict[tuple[str, int], bool] = {}  # settle()'s connections: accepted yet?
        self.gates: dict[str, threading.Event] = {}
        self.accounts: dict[str, Account] = {}  # key or OAuth token → its account
        self.unreachable = False  # close every connection before TLS
        tls.sni_callback = self._sni

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def seen(self) -> Seen:
        """What reached the upstream, counting every connection opened before this call."""
        self.settle()
        return self.record

    def settle(self, timeout: float = 10) -> None:
        """Barrier: a connection waits in the listen queue until the server thread accepts it, so
        a marker connection, once accepted, proves that every earlier one has been counted."""
        with socket.socket() as marker:
            marker.bind(("127.0.0.1", 0))
            name = marker.getsockname()
            with self.lock:
                self.markers[name] = False
            marker.settimeout(timeout)
            marker.connect(("127.0.0.1", self.port))
            with self.finished:
                accepted = self.finished.wait_for(lambda: self.markers[name], timeout)
                del self.markers[name]
        if not accepted:
            raise AssertionError("upstream: the marker connection was never accepted")

    def reset(self) -> None:
        with self.lock:
            self.record = Seen()
            self.gates.clear()
            self.accounts.clear()
            self.unreachable = False

    def gate(self, name: str) -> threading.Event:
        """An event a handler waits on before it sends the rest of a response."""
        with self.lock:
            return self.gates.setdefault(name, threading.Event())

    def wait_gate(self, name: str, seconds: float = GATE_SECONDS) -> None:
        opened = self.gate(name).wait(timeout=seconds)
        with self.lock:
            self.record.gate_waits.append(opened)

    def get_request(self) -> tuple[socket.socket, object]:
        sock, addr = super().get_request()
        with self.finished:
            if addr in self.markers:
                self.markers[addr] = True
                self.finished.notify_all()
            else:
                self.record.connections += 1
            self.open_connections += 1
        return sock, addr

    def wait_idle(self, timeout: float = 10) -> None:
        """Barrier: every connection accepted so far has been read to its end and closed."""
        with self.finished:
            if not self.finished.wait_for(lambda: self.open_connections == 0, timeout):
                raise AssertionError(f"upstream: {self.open_connections} connection(s) still open")

    def finish_request(self, request: socket.socket, client_address: object) -> None:
        if self.unreachable:
            request.close()
            self._closed()
            return
        try:
            wrapped = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            self._closed()
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            wrapped.close()  # wrap_socket took the descriptor: shutdown_request cannot close it
            self._closed()

    def _closed(self) -> None:
        with self.finished:
            self.open_connections -= 1
            self.finished.notify_all()

    def _sni(self, _sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        with self.lock:
            self.record.snis.append(name)

    def serve_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        return thread


class RecordingReader:
    """The handler's rfile, copying every byte it reads into the upstream's record."""

    def __init__(self, inner: object, server: Upstream) -> None:
        self.inner = inner
        self.server = server

    def _keep(self, data: bytes) -> bytes:
        with self.server.lock:
            self.server.record.raw += data
        return data

    def readline(self, limit: int = -1) -> bytes:
        return self._keep(self.inner.readline(limit))  # type: ignore[attr-defined]

    def read(self, size: int = -1) -> bytes:
        return self._keep(self.inner.read(size))  # type: ignore[attr-defined]

    def close(self) -> None:
        self.inner.close()  # type: ignore[attr-defined]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: Upstream

    def setup(self) -> None:
        super().setup()
        self.rfile = RecordingReader(self.rfile, self.server)  # type: ignore[assignment]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _record(self) -> None:
        with self.server.lock:
            self.server.record.requests.append(
                (self.command, self.path, self.headers.get("Host", ""))
            )
            self.server.record.headers.append({k.lower(): v for k, v in self.headers.items()})

    def _account(self) -> Account | None:
        """The account of the key (x-api-key) or token (Authorization: Bearer) presented."""
        headers = getattr(self, "headers", None)  # unset when the request line was malformed
        if headers is None:
            return None
        bearer = headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return self.server.accounts.get(headers.get("x-api-key", "") or bearer)

    def send_response(self, code: int, message: str | None = None) -> None:
        super().send_response(code, message)
        account = self._account()
        # Every API answer names the credential's organization; the OAuth profile only in JSON.
        if account and account.organization and urlsplit(self.path).path != PROFILE_PATH:
            self.send_header(ORG_HEADER, account.organization)

    def _profile(self) -> None:
        account = self._account()
        if account is None or account.organization is None:
            body, status = b'{"type": "error", "error": {"type": "authentication_error"}}', 401
        else:
            profile = {"account": {"uuid": "acc"}, "organization": {"uuid": account.organization}}
            body, status = json.dumps(profile).encode(), 200
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._record()
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if (account := self._account()) and account.hang_up:
            self.close_connection = True
            return
        if account and account.probe_gate and url.path in PROBE_PATHS:
            self.server.wait_gate(account.probe_gate)
        if url.path == PROFILE_PATH:
            return self._profile()
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self._websocket()
        if self.headers.get("Upgrade"):
            return self._switch_to_raw()
        if url.path == "/sse":
            return self._sse(
                int(query.get("n", "3")), query.get("gate", ""), float(query.get("gap", "0"))
            )
        if url.path == "/bytes":
            return self._bytes(int(query["size"]), query.get("gate", ""))
        if url.path == "/hang":
            return self._hang(query["gate"], float(query.get("bound", GATE_SECONDS)))
        body = b"hello from upstream\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._record()
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        self._record()
        body = self._read_body()
        with self.server.lock:
            self.server.record.bodies.append(body)
        if urlsplit(self.path).path == "/v1/messages":
            return self._messages(json.loads(body))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return body
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _switch_to_raw(self) -> None:
        """Agree to any upgrade, then read raw bytes until the peer closes (all recorded)."""
        self.send_response(101)
        self.send_header("Upgrade", self.headers["Upgrade"])
        self.send_header("Connection", "Upgrade")
        self.end_headers()
        self.wfile.flush()
        while self.rfile.read(1):
            pass
        self.close_connection = True

    def _sse(self, n: int, gate: str, gap: float) -> None:
        """`n` events; with a gate, the last one only after the test has seen the first."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        for i in range(n):
            if gate and i == n - 1:
                self.server.wait_gate(gate)
            elif gap and i:
                time.sleep(gap)
            self.wfile.write(f"event: tick\ndata: {i} {time.time()}\n\n".encode())
            self.wfile.flush()
        self.close_connection = True

    def _hang(self, gate: str, bound: float) -> None:
        """No response head until the test opens the gate (by then the client has given up), or
        `bound` seconds have passed."""
        self.server.wait_gate(gate, bound)
        try:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        except OSError:
            pass  # the proxy has closed the connection: expected
        self.close_connection = True

    def _bytes(self, size: int, gate: str) -> None:
        """`size` bytes; with a gate, the second half only after the test has seen the first."""
        chunk = b"x" * 65536
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        sent = 0
        while sent < size:
            if gate and sent >= size // 2:
                self.server.wait_gate(gate)
                gate = ""
            piece = chunk[: min(len(chunk), size - sent)]
            self.wfile.write(piece)
            sent += len(piece)
        self.wfile.flush()

    def _messages(self, request: dict[str, object]) -> None:
        """A minimal streaming Messages API response, as the anthropic SDK parses it."""
        words = ["Hello", " from", " the", " upstream"]
        events: list[tuple[str, dict[str, object]]] = [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": "msg_test",
                        "type": "message",
                        "role": "assistant",
                        "content": [],
                        "model": request.get("model", "test"),
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": 3, "output_tokens": 0},
                    },
                },
            ),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
        ]
        for word in words:
            events.append(
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": word},
                    },
                )
            )
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": len(words)},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for name, data in events:
            self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()
        self.close_connection = True

    def _websocket(self) -> None:
        """Accept the upgrade, then echo one unmasked text frame back for each masked one."""
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while frame := read_frame(self.rfile):
            opcode, payload = frame
            if opcode == 0x8:
                self.wfile.write(bytes([0x88, 0]))
                break
            self.wfile.write(bytes([0x80 | opcode, len(payload)]) + payload)
            self.wfile.flush()
        self.close_connection = True


def read_frame(stream: object) -> tuple[int, bytes] | None:
    """Read one small WebSocket frame (payload < 126 bytes)."""
    head = stream.read(2)  # type: ignore[attr-defined]
    if len(head) < 2:
        return None
    opcode, length, masked = head[0] & 0x0F, head[1] & 0x7F, head[1] & 0x80
    mask = stream.read(4) if masked else b"\0\0\0\0"  # type: ignore[attr-defined]
    data = stream.read(length)  # type: ignore[attr-defined]
    return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(data))


class SilentUpstream:
    """Accepts TCP connections and never reads or answers: a TLS handshake that hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []  # every socket it has: closed by close()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            self.accepted(conn)

    def accepted(self, conn: socket.socket) -> None:
        """Silence."""

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


class SlowConnect(SilentUpstream):
    """A TCP relay to a port, which reaches it only `delay` seconds after each accept: a slow
    network between the proxy and the upstream (the TLS handshake waits that long)."""

    def __init__(self, port: int, delay: float) -> None:
        self.target, self.delay = port, delay
        super().__init__()

    def accepted(self, conn: socket.socket) -> None:
        threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        time.sleep(self.delay)  # the slow network itself, not a synchronisation
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            client.close()
            return
        self.held.append(upstream)
        threading.Thread(target=self._pipe_down, args=(upstream, client), daemon=True).start()
        self._pipe(client, upstream)

    def _pipe_down(self, source: socket.socket, sink: socket.socket) -> None:
        """What the upstream sends toward the proxy."""
        self._pipe(source, sink)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 20):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class GatedConnect(SlowConnect):
    """A TCP relay to a port that reaches it only once `open()` is called: an upstream connection
    the proxy has begun, and waits on, for as long as a test needs. `accepted_count` says how many
    connections the proxy has begun."""

    def __init__(self, port: int) -> None:
        self.gate = threading.Event()
        self.count = threading.Semaphore(0)
        super().__init__(port, 0)

    def accepted(self, conn: socket.socket) -> None:
        self.count.release()
        super().accepted(conn)

    def wait_accepted(self, timeout: float = 10) -> None:
        """Barrier: the proxy has begun one more connection."""
        if not self.count.acquire(timeout=timeout):
            raise AssertionError("the proxy never connected to the upstream")

    def _relay(self, client: socket.socket) -> None:
        if not self.gate.wait(30):  # a bound only: the test opens it long before
            client.close()
            return
        super()._relay(client)

    def open(self) -> None:
        self.gate.set()


class CountingRelay(SlowConnect):
    """A TCP relay to a port that counts what the upstream sends toward the proxy: how much of a
    response the proxy has read."""

    def __init__(self, port: int) -> None:
        self.relayed = 0
        super().__init__(port, 0)

    def _pipe_down(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
                self.relayed += len(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def wait_stalled(self, quiet: float = 1.0, timeout: float = 30) -> int:
        """Barrier: nothing more has moved for `quiet` seconds; what had moved by then."""
        deadline = time.monotonic() + timeout
        seen, since = self.relayed, time.monotonic()
        while time.monotonic() - since < quiet:
            assert time.monotonic() < deadline, f"still moving after {timeout} s ({seen} bytes)"
            time.sleep(0.05)
            if self.relayed != seen:
                seen, since = self.relayed, time.monotonic()
        return seen


class PeakRss:
    """Samples a process's resident memory in the background: measurement, never a barrier."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self.peak = rss(pid)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                self.peak = max(self.peak, rss(self.pid))
            except (OSError, AssertionError):
                return

    @property
    def growth(self) -> int:
        return self.peak - self.start

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss(self.pid))


def rss(pid: int) -> int:
    """Resident memory in bytes, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/PID/status")


class CleartextUpstream(SilentUpstream):
    """A cleartext HTTP server that records every byte after a request's head, and answers a
    WebSocket upgrade with 101 (anything else with `answer`, at once, or never): the far end of
    a `ws://` connection or of an upload still streaming to `http://` through the proxy."""

    GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455's

    def __init__(self, answer: bytes = b"") -> None:
        self.answer = answer  # sent at once to a request that is not an upgrade
        self.received = bytearray()
        self.arrived = threading.Condition()
        self.ended = threading.Event()  # the proxy closed its connection
        super().__init__()

    def accepted(self, conn: socket.socket) -> None:
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        head = b""
        try:
            while b"\r\n\r\n" not in head and (chunk := conn.recv(65536)):
                head += chunk
            if key := re.search(rb"(?i)\r\nsec-websocket-key: *([^\r]+)", head):
                self._switch(conn, key[1].strip())
            elif self.answer:
                conn.sendall(self.answer)
            self._record(head.partition(b"\r\n\r\n")[2])
            while data := conn.recv(65536):
                self._record(data)
        except OSError:
            pass
        self.ended.set()

    def _switch(self, conn: socket.socket, key: bytes) -> None:
        accept = base64.b64encode(hashlib.sha1(key + self.GUID).digest())
        conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )

    def _record(self, data: bytes) -> None:
        with self.arrived:
            self.received += data
            self.arrived.notify_all()

    def wait_received(self, size: int, timeout: float = 10) -> None:
        """Barrier: at least `size` bytes have arrived after the upgrade."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.received) >= size, timeout):
                raise AssertionError(f"only {len(self.received)} of {size} bytes arrived")
