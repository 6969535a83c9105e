"""HTTP/2 (or 3) requests forwarded to an HTTP/1.1 upstream keep their framing.

An HTTP/2 request may carry a body without content-length: its frames say where it ends. mitmproxy
converts it to HTTP/1.1 with neither Content-Length nor Transfer-Encoding, so the upstream reads
the body as the next request: one the proxy never checked. This client adds chunked framing when
the length is unknown. mitmproxy picks its HTTP/1 client by the module-level name, so `install`
replaces that name (mitmproxy is pinned below 13; tests prove the framing end to end).
"""

from __future__ import annotations

from mitmproxy.proxy import layer
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._events import HttpEvent, RequestHeaders, RequestTrailers


class FramedHttp1Client(_http1.Http1Client):
    def send(self, event: HttpEvent) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestTrailers):
            # mitmproxy's HTTP/1 client has no trailers (it fails with a traceback): drop them,
            # they are optional metadata and never change where a message ends.
            return
        if isinstance(event, RequestHeaders) and needs_chunking(event):
            # The parent reads the framing from this same request object for the body and its end.
            event.request.headers["transfer-encoding"] = "chunked"
        yield from super().send(event)


def needs_chunking(event: RequestHeaders) -> bool:
    request = event.request
    return (
        (request.is_http2 or request.is_http3)
        and not event.end_stream
        and "content-length" not in request.headers
        and "transfer-encoding" not in request.headers
    )


def install() -> None:
    http_layers.Http1Client = FramedHttp1Client  # type: ignore[misc]
