"""From raw inbound messages to stored events: decode, validate, handle, all in one transaction.

Pure of NATS: the bus hands over plain `Inbound` values and gets one outcome per message back, then
acks, naks or dead-letters them, after the commit.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from pydantic import ValidationError

from handlers import Ack, Handler, HandlerContext, Outcome, Reject, Retry, registry
from schemas.models import INBOUND, SCHEMA_VERSION, Event

log = structlog.get_logger("academyd.ingest")

EXCERPT_CHARS = 500


@dataclass(frozen=True)
class Inbound:
    subject: str
    data: bytes
    stream_seq: int | None
    num_delivered: int = 1
    msg_id: str | None = None


def decode(item: Inbound, max_payload: int) -> Event | Reject:
    """Parse and validate one message; a Reject says precisely what is wrong with it."""
    model = INBOUND.get(item.subject)
    if model is None:
        return Reject("unknown_subject", f"no handler for subject {item.subject!r}")
    if len(item.data) > max_payload:
        return Reject("too_large", f"payload is {len(item.data)} bytes; the limit is {max_payload}")
    try:
        return model.model_validate_json(item.data)  # the hot path: one pass, in pydantic-core
    except ValidationError as exc:
        return _explain(item.data, exc)


def _explain(data: bytes, exc: ValidationError) -> Reject:
    """The slow path: say which kind of poison this is."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return Reject("not_json", f"payload is not JSON: {err}; send one JSON object per event")
    if not isinstance(raw, dict):
        return Reject("not_object", f"payload must be a JSON object, got {type(raw).__name__}")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        return Reject(
            "unknown_schema_version",
            f"schema_version {version!r} is not supported; this daemon speaks {SCHEMA_VERSION}",
        )
    errors = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()[:5]
    )
    return Reject("schema_violation", errors)


def safe_excerpt(data: bytes) -> str:
    """The start of a rejected payload for the DLQ table and the page, with secrets redacted.

    The scan covers more than the excerpt so that a secret is not cut in half at the edge and missed.
    (The DLQ stream keeps the raw message for replay; it is the copy of what was already on the bus.)
    """
    from academyd.secrets import scanner

    text = data[: EXCERPT_CHARS * 8].decode("utf-8", "replace")
    cleaned, _, ok = scanner().clean(text)  # the process's one scanner: safe beside the curator's thread
    return cleaned[:EXCERPT_CHARS] if ok else "(withheld: the payload holds a secret that could not be redacted)"


def event_id_hint(item: Inbound) -> str | None:
    """The event id of a rejected message when one can be read, for logs and the DLQ table."""
    if item.msg_id:
        return item.msg_id
    try:
        raw = json.loads(item.data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    value = raw.get("event_id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and len(value) <= 200 else None


@dataclass
class BatchResult:
    outcomes: list[Outcome]
    stored: dict[str, int]
    duplicates: int
    rejected: int


class Ingestor:
    """Writes a batch of inbound messages to the store in one transaction."""

    def __init__(self, store: Any, settings: Any, handlers: dict[str, Handler] | None = None) -> None:
        self.store = store
        self.settings = settings
        self.handlers = handlers or registry()

    def process(self, batch: list[Inbound], now: datetime) -> BatchResult:
        ctx = HandlerContext(store=self.store, settings=self.settings, now=now)
        outcomes: list[Outcome] = []
        stored: dict[str, int] = {}
        duplicates = rejected = 0
        max_deliver = self.settings.nats.max_deliver
        with self.store.transaction():
            for item in batch:
                outcome = self._one(item, ctx)
                if isinstance(outcome, Retry) and item.num_delivered >= max_deliver:
                    outcome = Reject("retries_exhausted", f"{outcome.reason} (after {item.num_delivered} tries)")
                if isinstance(outcome, Reject):
                    rejected += 1
                    self.store.record_dlq(
                        item.subject,
                        outcome.reason,
                        outcome.detail,
                        event_id=event_id_hint(item),
                        stream_seq=item.stream_seq,
                        excerpt=safe_excerpt(item.data),
                        now=now,
                    )
                elif isinstance(outcome, Ack):
                    if outcome.duplicate:
                        duplicates += 1
                    else:
                        stored[item.subject] = stored.get(item.subject, 0) + 1
                outcomes.append(outcome)
        return BatchResult(outcomes, stored, duplicates, rejected)

    def _one(self, item: Inbound, ctx: HandlerContext) -> Outcome:
        event = decode(item, self.settings.nats.max_payload_bytes)
        if isinstance(event, Reject):
            return event
        handler = self.handlers[item.subject]
        if not getattr(handler, "may_refuse", False):
            # Handlers that only ever Ack need no savepoint (the hot path: lessons, tasks).
            if not self.store.claim(event.event_id, item.subject, item.stream_seq, ctx.now):
                return Ack(duplicate=True)
            return handler(event, ctx)
        # A handler that may Retry/Reject runs inside a savepoint so that it leaves no partial rows.
        self.store.conn.execute("SAVEPOINT ev")
        if not self.store.claim(event.event_id, item.subject, item.stream_seq, ctx.now):
            self.store.conn.execute("RELEASE ev")
            return Ack(duplicate=True)
        try:
            outcome = handler(event, ctx)
        except sqlite3.OperationalError:
            raise  # the store itself is in trouble (disk, lock): the whole batch is retried
        except Exception as exc:  # a bug meeting one message must not block the stream behind it
            log.exception("handler_failed", event_id=event.event_id, subject=item.subject)
            outcome = Reject("handler_error", f"{type(exc).__name__}: {exc}")
        if isinstance(outcome, Ack):
            self.store.conn.execute("RELEASE ev")
        else:
            self.store.conn.execute("ROLLBACK TO ev")
            self.store.conn.execute("RELEASE ev")
        return outcome
