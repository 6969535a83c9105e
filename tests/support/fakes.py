"""Stand-ins for what `service.build_master` hands the addons, for tests that make them fail."""

from __future__ import annotations

from mitmproxy import connection

from claude_proxy.record.decisions import Recorder


class FailingRecorder(Recorder):
    """A recorder whose every decision line fails, as a log that cannot be written would."""

    def line(self, *args: object, **kwargs: object) -> None:
        raise OSError("the log cannot be written")


class OpenConnections:
    """mitmproxy's connections as the addons reach them: `clients` are open; `closed` lists the
    ids of those closed since."""

    def __init__(self, clients: list[connection.Client] | None = None) -> None:
        self.clients = clients or []
        self.closed: list[str] = []

    def client(self, client_id: str) -> connection.Client | None:
        return next((c for c in self.clients if c.id == client_id), None)

    def close(self, client_id: str, why: str) -> bool:
        self.closed.append(client_id)
        return True
