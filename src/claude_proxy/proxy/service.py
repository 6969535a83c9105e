"""The headless service: a mitmproxy master with only the addons the sandbox needs.

Left out on purpose: NextLayer (the Enforcer decides every layer), the onboarding app (mitm.it),
the web UI, the console, flow storage, replay and every addon that rewrites traffic.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mitmproxy import ctx, exceptions, master, options
from mitmproxy.addons import core, disable_h2c, errorcheck, proxyserver, script

from claude_proxy.defaults import DEFAULT_PORT
from claude_proxy.defaults import DEFAULT_SOCKS_PORT as DEFAULT_SOCKS_PORT
from claude_proxy.errors import ExitCode, ProxyError
from claude_proxy.mitm import closing, crash_guard, framing, hook_cache, socks5, wakeups
from claude_proxy.mitm.connections import SOCKS5, Connections
from claude_proxy.mitm.tls_config import GuardedTlsConfig
from claude_proxy.policy import addresses
from claude_proxy.policy.config_file import Config
from claude_proxy.policy.rules import Policy
from claude_proxy.proxy import listeners
from claude_proxy.proxy.admission import Limits
from claude_proxy.proxy.config_watcher import ConfigWatcher
from claude_proxy.proxy.enforcer import Enforcer
from claude_proxy.proxy.fetch_guard import FetchGuard
from claude_proxy.proxy.held_bodies import Held
from claude_proxy.proxy.org_guard import OrgGuard
from claude_proxy.proxy.socks import SocksPolicy
from claude_proxy.proxy.upstream_timeouts import Timeouts
from claude_proxy.record.decisions import AuditLog, Recorder
from claude_proxy.state import paths

logger = logging.getLogger(__name__)

DRAIN_SECONDS = 10.0  # launchd waits 20 s after SIGTERM before it sends SIGKILL
CLOSE_SECONDS = 2.0  # then, for the connections still open to close
# --set NAME=… refused outright: each has its own flag, or would bypass a check.
RESERVED_OPTIONS = {
    "confdir": "the CA lives in the config folder (set XDG_CONFIG_HOME to move it) and is "
    "checked there before the proxy starts",
    "sandbox_allow": "use --allow RULE, or config.toml",
    "sandbox_remote_clients": "use --expose-to-network",
    "listen_host": "use --host",
    "listen_port": "use --port",
}
# --set NAME=… accepted, with a warning at every start: each can undo what the proxy guarantees.
RISKY_OPTIONS = {
    "scripts": "a script runs inside the proxy and can undo every check",
    "ssl_verify_upstream_trusted_ca": "upstream certificates are verified against this file "
    "instead of the system's roots",
    "ssl_verify_upstream_trusted_confdir": "upstream certificates are verified against this "
    "folder instead of the system's roots",
}


@dataclass(frozen=True)
class Settings:
    confdir: Path
    policy: Policy
    config: Config  # the file the policy comes from, watched for changes
    flags: Sequence[str] = ()  # the --allow rules, added to every version of the file's policy
    hosts: Sequence[str] = ()  # empty: every loopback address this machine has
    port: int = DEFAULT_PORT
    socks_port: int | None = DEFAULT_SOCKS_PORT  # None: no SOCKS5 listener
    expose_to_network: bool = False
    mitmproxy_options: Sequence[str] = field(default_factory=tuple)  # NAME=VALUE, as --set takes
    drain_seconds: float = DRAIN_SECONDS


class StartupCheck(errorcheck.ErrorCheck):
    """Turns errors logged while starting (port in use, a broken script) into one ProxyError.

    Until the proxy listens, error records stay off the console: the ProxyError says it in one
    line (the log file still gets the full record).
    """

    name = "errorcheck"  # Master.run looks the check up by this name

    def __init__(self, settings: Settings, connections: Connections) -> None:
        super().__init__()
        self.settings = settings
        self.connections = connections
        self.consoles = [
            h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler
        ]
        for handler in self.consoles:
            handler.addFilter(self.quiet_errors)

    @staticmethod
    def quiet_errors(record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR

    def finish(self) -> None:
        super().finish()
        for handler in self.consoles:
            handler.removeFilter(self.quiet_errors)

    async def shutdown_if_errored(self) -> None:
        await asyncio.sleep(0)  # let pending log records arrive
        if records := self.logger.has_errored:
            raise startup_error(self.settings, records[0].getMessage())

    def running(self) -> None:
        if ctx.options.deferred:
            logger.error("unknown mitmproxy option(s): %s", ", ".join(ctx.options.deferred))
            return
        http_at: list[str] = []
        socks_at: list[str] = []
        for mode, (host, port) in self.connections.listen_addresses():
            (socks_at if mode == SOCKS5 else http_at).append(listeners.format_address(host, port))
        message = "claude-proxy listening on " + ", ".join(http_at)
        if socks_at:
            message += "; SOCKS5 on " + ", ".join(socks_at)
        logger.info("%s", message)


class HideNextLayerWarning(logging.Filter):
    """The Enforcer decides every layer, so mitmproxy's NextLayer addon is missing on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "without nextlayer addon" not in record.getMessage()


def startup_error(settings: Settings, message: str) -> ProxyError:
    if found := re.search(r"listen on (\S+):(\d+)", message):
        host, port = found[1], int(found[2])
        where = listeners.format_address(host, port)
    else:
        where, port = f"port {settings.port}", settings.port
    flag = "--socks-port" if port == settings.socks_port and port != settings.port else "--port"
    lowered = message.lower()
    if "address already in use" in lowered:
        return ProxyError(
            f"cannot listen on {where}: the port is in use (is claude-proxy already running? "
            f"`claude-proxy status` tells); stop it or choose another {flag}",
            ExitCode.ADDRESS,
        )
    if "bind" in lowered or "address" in lowered or "permission denied" in lowered:
        return ProxyError(f"cannot listen on {where}: {message}", ExitCode.ADDRESS)
    return ProxyError(f"cannot start: {message}", ExitCode.USAGE)


def check_option_names(assignments: Sequence[str]) -> None:
    """Refuse the reserved `--set` names; warn about the risky ones."""
    for assignment in assignments:
        name = assignment.split("=", 1)[0].strip()
        if why := RESERVED_OPTIONS.get(name):
            raise ProxyError(f"--set {name} is not supported: {why}", ExitCode.USAGE)
        if why := RISKY_OPTIONS.get(name):
            logger.warning("--set %s: %s", name, why)


def build_master(
    settings: Settings,
) -> tuple[master.Master, Enforcer, ConfigWatcher, Connections]:
    """Assemble the master; must run inside an event loop (mitmproxy requires one)."""
    check_option_names(settings.mitmproxy_options)
    framing.install()
    closing.install()
    crash_guard.install()
    wakeups.install()
    try:
        modes = listeners.mode_specs(
            settings.hosts or listeners.loopback_hosts(), settings.port, settings.socks_port
        )
    except OSError as e:
        raise ProxyError(f"cannot listen: {e.strerror}", ExitCode.ADDRESS) from e
    logging.getLogger("mitmproxy.addons.proxyserver").addFilter(HideNextLayerWarning())
    # What the addons share, made here and handed to each one that needs it: no addon looks
    # another up, and nothing of a running proxy lives in a module.
    server = proxyserver.Proxyserver()
    connections = Connections(server)
    recorder = Recorder()
    held = Held()
    limits = Limits(held, recorder, connections)
    enforcer = Enforcer(recorder, limits, connections)
    enforcer.use_policy(settings.policy)
    socks5.install(SocksPolicy(enforcer.open_tunnel, limits.over_cap.__contains__, recorder))
    watcher = ConfigWatcher(
        settings.config.path, settings.flags, enforcer, settings.config, connections
    )
    m = master.Master(options.Options(), with_termlog=False)
    hook_cache.install(m)
    try:
        # Proxyserver registers connection_strategy with the default "eager", which the Enforcer
        # refuses; set "lazy" before the Enforcer arrives.
        m.addons.add(core.Core(), server)
        # The Enforcer refuses these defaults: eager connects before a check, rawtcp relays the
        # bytes after any 101 unchecked, and upstream_cert connects upstream during the client's
        # handshake. The leaf certificate comes from the SNI (already checked against the CONNECT
        # host) instead, so that connection opens only once a request has passed every check.
        m.options.update(connection_strategy="lazy", rawtcp=False, upstream_cert=False)
        # The Enforcer comes before every addon that could answer a request or open a connection,
        # and before user scripts, so its checks always see a flow first.
        m.addons.add(
            enforcer,
            OrgGuard(enforcer, paths.state_dir()),  # acts only on requests the Enforcer allowed
            FetchGuard(enforcer),  # after the pin: a Messages body is read only for the right org
            Timeouts(held),
            limits,  # after the Enforcer: it bounds the layers the Enforcer is still waiting for
            GuardedTlsConfig(),
            disable_h2c.DisableH2C(),
            script.ScriptLoader(),
            AuditLog(
                recorder
            ),  # before StartupCheck: recording starts before "listening on" is said
            StartupCheck(settings, connections),
            watcher,
        )
        m.options.update(
            confdir=str(settings.confdir),
            mode=modes,
            sandbox_remote_clients=settings.expose_to_network,
        )
        m.options.set(*settings.mitmproxy_options, defer=True)
    except exceptions.OptionsError as e:
        raise ProxyError(str(e), ExitCode.USAGE) from e
    return m, enforcer, watcher, connections


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain requests in flight (bounded) and return.

    SIGHUP reads config.toml again at once.
    """
    m, enforcer, watcher, connections = build_master(settings)
    loop = asyncio.get_running_loop()
    addresses.install_checked_resolver(loop)
    draining: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        if draining:  # a second signal: stop now
            m.shutdown()
            return
        logger.warning("%s: draining, then stopping", signal.Signals(signum).name)
        draining.append(loop.create_task(drain(m, enforcer, connections, settings.drain_seconds)))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, watcher.reload_now)
    try:
        await m.run()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    logger.info("claude-proxy stopped")


async def drain(
    m: master.Master, enforcer: Enforcer, connections: Connections, seconds: float
) -> None:
    """Stop listening, let responses in flight finish (at most `seconds`), then shut down.

    Streams still open then are closed here, each connection's handler left to end as it
    does when its client goes (hooks, upstream connections): a shutdown that cut them would
    leave their tasks pending for the event loop to destroy.
    """
    m.options.update(server=False)
    deadline = asyncio.get_running_loop().time() + seconds
    while enforcer.in_flight > 0 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    if enforcer.in_flight:
        logger.warning(
            "stopping: closing %d stream(s) still open after the %g s drain",
            enforcer.in_flight,
            seconds,
        )
    await close_connections(connections, CLOSE_SECONDS)
    m.shutdown()


async def close_connections(connections: Connections, seconds: float) -> None:
    """Close every client connection and wait (at most `seconds`) for their handlers to end."""
    connections.close_all("stopping")
    deadline = asyncio.get_running_loop().time() + seconds
    while connections.count() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
