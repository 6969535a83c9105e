"""The organization guard: data reaches Anthropic only with the pinned organization's credentials.

It learns from every Anthropic answer which organization each credential (by fingerprint) is of.
While a pin is set, a request to an Anthropic host is refused before its body moves when one of its
credentials is of another organization, cannot be verified, or is a Cookie. A credential never
seen is verified by one probe (shared by the requests that wait for it) before the request goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import sys
import time
from pathlib import Path

from mitmproxy import connection, ctx, exceptions, http

from claude_proxy.errors import ExitCode, ProxyError
from claude_proxy.policy.rules import Decision
from claude_proxy.proxy import org_probe, wellformed
from claude_proxy.proxy.enforcer import CLOSED, DECISION, Enforcer, OpenFlows, body_follows
from claude_proxy.record.decisions import FINGERPRINTS
from claude_proxy.state import accounts
from claude_proxy.state.accounts import Credential, Pin, StateError, short

logger = logging.getLogger(__name__)

RELOAD_SECONDS = 1.0  # how often the pin file is looked at (one stat), rather than per request
SAVE_SECONDS = 60.0  # counts and last-seen times reach the disk at most this often
FAILURE_SECONDS = 10.0  # an unverifiable credential is refused this long without a new probe
MAX_FAILURES = 1024
MAX_PROBES = 8  # probes in flight at once; more wait their turn
MAX_WAITING = 64  # requests waiting for a probe (or its slot) at once; more are refused
BUSY = "too many credentials being verified at once; retry"
PROBE_PORT = 443
ERROR_LOG_SECONDS = 60.0
COOKIE_REASON = "a Cookie to an Anthropic host cannot be tied to an organization"
# While a probe runs, mitmproxy keeps reading the request's body into memory: only a body of known,
# bounded size is held. A larger one (or one of unknown length) with a new credential is refused.
MAX_HELD_BODY = 8 * 1024 * 1024
TOO_LARGE_TO_HOLD = (
    "the organization of credential {fp} is not known yet, and a request body over 8 MiB (or of "
    "unknown length) is not held while it is verified; send a small request with it first"
)
HOW_TO_PIN = (
    "`claude-proxy orgs` lists the organizations seen; `claude-proxy pin ORG_UUID` pins another "
    "one and `claude-proxy pin --off` lifts the pin."
)
ProbeResult = tuple[str | None, str]  # (organization, why none)


class OrgGuard:
    def __init__(self, enforcer: Enforcer, state: Path) -> None:
        self.enforcer = enforcer
        self.state = state
        try:
            self.key = accounts.load_key(state)
        except StateError as e:
            raise ProxyError(f"cannot start: {e}", ExitCode.STATE) from None
        try:
            self.ledger = accounts.load_ledger(state)
        except StateError as e:
            logger.warning("%s; the organizations seen are learned again", e)
            self.ledger = accounts.Ledger()
        self.pin: Pin | None = None
        self.pin_problem: str | None = None  # the pin file is unreadable: refuse every credential
        self.pin_signature: tuple[int, int, int] | None = None
        self.reload_pin()
        self.dirty = self.urgent = False  # ledger changes not saved; a new fingerprint among them
        self.saved_at = time.monotonic()
        # Keyed by (fingerprint, host): a probe that fails on one host says nothing of another.
        self.probes: dict[tuple[str, str], asyncio.Future[ProbeResult]] = {}
        self.failures: dict[tuple[str, str], tuple[str, float]] = {}  # → (why, until)
        self.probe_slots = asyncio.Semaphore(MAX_PROBES)
        self.waiting = 0  # requests in `verify`
        self.tasks: set[asyncio.Task[None]] = set()
        self.watcher: asyncio.Task[None] | None = None
        self.tls: tuple[tuple[str | None, str | None], ssl.SSLContext] | None = None
        self.errors_logged_at = -ERROR_LOG_SECONDS
        self.errors_suppressed = 0
        # Allowed flows with a credential (or a cookie) still open: a new pin is held against
        # them too. flow id → (flow, host, port)
        self.carrying = OpenFlows()

    def load(self, loader: object) -> None:
        loader.add_option(  # type: ignore[attr-defined]
            "sandbox_probe_timeout",
            int,
            10,
            "Seconds to wait for Anthropic's answer when a pin is set and a credential never seen "
            "before must be verified; without an answer the request is refused.",
        )

    def configure(self, updated: set[str]) -> None:
        if "sandbox_probe_timeout" in updated and ctx.options.sandbox_probe_timeout < 1:
            raise exceptions.OptionsError("sandbox_probe_timeout must be at least 1 second")

    def running(self) -> None:
        if self.pin is not None or self.pin_problem is not None:
            logger.info("organization pin: %s", self.describe_pin())
        self.watcher = asyncio.get_running_loop().create_task(self.watch())

    def done(self) -> None:
        if self.watcher:
            self.watcher.cancel()
        self.save_ledger(force=True)

    # Requests

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        allowed = flow.metadata.get(DECISION)
        if allowed is None or flow.response is not None or flow.error is not None:
            return  # refused already, or nothing the Enforcer let through
        _, host, port = allowed
        try:
            reason = await self.check(flow, host)
            if reason is None and (again := self.enforcer.recheck(flow, host, port)) is not None:
                reason = None if again.allowed else f"{again.reason} (the policy changed)"
        except Exception:
            self.internal_error("checking the organization of a request")
            reason = "internal error in the organization check"
        if flow.error is None and DECISION not in flow.metadata:
            # A new policy closed its connection while it waited (and said so): nothing to add.
            if flow.killable:
                flow.kill()
            return
        if reason is None and flow.error is None:
            if FINGERPRINTS in flow.metadata or accounts.carries_cookie(
                flow.request.headers.items(multi=True)
            ):
                self.carrying.add(flow, host, port)
            return
        if flow.error is not None:  # the client left meanwhile
            return
        try:
            self.refuse(flow, host, port, reason)
        except Exception:
            self.internal_error("refusing a request")
            if flow.killable:
                flow.kill()

    async def check(self, flow: http.HTTPFlow, host: str) -> str | None:
        """Why the request must not go on, or None."""
        if not accounts.is_anthropic_host(host):
            return None
        fields = list(flow.request.headers.items(multi=True))
        found = accounts.credentials(fields)
        fingerprints = [accounts.fingerprint(self.key, c) for c in found]
        if fingerprints:
            flow.metadata[FINGERPRINTS] = fingerprints
        pinned = self.pin.organization if self.pin else None
        if pinned is None and self.pin_problem is None:
            return None
        cookie = accounts.carries_cookie(fields)
        if not found and not cookie:
            return None
        if self.pin_problem is not None:
            return self.pin_problem
        if cookie:
            return COOKIE_REASON
        for credential, fp in zip(found, fingerprints, strict=True):
            org = self.ledger.organization_of(fp)
            if org is None:
                if not holdable(flow):
                    return TOO_LARGE_TO_HOLD.format(fp=short(fp))
                org, why = await self.verify(credential, fp, host)
                if org is None and why == BUSY:
                    return BUSY
                if org is None:
                    return (
                        f"the organization of credential {short(fp)} could not be verified "
                        f"({why}); it is refused until Anthropic names it, retry in a few seconds"
                    )
            if org != pinned:
                return f"credential {short(fp)} is of organization {org}, not the pinned {pinned}"
        return None

    def refuse(self, flow: http.HTTPFlow, host: str, port: int, reason: str) -> None:
        advice = f"Only credentials of the pinned organization reach Anthropic. {HOW_TO_PIN}"
        self.enforcer.refuse_request(flow, host, port, Decision(False, reason), advice=advice)

    # Open connections under a new pin

    def response(self, flow: http.HTTPFlow) -> None:
        self.carrying.response(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        self.carrying.request(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.carrying.ended(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.carrying.ended(flow)

    def client_disconnected(self, client: connection.Client) -> None:
        self.carrying.client_gone(client.id)

    def close_refused(self) -> None:
        """Close every client connection whose open request or WebSocket the pin now refuses."""
        for flow_id, (flow, host, port) in list(self.carrying.items()):
            if flow.metadata.get(CLOSED):  # closed already (a new policy): its connection is going
                del self.carrying[flow_id]
                continue
            if (reason := self.refused_now(flow)) is None:
                continue
            del self.carrying[flow_id]
            why = f"closed: the pin now refuses it: {reason}"
            try:
                self.enforcer.close_flow(flow, host, port, Decision(False, why), why)
            except Exception:
                self.internal_error("recording a connection the pin now refuses")

    def refused_now(self, flow: http.HTTPFlow) -> str | None:
        """Why the pin in force refuses a request it let through before, from what is known."""
        pinned = self.pin.organization if self.pin else None
        if pinned is None and self.pin_problem is None:
            return None
        if self.pin_problem is not None:
            return self.pin_problem
        if accounts.carries_cookie(flow.request.headers.items(multi=True)):
            return COOKIE_REASON
        for fp in flow.metadata.get(FINGERPRINTS, ()):
            org = self.ledger.organization_of(fp)
            if org != pinned:
                org = org or "not verified"
                return f"credential {short(fp)} is of organization {org}, not the pinned {pinned}"
        return None

    # Learning

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None or DECISION not in flow.metadata:
            return  # our own refusal, or a flow the Enforcer ended
        fingerprints = set(flow.metadata.get(FINGERPRINTS, ()))
        if len(fingerprints) != 1:
            return  # no credential, or several: the answer cannot say whose organization it is
        try:
            org = accounts.organization(flow.response.headers.get(org_probe.ORG_HEADER))
            if org is not None:
                self.learn(fingerprints.pop(), org)
        except Exception:
            self.internal_error("recording an organization")

    def learn(self, fingerprint: str, org: str) -> None:
        if self.ledger.record(fingerprint, org, accounts.timestamp()):
            self.urgent = True
            logger.info("credential %s is of organization %s", short(fingerprint), org)
        self.dirty = True
        if self.pin is not None and self.pin.organization is None:
            try:
                self.pin = accounts.settle_first_seen(self.state, org)
            except StateError as e:
                logger.error("cannot pin the first organization seen: %s", e)
                return
            self.pin_signature = pin_signature(self.state)
            logger.info("organization pin: %s", self.describe_pin())
            self.close_refused()  # what is open with another organization's credential

    # Probes

    async def verify(self, credential: Credential, fp: str, host: str) -> ProbeResult:
        """The credential's organization, from one probe shared by every request waiting for it."""
        failed = self.failures.get((fp, host))
        if failed is not None and failed[1] > time.monotonic():
            return None, failed[0]
        if self.waiting >= MAX_WAITING:  # each waiting request may hold a body in memory
            return None, BUSY
        self.waiting += 1
        try:
            return await self.await_probe(credential, fp, host)
        finally:
            self.waiting -= 1

    async def await_probe(self, credential: Credential, fp: str, host: str) -> ProbeResult:
        future = self.probes.get((fp, host))
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self.probes[fp, host] = future
            task = asyncio.get_running_loop().create_task(
                self.run_probe(future, credential, fp, host)
            )
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return await asyncio.shield(future)

    async def run_probe(
        self, future: asyncio.Future[ProbeResult], credential: Credential, fp: str, host: str
    ) -> None:
        result: ProbeResult = (None, "internal error")
        timeout = ctx.options.sandbox_probe_timeout
        try:
            began = time.monotonic()
            probed = False  # a slot was free in time: the answer (or its absence) is Anthropic's
            try:
                # The wait for a slot counts too: a request waits at most the probe timeout in all.
                async with asyncio.timeout(timeout):
                    async with self.probe_slots:
                        probed = True
                        try:
                            org = await org_probe.organization_of(
                                host,
                                PROBE_PORT,
                                credential,
                                context=self.tls_context(),
                                timeout=timeout,
                            )
                            result = (org, "")
                        except org_probe.ProbeError as e:
                            result = (None, str(e))
            except TimeoutError:
                result = (None, f"no answer within {timeout} s")
            except Exception:
                self.internal_error("probing a credential")
            try:
                elapsed_ms = (time.monotonic() - began) * 1000
                named, why = result
                logger.info(
                    "probe %s for credential %s: %s %.0fms",
                    host,
                    short(fp),
                    f"organization {named}" if named else f'none, "{why}"',
                    elapsed_ms,
                )
                if named is not None:
                    self.learn(fp, named)
                elif probed:
                    self.remember_failure((fp, host), why)
            except Exception:
                self.internal_error("probing a credential")
        finally:
            self.probes.pop((fp, host), None)
            if not future.done():
                future.set_result(result)

    def remember_failure(self, key: tuple[str, str], why: str) -> None:
        self.failures[key] = (why, time.monotonic() + FAILURE_SECONDS)
        while len(self.failures) > MAX_FAILURES:
            del self.failures[next(iter(self.failures))]

    def tls_context(self) -> ssl.SSLContext:
        """Trust as for the proxy's own upstream connections (mitmproxy's options)."""
        roots = (
            getattr(ctx.options, "ssl_verify_upstream_trusted_ca", None),
            getattr(ctx.options, "ssl_verify_upstream_trusted_confdir", None),
        )
        if self.tls is None or self.tls[0] != roots:
            self.tls = (roots, org_probe.tls_context(*roots))
        return self.tls[1]

    # State

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_SECONDS)
            try:
                if self.reload_pin():
                    logger.info("organization pin: %s", self.describe_pin())
                    self.close_refused()
                self.save_ledger()
            except Exception:
                self.internal_error("reloading the pin")

    def reload_pin(self) -> bool:
        """Read the pin file again if it changed on disk; whether the pin changed."""
        signature = pin_signature(self.state)
        if signature == self.pin_signature:
            return False
        self.pin_signature = signature
        try:
            pin, problem = accounts.load_pin(self.state), None
        except StateError as e:
            pin, problem = None, f"the organization pin is unreadable ({e})"
        changed = (pin, problem) != (self.pin, self.pin_problem)
        self.pin, self.pin_problem = pin, problem
        return changed

    def describe_pin(self) -> str:
        if self.pin_problem is not None:
            return f"unreadable, every credential is refused: {self.pin_problem}"
        return self.pin.describe() if self.pin else "off"

    def save_ledger(self, *, force: bool = False) -> None:
        due = self.urgent or time.monotonic() - self.saved_at >= SAVE_SECONDS
        if not self.dirty or not (force or due):
            return
        try:
            with contextlib.suppress(StateError):  # damaged on disk: ours replaces it
                self.ledger.merge(accounts.load_ledger(self.state))
            accounts.save_ledger(self.state, self.ledger)
        except StateError as e:
            logger.warning("%s; trying again later", e)
        else:
            self.dirty = self.urgent = False
        self.saved_at = time.monotonic()

    def internal_error(self, what: str) -> None:
        """One line for an unexpected error, at most once a minute (a traceback the first time)."""
        now = time.monotonic()
        if now - self.errors_logged_at < ERROR_LOG_SECONDS:
            self.errors_suppressed += 1
            return
        first = self.errors_logged_at < 0
        error = sys.exception()
        logger.error(
            "%s failed: %s (%d similar error(s) since the last report)",
            what,
            type(error).__name__,
            self.errors_suppressed,
            exc_info=first,
        )
        self.errors_logged_at, self.errors_suppressed = now, 0


def pin_signature(state: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(state / accounts.PIN_FILE)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def holdable(flow: http.HTTPFlow) -> bool:
    """Whether the request's body is small enough, and of known size, to wait for a probe."""
    follows = body_follows(flow)
    if follows is None:  # no HTTP layer said so (in-process): judge by the head
        follows = wellformed.announces_body(flow.request)
    if not follows:
        return True
    headers = flow.request.headers
    length = headers.get("content-length", "").strip()
    return "transfer-encoding" not in headers and length.isdigit() and int(length) <= MAX_HELD_BODY
