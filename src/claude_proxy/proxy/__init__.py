"""The running proxy, in the order a request meets it: the service that assembles mitmproxy's
master, admission (listeners, the accept gate, the client cap and limits), tunnels (CONNECT, SOCKS,
pass-through), the TLS guard, the request's checks (well-formedness, the enforcer, the organization
guard and its probe, the server-fetch guard), the way upstream (timeouts, held bodies, deadlines,
failures) and the watcher that reloads the config. These modules use mitmproxy; only the running
proxy imports them.
"""
