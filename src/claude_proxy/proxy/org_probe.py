"""The probe: the proxy's own HTTPS request asking Anthropic which organization a credential is of.

It carries the credential and nothing else of the request it was taken from. An API key asks
`GET /v1/models` (every API answer names the organization in a header); Claude Code's OAuth token
asks `GET /api/oauth/profile` (such tokens are refused elsewhere), whose JSON names it. A tiny
HTTP/1.1 client over `asyncio.open_connection`, verified TLS, bounded in time and size.
"""

from __future__ import annotations

import asyncio
import json
import ssl

from claude_proxy.state.accounts import Credential, organization

MODELS_PATH = "/v1/models?limit=1"
PROFILE_PATH = "/api/oauth/profile"
API_VERSION = "2023-06-01"
OAUTH_BETA = "oauth-2025-04-20"
ORG_HEADER = "anthropic-organization-id"
USER_AGENT = "claude-proxy-organization-check"
MAX_HEAD = 64 * 1024
MAX_BODY = 256 * 1024


class ProbeError(Exception):
    """No organization could be read; the message says why, without the credential."""


def request(host: str, port: int, credential: Credential) -> bytes:
    """The probe's request bytes: the credential as it was sent, and the headers the API needs."""
    value = credential.value
    if any((c < " " and c != "\t") or c == "\x7f" for c in value):
        raise ProbeError("the credential is not a valid header value")
    authority = host if port == 443 else f"{host}:{port}"
    if credential.oauth:
        path, extra = PROFILE_PATH, [("anthropic-beta", OAUTH_BETA)]
    else:
        path, extra = MODELS_PATH, [("anthropic-version", API_VERSION)]
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {authority}",
        f"{credential.header}: {value}",
        *(f"{name}: {v}" for name, v in extra),
        "Accept: application/json",
        f"User-Agent: {USER_AGENT}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


def tls_context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    """Verified TLS 1.2+; the roots are mitmproxy's for its upstream connections."""
    if cafile is None and capath is None:
        import certifi  # mitmproxy's default roots for upstream connections

        cafile = certifi.where()
    context = ssl.create_default_context(cafile=cafile, capath=capath)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


async def organization_of(
    host: str, port: int, credential: Credential, *, context: ssl.SSLContext, timeout: float
) -> str:
    """The organization Anthropic names for `credential`; ProbeError if none."""
    data = request(host, port, credential)
    try:
        async with asyncio.timeout(timeout):
            # Looked up at call time: the test suite routes asyncio.open_connection to its upstream.
            reader, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=host, limit=MAX_HEAD
            )
            try:
                writer.write(data)
                await writer.drain()
                status, headers = await read_head(reader)
                body = await read_body(reader, headers) if credential.oauth else b""
            finally:
                writer.close()
    except TimeoutError:
        raise ProbeError(f"no answer from {host} within {timeout:g} s") from None
    except ssl.SSLCertVerificationError:
        raise ProbeError(f"the certificate of {host} could not be verified") from None
    except (OSError, EOFError, ValueError, asyncio.LimitOverrunError) as e:
        raise ProbeError(f"{host} could not be asked ({type(e).__name__})") from None
    named = organization_in(status, body) if credential.oauth else None
    named = named or organization(headers.get(ORG_HEADER))
    if named is None:
        raise ProbeError(f"the answer of {host} (status {status}) names no organization")
    return named


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")  # at most MAX_HEAD bytes (the reader's limit)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError("not an HTTP/1 response")
    headers = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            if len(chunks) + size > MAX_BODY:
                raise ValueError("answer too large")
            chunks += (await reader.readexactly(size + 2))[:-2]
        return bytes(chunks)
    if (length := headers.get("content-length")) is not None:
        if not length.isdigit() or int(length) > MAX_BODY:
            raise ValueError("answer too large")
        return await reader.readexactly(int(length))
    body = await reader.read(MAX_BODY + 1)  # until the server closes, as Connection: close asks
    while len(body) <= MAX_BODY and (more := await reader.read(MAX_BODY + 1 - len(body))):
        body += more
    if len(body) > MAX_BODY:
        raise ValueError("answer too large")
    return body


def organization_in(status: int, body: bytes) -> str | None:
    """The organization an OAuth profile answer names in its JSON (`organization.uuid`)."""
    if status != 200:
        return None
    try:
        document = json.loads(body)
    except ValueError:
        return None
    org = document.get("organization") if isinstance(document, dict) else None
    return organization(org.get("uuid")) if isinstance(org, dict) else None
