"""The real Claude Code, driven by a scripted model: a local stand-in for the Messages API that
answers each turn with the next `tool_use` block of a script, and records every request body.

What a hostile model gets back is what Claude Code sends in its next request: the tool results
(a file's bytes, a command's output) are proof of what the agent could read or do.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.mountns import MountNamespace


@dataclass(frozen=True)
class Call:
    """One tool call the scripted model makes."""

    name: str  # the attack's name in the tests
    tool: str  # Bash, Write, Read, Edit
    input: dict[str, Any]


@dataclass
class Session:
    """What Claude Code sent to the model in one run."""

    bodies: list[bytes] = field(default_factory=list)
    returncode: int = 0
    output: str = ""

    def results(self) -> dict[str, str]:
        """Each tool call's result, as Claude Code gave it to the model (by call name)."""
        found: dict[str, str] = {}
        for body in self.bodies:
            request = json.loads(body)
            for message in request.get("messages", []):
                content = message.get("content")
                for block in content if isinstance(content, list) else []:
                    if isinstance(block, dict) and block.get("type") == "tool_result":
                        found[block["tool_use_id"]] = json.dumps(block.get("content"))
        return found

    def sent(self) -> bytes:
        return b"\n".join(self.bodies)


class ScriptedModel(ThreadingHTTPServer):
    """Answers /v1/messages: the next call of the script while there is one, then "done"."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ModelHandler)
        self.lock = threading.Lock()
        self.script: list[Call] = []
        self.session = Session()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self, script: Sequence[Call]) -> Session:
        with self.lock:
            self.script = list(script)
            self.session = Session()
            return self.session

    def next_block(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """The conversation's next tool call: one per turn, counted by the results so far."""
        tools = {t.get("name") for t in request.get("tools", []) if isinstance(t, dict)}
        if "Bash" not in tools:
            return None  # not the agent's own conversation (a title, a summary)
        done = sum(
            1
            for m in request.get("messages", [])
            for b in (m.get("content") if isinstance(m.get("content"), list) else [])
            if isinstance(b, dict) and b.get("type") == "tool_result"
        )
        with self.lock:
            if done >= len(self.script):
                return None
            call = self.script[done]
        return {"type": "tool_use", "id": call.name, "name": call.tool, "input": call.input}


class _ModelHandler(BaseHTTPRequestHandler):
    server: ScriptedModel
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._send(404, "application/json", b"{}")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not self.path.startswith("/v1/messages"):
            self._send(404, "application/json", b"{}")
            return
        if self.path.startswith("/v1/messages/count_tokens"):
            self._send(200, "application/json", b'{"input_tokens": 10}')
            return
        request = json.loads(body or b"{}")
        with self.server.lock:
            self.server.session.bodies.append(body)
        block = self.server.next_block(request)
        content = block or {"type": "text", "text": "done"}
        stop = "tool_use" if block else "end_turn"
        message = {
            "id": "msg_scripted",
            "type": "message",
            "role": "assistant",
            "model": request.get("model", "scripted"),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }
        if not request.get("stream"):
            whole = {**message, "content": [content], "stop_reason": stop}
            self._send(200, "application/json", json.dumps(whole).encode())
            return
        if block:
            start = {**block, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        else:
            start = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": "done"}
        events = [
            ("message_start", {"message": message}),
            ("content_block_start", {"index": 0, "content_block": start}),
            ("content_block_delta", {"index": 0, "delta": delta}),
            ("content_block_stop", {"index": 0}),
            (
                "message_delta",
                {
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": 1},
                },
            ),
            ("message_stop", {}),
        ]
        stream = b"".join(
            f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()
            for name, data in events
        )
        self._send(200, "text/event-stream", stream)

    def _send(self, status: int, kind: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def run_claude(
    claude: Path,
    model: ScriptedModel,
    script: Sequence[Call],
    *,
    home: Path,
    project: Path,
    proxy_url: str,
    ca_cert: Path,
    namespace: MountNamespace | None = None,
    path: str | None = None,
) -> Session:
    """One non-interactive session with permissions skipped (root may: IS_SANDBOX=1)."""
    session = model.start(script)
    env = {
        "PATH": path or os.environ["PATH"],
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "IS_SANDBOX": "1",
        "ANTHROPIC_API_KEY": "sk-ant-api03-fence-test",
        "ANTHROPIC_BASE_URL": model.url,
        # Claude Code's own traffic goes through claude-proxy, as `claude-proxy env` sets it up;
        # only the stand-in model, on this machine's loopback, is reached directly.
        "HTTPS_PROXY": proxy_url,
        "NO_PROXY": "127.0.0.1",
        "NODE_EXTRA_CA_CERTS": str(ca_cert),
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    argv = [str(claude), "-p", "go", "--dangerously-skip-permissions"]
    result = subprocess.run(
        namespace.command(argv, project) if namespace else argv,
        env=env,
        cwd=project,
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    session.returncode = result.returncode
    session.output = result.stdout + result.stderr
    return session
