"""SQLite, the system of record: events, the inbox (idempotency), the outbox, runs, the DLQ, the model
registry, the curator's datasets.

One file (`academy.db`), WAL, `synchronous=FULL`; migrations (academyd.store.migrations) are named SQL
scripts applied once, in order. Nested transactions are savepoints (academyd.store.connection). Each table
group is a module of its own (inbox, dlq, outbox, runs, models, datasets, watch, production); `Store` is all of them
on one connection, and no module outside this package touches the connection or writes SQL.

The store is synchronous on purpose: SQLite calls are short, and a batch of inbound events is written in
one transaction, so the daemon commits once per fetched batch, not once per event.
"""

from __future__ import annotations

from academyd.clock import iso, parse_iso, utcnow
from academyd.store.connection import probe_write
from academyd.store.datasets import Datasets
from academyd.store.dlq import DeadLetters
from academyd.store.faults import StoreError, StoreFault, store_fault
from academyd.store.migrations import MIGRATIONS
from academyd.store.models import Models
from academyd.store.production import Production
from academyd.store.runs import ACTIVE_RUN_STATES, RUN_STATES, ActiveRunExists, Runs, Snapshot
from academyd.store.watch import ChampionWatch


class Store(Runs, DeadLetters, Models, Datasets, ChampionWatch, Production):
    """The SQLite store: every table group on one connection (runs brings the inbox and the outbox).
    Not thread-safe: one Store per thread (open another for worker threads)."""


__all__ = [
    "ACTIVE_RUN_STATES",
    "MIGRATIONS",
    "RUN_STATES",
    "ActiveRunExists",
    "Snapshot",
    "Store",
    "StoreError",
    "StoreFault",
    "iso",
    "parse_iso",
    "probe_write",
    "store_fault",
    "utcnow",
]
