"""The Academy page: progress toward training, the live loss chart, datasets, the model genealogy, the DLQ,
and /metrics, served by the daemon (see `server` for the endpoints and auth rules)."""

from academyd.dashboard.server import WebServer

__all__ = ["WebServer"]
