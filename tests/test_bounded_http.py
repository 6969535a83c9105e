"""The bounded servers' parts, in-process: HTTP/2 frame boundaries and HTTP/1 head extraction."""

from __future__ import annotations

import pytest

from claude_proxy.mitm.bounded_http import (
    CONTINUATION,
    END_HEADERS,
    HEADERS,
    BoundedReceiveBuffer,
    Bounds,
    FrameGuard,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, SETTINGS = 0x0, 0x4
MAX_FRAME = 2**17


def frame(kind: int, length: int, flags: int = 0) -> bytes:
    return length.to_bytes(3, "big") + bytes([kind, flags]) + (1).to_bytes(4, "big") + bytes(length)


@pytest.mark.parametrize(
    ("data", "refused"),
    [
        (PREFACE + frame(SETTINGS, 0), None),
        (PREFACE + frame(HEADERS, 100, END_HEADERS), None),
        (PREFACE + frame(DATA, MAX_FRAME) * 3, None),  # bodies are not heads
        (PREFACE + frame(HEADERS, 40000) + frame(CONTINUATION, 20000, END_HEADERS) * 2, None),
        # refused at the frame header, before its payload arrives
        (PREFACE + frame(DATA, MAX_FRAME + 1)[:9], "HTTP/2 frame larger than 128 KiB"),
        (PREFACE + frame(HEADERS, 70000, END_HEADERS), "header block larger than 64 KiB"),
        (
            PREFACE + frame(HEADERS, 40000) + frame(CONTINUATION, 30000),
            "header block larger than 64 KiB",
        ),
    ],
)
@pytest.mark.parametrize("piece", [7, 65536], ids=["small-pieces", "large-pieces"])
def test_frame_guard(data: bytes, refused: str | None, piece: int) -> None:
    guard = FrameGuard(MAX_FRAME, 64 * 1024)
    reasons = {guard.feed(data[i : i + piece]) for i in range(0, len(data), piece)} - {None}
    if refused is None:
        assert reasons == set()
    else:
        assert len(reasons) == 1 and refused in reasons.pop()


def test_frame_guard_knows_when_a_head_is_pending() -> None:
    guard = FrameGuard(MAX_FRAME, 64 * 1024)
    assert guard.feed(PREFACE + frame(SETTINGS, 6)) is None
    assert not guard.head_pending
    guard.feed(frame(HEADERS, 10)[:12])  # a header block begins, its frame incomplete
    assert guard.head_pending
    guard.feed(bytes(7) + frame(CONTINUATION, 5, END_HEADERS))
    assert not guard.head_pending
    guard.feed(frame(DATA, 100)[:20])  # a body on its way is not a head
    assert not guard.head_pending


def head(fields: int, value_size: int = 1) -> bytes:
    lines = [b"GET / HTTP/1.1"] + [b"X-%d: %s" % (i, b"v" * value_size) for i in range(fields)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "refusal"),
    [
        (head(256), None),
        (head(257), (431, "more than 256 header fields")),
        (head(1, 60_000), None),
        (head(1, 70_000), (431, "request head larger than 64 KiB")),
    ],
)
def test_receive_buffer_hands_out_bounded_heads_only(
    data: bytes, refusal: tuple[int, str] | None
) -> None:
    buf = BoundedReceiveBuffer(Bounds())
    buf += data
    lines = buf.maybe_extract_lines()
    assert buf.refusal == refusal
    assert (lines is None) == (refusal is not None)
